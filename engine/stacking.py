"""Requests stacked: concurrent runs of one graph that ask for the same outputs, wrt and seeded
outputs with the same feed names, run once on the graph stacked along a new leading request
axis (the batching transform, engine/batching.py), then split: dynamic batching.

A request joins a stack only if it would succeed alone on the checks a stack cannot make for
it: its feeds and seeds have exactly their declared shapes and dtypes, every output and wrt
node carries the request axis in the stacked graph (a gradient with respect to a node shared
by the stack would sum over requests), and every op it runs stays within STACK_ULPS of its
result alone (`Op.batch_ulps`, measured by tests/test_dynamic_batching.py). Anything else
runs alone, where its errors are its own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from graphgrad.engine.autodiff import RunRequest, plan_pass
from graphgrad.engine.batching import batch_graph
from graphgrad.engine.cancel import Cancellation
from graphgrad.engine.errors import GraphError
from graphgrad.engine.executor import RunResult, check_finite
from graphgrad.engine.ir import Graph
from graphgrad.engine.kinds import ExecutorKind
from graphgrad.engine.ops import INPUT
from graphgrad.engine.plan_cache import DerivedCache, RequestKey
from graphgrad.engine.session import RunOptions

# A request is stacked only if every op it runs moves its results by at most this many ulps.
# Every registered op measures 0 today (each request's slice runs the same numpy loops); an op
# whose stacked form reorders arithmetic states its bound in its registry entry.
STACK_ULPS = 0


@dataclass(frozen=True, slots=True)
class StackKey:
    """What requests must share to run stacked: graph instance, outputs, wrt, seeded outputs,
    feed names (sorted) and executor. Shapes and dtypes are the graph's declared ones."""

    request: RequestKey
    feeds: tuple[str, ...]
    executor: ExecutorKind
    # Worked out once: a batcher looks its key up several times a request (plan_cache's PlanKey)
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.request, self.feeds, self.executor)))

    def __hash__(self) -> int:
        return self._hash

    def __reduce__(self) -> tuple[type, tuple[RequestKey, tuple[str, ...], ExecutorKind]]:
        return StackKey, (self.request, self.feeds, self.executor)


@dataclass(frozen=True, slots=True)
class Stacked:
    """The stacked graph of n requests and the names in it of the template's nodes."""

    graph: Graph
    names: Mapping[str, str]  # template output or wrt name -> stacked node name

    def approx_bytes(self) -> int:
        return self.graph.approx_bytes()


_STACKABLE: DerivedCache[StackKey, bool] = DerivedCache("stackable requests")
_STACKED: DerivedCache[tuple[StackKey, int], Stacked] = DerivedCache("stacked graphs")


def stack_key(graph: Graph, request: RunRequest, options: RunOptions) -> StackKey | None:
    """The key of the stacks `request` may join, or None: it runs alone (asked to be exact,
    or a check it would fail, or a graph that cannot be stacked within STACK_ULPS)."""
    if options.exact:
        return None
    seeds = request.grad_outputs or {}
    key = StackKey(
        RequestKey(graph.serial, request.outputs, request.wrt, tuple(seeds)),
        tuple(sorted(request.feeds)),
        options.executor,
    )
    if not _STACKABLE.get_or_make(key, lambda: _stackable(graph, key)):
        return None
    for arrays in (request.feeds, seeds):  # names were checked with the key
        for name, a in arrays.items():
            if not (isinstance(a, np.ndarray) and graph.types[graph.index[name]].matches(a)):
                return None
    return key


def _stackable(graph: Graph, key: StackKey) -> bool:
    r = key.request
    try:
        plan = plan_pass(graph, r.outputs, r.wrt, r.seeded)
    except GraphError:
        return False
    fed = set(key.feeds)
    if not fed or any(graph.nodes[i].name not in fed for i in plan.needed_inputs):
        return False
    if not fed <= graph.index.keys() or any(graph.ops[graph.index[n]] is not INPUT for n in fed):
        return False
    if r.wrt and not r.seeded and graph.types[plan.outputs[0]].shape != ():
        return False  # alone, it gets the error naming the non-scalar output
    if any(graph.ops[i].batch_ulps > STACK_ULPS for i in plan.forward):
        return False
    try:
        _, refs = batch_graph(graph, fed, 2)
    except GraphError:  # an op without a batching rule
        return False
    return all(refs[n].batched for n in (*r.outputs, *r.wrt))


