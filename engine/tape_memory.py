"""A request's peak memory on the eager tier, from its tape (engine/eager.py), not from the
gradient graph: what admits a request's first calls without paying for the transform.

It replays the tape as `run_tape` runs it, without computing anything: fed values and seeds
are held throughout; a forward step allocates its value (a constant none; a folded node a
copy too) and its kernel's extra bytes (engine/kernel_bytes.py) while it runs; values die at
the steps the tape says. Backward, a node's cotangent is held from its first contribution
until its VJP has run (a gradient asked for, to the end), each contribution counted at the
full size of its node's type even where it is a view; a cotangent of several parts adds them
one by one, holding the parts, the sum and the next sum at once; a VJP holds the values its
steps make until their last use, each step's kernel extras while it runs, and its gradients
(each step counted at its full size, folded or not). At the end the gradients are copied out
and the response holds a copy of every value and gradient plus its serialized form, as
engine/memory.py counts them. Linear in the tape; each VJP's own peak is worked out once per
signature. Kept in a bounded cache beside the tape.
"""

from __future__ import annotations

from collections.abc import Sequence

from graphgrad.engine.eager import CHECKED, CONST, FOLD, Tape, Vjp, tape
from graphgrad.engine.ir import Graph
from graphgrad.engine.kernel_bytes import step_extra
from graphgrad.engine.memory import RequestMemory
from graphgrad.engine.plan_cache import DerivedCache, RequestKey

_ESTIMATES: DerivedCache[RequestKey, RequestMemory] = DerivedCache("eager request memory")
_VJP_PEAKS: dict[int, tuple[Vjp, int]] = {}  # by id: a Vjp lives as long as its signature


def eager_memory(graph: Graph, key: RequestKey) -> RequestMemory:
    """The estimate of a run of `key` on the eager tier; makes its tape if none is held."""
    return _ESTIMATES.get_or_make(key, lambda: tape_peak(graph, tape(graph, key)))


def tape_peak(graph: Graph, tp: Tape) -> RequestMemory:
    pp = tp.pass_plan
    size = _sizes(graph, (tp.f_node, pp.needed_inputs, pp.wrt, pp.outputs))
    fed_at = {*pp.needed_inputs, *(tp.seeds if not tp.default_seed else ())}
    fed = sum(size[i] for i in fed_at) + (sum(size[o] for o in tp.seeds) if tp.default_seed else 0)
    made: dict[int, int] = {}  # value -> bytes it holds (fed ones are counted in `fed`)
    live = peak = 0
    die_at, dying = tp.die_at, tp.dying
    d = 0
    nxt = die_at[0]
    ops = graph.ops
    for k, (i, kind, ins) in enumerate(zip(tp.f_node, tp.f_kind, tp.f_ins, strict=True)):
        kind = kind - CHECKED if kind >= CHECKED else kind
        if kind != CONST:
            made[i] = out = size[i]
            live += out
            extra = step_extra(ops[i].name, out, [size[j] for j in ins])
            peak = max(peak, live + extra + (out if kind == FOLD else 0))
        while nxt == k:
            live -= made.pop(dying[d], 0)
            d += 1
            nxt = die_at[d]
    # backward: node -> (parts, bytes) of its cotangent; a seed is held by the caller
    cot: dict[int, tuple[int, int]] = {o: (1, 0) for o in tp.seeds}
    held = 0  # bytes of every cotangent held
    step = len(tp.f_node)
    for i, vjp, ins in zip(tp.b_node, tp.b_vjp, tp.b_ins, strict=True):
        got = cot.pop(i, None)
        if got is not None:
            parts, b = got
            summing = 2 * size[i] if parts > 1 else 0  # the sum so far and the next one
            peak = max(peak, live + held + summing + _vjp_peak(vjp))
            for slot in vjp.slots:
                j = ins[slot]
                n, bj = cot.get(j, (0, 0))
                cot[j] = (n + 1, bj + size[j])
                held += size[j]
            held -= b
            if i in tp.keep:  # a gradient asked for: its total held to the end
                cot[i] = (1, size[i])
                held += size[i]
        while nxt == step:
            live -= made.pop(dying[d], 0)
            d += 1
            nxt = die_at[d]
        step += 1
    # gradients of several parts summed at the end, then each copied out
    summing = max((2 * size[w] for w in set(pp.wrt) if cot.get(w, (0, 0))[0] > 1), default=0)
    grads = sum(size[w] for w in set(pp.wrt))
    values = sum(size[o] for o in set(pp.outputs))
    response = 2 * (values + grads)
    kept = fed + max(peak, live + held + summing)
    end = fed + live + held + grads + response
    return RequestMemory(max(kept, end), kept, grads, response)


def _sizes(graph: Graph, groups: tuple[Sequence[int], ...]) -> list[int]:
    """The bytes of each value of the request's nodes by position (0 for other nodes): a
    large graph's request may reach a small part of it, and nodes alike share their types."""
    size = [0] * len(graph.types)
    by_type: dict[int, int] = {}
    types = graph.types
    for group in groups:
        for i in group:
            t = types[i]
            b = by_type.get(id(t))
            if b is None:
                b = by_type[id(t)] = t.nbytes
            size[i] = b
    return size


def _vjp_peak(vjp: Vjp) -> int:
    """The most bytes `vjp`'s steps hold at once beyond their arguments (its gradients
    included); per Vjp, since its steps' types are its signature's."""
    got = _VJP_PEAKS.get(id(vjp))
    if got is not None and got[0] is vjp:
        return got[1]
    types = vjp.types
    nbytes = {name: t.nbytes for name, t in types.items()}
    last = {a: k for k, (_, _, args) in enumerate(vjp.steps) for a in args}
    outs = {d for d in vjp.outs if d is not None}
    live = peak = 0
    for k, (name, op, args) in enumerate(vjp.steps):
        out = nbytes[name]
        live += out
        extra = step_extra(op, out, [nbytes[a] for a in args])
        peak = max(peak, live + extra + out)  # + out: a folded step holds its copy too
        for a in set(args):
            if a in nbytes and a.startswith("t") and last[a] == k and a not in outs:
                live -= nbytes[a]
    if len(_VJP_PEAKS) >= 4096:
        _VJP_PEAKS.clear()
    _VJP_PEAKS[id(vjp)] = (vjp, peak)
    return peak
