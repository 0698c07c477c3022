"""A request planned once and run many times: what `Session.prepare` returns.

A prepared run fixes a graph, its outputs, its wrt and the outputs it seeds, and the run
options; what varies from call to call is only the feeds (and seed values). Its signature
(each feed's name, shape and dtype) lets a decoder on the wire check a tensor against what
the compiled program expects before building an array, and lets each call skip the work a
plain `run` repeats: building cache keys, choosing the executor, estimating memory.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from graphgrad.engine.autodiff import RunRequest, plan_pass
from graphgrad.engine.errors import LimitError, RequestError, name_list
from graphgrad.engine.ir import Graph
from graphgrad.engine.memory import RequestMemory, request_memory
from graphgrad.engine.plan_cache import RequestKey
from graphgrad.engine.tape_memory import eager_memory

if TYPE_CHECKING:
    from graphgrad.engine.session import RunOptions


@dataclass(frozen=True, slots=True)
class FeedSpec:
    """What one fed tensor must be: the graph input's (or seeded output's) declared type."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    nbytes: int
    # `shape` as a list, made once: a wire decoder compares each request's repeated shape
    # field with it (~0.3 us a feed quicker than building a list or tuple per request)
    shape_list: list[int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape_list", list(self.shape))


@dataclass(frozen=True, slots=True)
class PreparedKey:
    request: RequestKey
    options: RunOptions


class PreparedRun:
    """A request's names checked and its pass planned (programs are compiled on the first
    run and kept by the plan cache); `feeds` and `seeds` are its signature, in a fixed order.
    Run it with `Session.run_prepared`."""

    # __weakref__: a server keeps its prepared runs by request head weakly (server/service.py)
    __slots__ = (
        "__weakref__",
        "_eager_peak",
        "_peak",
        "admitted_bytes",
        "auto",
        "budget",
        "feeds",
        "graph",
        "key",
        "last_seconds",
        "options",
        "seeds",
    )

    def __init__(self, graph: Graph, key: RequestKey, options: RunOptions) -> None:
        pp = plan_pass(graph, key.outputs, key.wrt, key.seeded)  # names are checked here
        self.graph, self.key, self.options = graph, key, options
        self.feeds = tuple(feed_spec(graph, i) for i in pp.needed_inputs)
        self.seeds = tuple(feed_spec(graph, graph.index[name]) for name in key.seeded)
        self._peak: int | None = None
        self._eager_peak: int | None = None
        # The most bytes its runs may hold (the server's max_request_bytes, set where it is
        # admitted): a run whose compiled program's estimate is over it stays eager.
        self.budget: int | None = None
        self.admitted_bytes = 0  # the peak memory its latest admission counted
        self.last_seconds: float | None = None  # how long its latest run took (ran())
        # Where "auto" runs it while Ray is up, and for which (CPUs, calibration): the cost
        # model's answer is the same until one of those changes (Session.run_prepared).
        self.auto: tuple[tuple[int, str], str] | None = None

    @classmethod
    def key_of(
        cls,
        graph: Graph,
        outputs: Sequence[str],
        wrt: Sequence[str],
        seeded: Sequence[str],
        options: RunOptions,
    ) -> PreparedKey:
        key = RequestKey(graph.serial, tuple(outputs), tuple(wrt), tuple(seeded))
        return PreparedKey(key, options)

    def ran(self, seconds: float) -> None:
        """Note how long a run took (`last_seconds`: what a server uses to guess the next)."""
        self.last_seconds = seconds

    @property
    def outputs(self) -> tuple[str, ...]:
        return self.key.outputs

    @property
    def wrt(self) -> tuple[str, ...]:
        return self.key.wrt

    def peak_bytes(self) -> int:
        """The run's peak memory from declared shapes (worked out on first use, then kept)."""
        if self._peak is None:
            self._peak = self.compiled_memory().peak
        return self._peak

    def eager_memory(self) -> RequestMemory:
        """The peak memory of its runs on the eager tier, from the tape (no gradient graph)."""
        mem = eager_memory(self.graph, self.key)
        self._eager_peak = mem.peak
        return mem

    def may_run_eager(self) -> bool:
        """Whether its eager runs fit its budget: a tape may hold more at its peak than the
        program (admitted on its program's estimate, such a run compiles on its first call,
        and again after its program was evicted)."""
        if self.budget is None:
            return True
        peak = self._eager_peak if self._eager_peak is not None else self.eager_memory().peak
        return peak <= self.budget

    def compiled_memory(self) -> RequestMemory:
        """The peak memory of its compiled runs (local or partitioned)."""
        k = self.key
        return request_memory(self.graph, k.outputs, k.wrt, k.seeded)

    def description(self) -> str:
        """What a message about its memory calls it."""
        return f"the run of {name_list(self.outputs)}" + (
            f" with wrt {name_list(self.wrt)}" if self.wrt else ""
        )

    def check_compiled_budget(self) -> None:
        """Raise LimitError where its compiled runs would be over its budget."""
        if not self.may_compile():
            mem = self.compiled_memory()
            raise LimitError(
                f"{self.description()} ({mem}) needs about {mem.peak} bytes, over the limit "
                f"max_request_bytes={self.budget}",
                limit="max_request_bytes",
            )

    def may_compile(self) -> bool:
        """Whether its compiled runs fit its budget (asked when it would tier up)."""
        return self.budget is None or self.peak_bytes() <= self.budget

    def request(
        self, feeds: Mapping[str, np.ndarray], grad_outputs: Mapping[str, np.ndarray] | None
    ) -> RunRequest:
        """The RunRequest of one call; its seeds must name the outputs this run seeds."""
        check_seeds(self.key.seeded, grad_outputs)
        if grad_outputs is not None and tuple(grad_outputs) != self.key.seeded:
            grad_outputs = {k: grad_outputs[k] for k in self.key.seeded}
        return RunRequest(self.key.outputs, feeds, self.key.wrt, grad_outputs or None)

    def approx_bytes(self) -> int:
        """What the plan cache counts: the signature (the graph is the graph cache's)."""
        return 200 + 150 * (len(self.feeds) + len(self.seeds))


def feed_spec(graph: Graph, i: int) -> FeedSpec:
    """The declared type of node `i` as a FeedSpec (feeds, seeds, values and gradients)."""
    t = graph.types[i]
    return FeedSpec(graph.nodes[i].name, t.shape, np.dtype(t.dtype), t.nbytes)


def check_seeds(seeded: Sequence[str], grad_outputs: Mapping[str, object] | None) -> None:
    """A prepared run's calls seed the outputs it was prepared with, no others."""
    if grad_outputs is None:
        if seeded:
            raise RequestError(
                f"this prepared run seeds {name_list(seeded)}: pass grad_outputs",
                field="grad_outputs",
            )
    elif set(grad_outputs) != set(seeded):
        raise RequestError(
            f"this prepared run seeds {name_list(seeded) or 'no outputs'}, "
            f"got grad_outputs for {name_list(grad_outputs) or 'none'}",
            field="grad_outputs",
        )