def _stack(graph: Graph, key: StackKey, n: int) -> Stacked:
    stacked, refs = batch_graph(graph, set(key.feeds), n)
    r = key.request
    return Stacked(stacked, {name: refs[name].name for name in (*r.outputs, *r.wrt)})


def _stacked(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """np.stack of same-shaped arrays, without its generic checks (a request's cost)."""
    out = np.empty((len(arrays), *arrays[0].shape), arrays[0].dtype)
    for j, a in enumerate(arrays):
        out[j] = a
    return out


class StackCancellation(Cancellation):
    """A stacked run's cancellation: it stops once every member is cancelled (a client gone,
    the server stopping) or at the members' latest deadline; one member leaving does not stop
    the others."""

    __slots__ = ("members",)

    def __init__(self, members: Sequence[Cancellation]) -> None:
        deadlines = [m.deadline for m in members]
        latest = None if None in deadlines else max(d for d in deadlines if d is not None)
        super().__init__(deadline=latest)
        self.members = tuple(members)

    def check(self) -> None:
        if self.members and all(m.cancelled for m in self.members):
            self.cancel(self.members[0].reason)
        super().check()


# How the stacked request is run (the session's run, with the stack's executor).
RunFn = Callable[[Graph, RunRequest], RunResult]


# The most memory a stack's padding rows may add: each member's run slot admitted its own
# row's peak, not the padding's, so padding is kept to what is small beside any memory bound.
PAD_BYTES = 16 << 20


def stack_size(n: int, most: int, row_bytes: int = 0) -> int:
    """The size n requests are stacked at: the next power of two, at most `most` (and at least
    n). Stacked graphs are compiled per size, so a few sizes serve every batch. `row_bytes`:
    one row's peak memory; where the padding rows would add more than PAD_BYTES, none."""
    padded = max(n, min(1 << (n - 1).bit_length(), most))
    return padded if (padded - n) * row_bytes <= PAD_BYTES else n


def run_stacked(
    run: RunFn,
    graph: Graph,
    key: StackKey,
    requests: Sequence[RunRequest],
    check_numerics: Sequence[bool],
    size: int | None = None,
) -> list[RunResult | GraphError]:
    """Run `requests` (each of which gave `key`) as one stacked run, and split the result: one
    RunResult per request, or the error of its own check (check_numerics) in its place. An
    error of the stacked run itself is raised (the caller then runs each request alone).
    `size`: the stack's size (default: one row per request); rows past the requests repeat
    the first request's feeds, and their results are dropped."""
    n, r = len(requests), key.request
    size = n if size is None else size
    if size < n:
        raise ValueError(f"a stack of size {size} cannot hold {n} requests")
    rows = [*requests, *[requests[0]] * (size - n)]
    stacked = _STACKED.get_or_make((key, size), lambda: _stack(graph, key, size))
    names = stacked.names
    feeds = {name: _stacked([q.feeds[name] for q in rows]) for name in key.feeds}
    seeds: dict[str, np.ndarray] | None = None
    if r.seeded:
        seeds = {names[o]: _stacked([q.grad_outputs[o] for q in rows]) for o in r.seeded}  # type: ignore[index]
    elif r.wrt:  # the first output, a scalar per request, seeded with 1 for each
        first = graph.types[graph.index[r.outputs[0]]]
        seeds = {names[r.outputs[0]]: np.ones((size,), first.dtype)}
    out = run(
        stacked.graph,
        RunRequest(
            tuple(names[o] for o in r.outputs), feeds, tuple(names[w] for w in r.wrt), seeds
        ),
    )
    stats = dataclasses.replace(out.stats, batch_size=n)
    results: list[RunResult | GraphError] = []
    for j, (q, check) in enumerate(zip(requests, check_numerics, strict=True)):
        res = RunResult(
            {o: out.values[names[o]][j] for o in r.outputs},
            {w: out.grads[names[w]][j] for w in r.wrt},
            stats,
        )
        try:
            if check:
                check_finite(res, q.feeds)
            results.append(res)
        except GraphError as e:
            results.append(e)
    return results
