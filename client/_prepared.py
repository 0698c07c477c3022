"""`client.prepare(...)`: a run whose outputs, wrt, seeds and options are fixed once, called
with feeds. Both clients' `run` goes through it."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from graphgrad import engine
from graphgrad._builder import Tensor
from graphgrad._request import NodeRef, as_list, find_graph, name_of, named_seeds, typed_feeds
from graphgrad._result import Result
from graphgrad.engine import LRU, ExecutorKind, RunOptions, check_seeds

Seeds = dict[str, np.ndarray] | None
# What a client does with one call: typed feeds, seeds by name, timeout -> Result.
Runner = Callable[[dict[str, np.ndarray], Seeds, float | None], Result]


@dataclass(frozen=True)
class RunSpec:
    """What a prepared run fixes: the graph, output, wrt and seeded names, the options."""

    graph: engine.Graph
    outputs: tuple[str, ...]
    wrt: tuple[str, ...]
    seeded: tuple[str, ...]
    options: RunOptions


def run_spec(
    outputs: NodeRef | Sequence[NodeRef],
    wrt: NodeRef | Sequence[NodeRef] | None,
    grad_outputs: Mapping[NodeRef, Any] | None,
    executor: str,
    check_numerics: bool,
    feeds: Mapping[NodeRef, Any] | None = None,
    exact: bool = False,
) -> tuple[RunSpec, Seeds]:
    """The spec of a run and its seeds by name (None: the first output, seeded with 1);
    `feeds`' keys help find the graph when the outputs are names."""
    outs, wrts = as_list(outputs), as_list(wrt)
    builder = find_graph(outs, wrts, list(grad_outputs or {}), list(feeds or {}))
    seeds = named_seeds(grad_outputs)
    spec = RunSpec(
        builder.freeze(),
        tuple(name_of(o, "outputs") for o in outs),
        tuple(name_of(w, "wrt") for w in wrts),
        tuple(seeds or ()),
        RunOptions(ExecutorKind.parse(executor), check_numerics, exact),
    )
    return spec, seeds


class Prepared:
    """A run prepared by `client.prepare(outputs, wrt=..., grad_outputs=...)`: call it with
    feeds, `prepared(feeds) -> Result`, as often as needed. What does not change between
    calls (the graph's registration, the request's outputs, wrt, seeds and options, their
    checks and plan) is done once; each call sends or runs only the feeds.

    `grad_outputs=` on a call replaces the seed values given to `prepare` (for the same
    outputs); `timeout=` is that call's deadline in seconds.
    """

    def __init__(self, spec: RunSpec, seeds: Seeds, runner: Runner) -> None:
        self.spec, self._seeds, self._runner = spec, seeds, runner

    @property
    def outputs(self) -> tuple[str, ...]:
        return self.spec.outputs

    @property
    def wrt(self) -> tuple[str, ...]:
        return self.spec.wrt

    def __call__(
        self,
        feeds: Mapping[NodeRef, Any] | None = None,
        grad_outputs: Mapping[NodeRef, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> Result:
        seeds = self._seeds
        if grad_outputs is not None:
            seeds = named_seeds(grad_outputs)
            check_seeds(self.spec.seeded, seeds)
        return self._runner(typed_feeds(self.spec.graph, feeds), seeds, timeout)

    def __repr__(self) -> str:
        wrt = f", wrt={list(self.wrt)}" if self.wrt else ""
        return f"<graphgrad.Prepared outputs={list(self.outputs)}{wrt}>"


def _name(ref: Tensor | str) -> str:
    return ref if isinstance(ref, str) else ref.name


RunShape = tuple[int, tuple[str, ...], tuple[str, ...], str, bool, bool]
RUN_SHAPES = 64  # run() call shapes a client remembers


class RunShapes:
    """The Prepared of each `run(...)` call shape a client has seen, so that calling `run`
    again with the same nodes costs what calling a Prepared costs (the spec, its checks and
    the plan lookups are not made again). Only calls without grad_outputs whose outputs or
    wrt hold a node are kept: their graph is that node's, known without a search. An entry
    holds the frozen graph it was made for and is used only while the builder still freezes
    to it (nodes added since make a new one)."""

    def __init__(self) -> None:
        self._runs: LRU[RunShape, tuple[engine.Graph, Prepared]] = LRU(RUN_SHAPES)

    def find(
        self,
        outputs: NodeRef | Sequence[NodeRef],
        wrt: NodeRef | Sequence[NodeRef] | None,
        feeds: Mapping[NodeRef, Any] | None,
        options: tuple[str, bool, bool],
    ) -> tuple[RunShape | None, Prepared | None]:
        """The call's shape (None: not one to keep) and its Prepared, if one is held."""
        outs, wrts = as_list(outputs), as_list(wrt)
        nodes = [r for r in outs + wrts if isinstance(r, Tensor)]
        if not nodes or not all(isinstance(r, Tensor | str) for r in outs + wrts):
            return None, None  # the graph is found by a search, or a ref is wrong: the full path
        graph = nodes[0].graph
        if any(isinstance(r, Tensor) and r.graph is not graph for r in [*nodes, *(feeds or ())]):
            return None, None  # the full path names the mix of graphs
        key = (id(graph), tuple(map(_name, outs)), tuple(map(_name, wrts)), *options)
        held = self._runs.get(key)
        return key, (held[1] if held is not None and graph.freeze() is held[0] else None)

    def put(self, key: RunShape, prepared: Prepared) -> Prepared:
        self._runs.put(key, (prepared.spec.graph, prepared))
        return prepared
