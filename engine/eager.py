"""The first tier of in-process runs: a request evaluated over its own graph, as a tape.

A request's first calls need not pay for the gradient transform (engine/grad.py) and the
lowering of its program (engine/codegen.py): linear, but tens of microseconds of Python per
node, against about half a microsecond per node for a compiled call. Like a JIT's first tier,
this module runs the request directly: the forward nodes in topological order, each through
its op's kernel, then, in reverse topological order, each node's VJP applied to values. The
local executor uses it until a request has been seen TIER_UP_CALLS times (engine/executor.py).
The first call lowers the request to a tape (`record`), by array operations over groups of
nodes alike rather than a step of Python per node, then runs it; later calls run that tape
(`run_tape`).

Its results are bit-identical to the compiled program's, by construction:
- the region, the order of the nodes and which VJPs run come from `plan_pass`;
- a VJP is the op's own graph rule (`Op.grad`), recorded once per signature (op, attributes,
  input types, which inputs want a gradient) into a template of the nodes `grad_graph` would
  emit, and run as a small generated function calling the same kernels in the same order;
- a cotangent is the sum of its contributions in the fixed order of engine/autodiff.py (an
  output's seed first, then by consumer name, then input slot);
- nodes of constants are folded as codegen's `_simplify` folds them (its kernel run, the
  result copied and frozen), since a folded value's layout can steer a later kernel.
Values are freed after their last read (by a forward node or a VJP), so memory stays within
the request's estimate (engine/memory.py). An op that fails here is run again by the lowered
program, whose error names its node (a gradient node's name exists only in the gradient graph).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from operator import itemgetter
from typing import Any

import numpy as np

from graphgrad.engine.autodiff import (
    PassPlan,
    RunRequest,
    check_feeds,
    owned,
    plan_pass,
    seed_cotangents,
)
from graphgrad.engine.cancel import Cancellation
from graphgrad.engine.codegen import CHECK_ELEMENTS, CHECK_EVERY, FOLD_ELEMENTS
from graphgrad.engine.errors import GraphError
from graphgrad.engine.ir import Graph
from graphgrad.engine.lru import LRU
from graphgrad.engine.ops import CONSTANT, Op, TensorType, check_attr, lookup
from graphgrad.engine.plan_cache import DerivedCache, RequestKey

ADD = lookup("add")
# Signatures seen: bounded (a client can make many shapes), each some KiB of kernels and code.
MAX_SIGNATURES = 4096
SIGNATURE_BYTES = 16 << 10


class EagerOpError(Exception):
    """An op failed in the eager tier: the lowered program runs the request to name it.
    `node`: the node whose op or VJP failed, where known (`gradient`: its VJP)."""

    def __init__(self, message: str, node: str | None = None, gradient: bool = False) -> None:
        super().__init__(message)
        self.node, self.gradient = node, gradient


def _fold(value: Any) -> np.ndarray:
    """A node of constants, as codegen's `_fold` holds it: a frozen copy."""
    a = np.array(value)
    a.flags.writeable = False
    return a


class _Recorder:
    """The emitter a VJP rule runs with once per signature: it records the nodes the rule
    emits (op, kernel, argument refs, type), over refs 'g', 'x0'..., 'y' for its inputs."""

    def __init__(self, types: dict[str, TensorType]) -> None:
        self._types = types
        self.steps: list[tuple[str, Callable[..., Any], tuple[str, ...]]] = []
        self.consts: dict[str, np.ndarray] = {}
        self.op_names: dict[str, str] = {}  # step -> its op (what engine/tape_memory.py reads)

    def type(self, name: str) -> TensorType:
        return self._types[name]

    def emit(self, op: str, inputs: Sequence[str], attrs: Mapping[str, Any] | None = None) -> str:
        o = lookup(op)
        types = [self._types[x] for x in inputs]
        t = o.infer(types, dict(attrs or {}))
        canon = {k: check_attr(o, k, v, node=None) for k, v in (attrs or {}).items()}
        name = f"t{len(self._types)}"
        self._types[name] = t
        self.op_names[name] = o.name
        self.steps.append((name, o.lower(canon, types), tuple(inputs)))
        return name

    def const(self, value: float, like: str) -> str:
        dtype = self.type(like).dtype
        name = f"c{len(self._types)}"
        arr = check_attr(CONSTANT, "value", np.asarray(value, dtype=dtype), node=None)
        self._types[name] = TensorType((), dtype)
        self.consts[name] = arr
        return name


VjpFn = Callable[..., None]


class Vjp:
    """One signature's VJP: its recorded steps, the inputs it reads, and a generated function
    per pattern of known (constant) arguments, which decides which steps fold. The function
    also hands each gradient to its input's cotangent (straight-line code: no tuple of
    gradients, no loop over them)."""

    __slots__ = (
        "_outs",
        "_rec",
        "add",
        "costly",
        "folds",
        "reads",
        "reads_y",
        "slots",
        "steps",
        "types",
        "variants",
    )

    def __init__(
        self,
        op: Op,
        node: str,
        ins: Sequence[TensorType],
        out: TensorType,
        attrs: Mapping[str, Any],
        wants: tuple[bool, ...],
        costly: bool,
    ) -> None:
        self.costly = costly  # its op's: cancellation is checked before it
        # how its node's cotangent parts are summed: the gradient graph's sum nodes' kernel,
        # and whether a sum of constants folds (`_total`)
        self.add, self.folds = ADD.lower({}, (out, out)), out.size <= FOLD_ELEMENTS
        types = {"g": out, "y": out} | {f"x{k}": t for k, t in enumerate(ins)}
        rec = _Recorder(types)
        assert op.grad is not None
        grads = op.grad(rec, "g", [f"x{k}" for k in range(len(ins))], "y", attrs, list(wants))
        if len(grads) != len(ins):
            raise AssertionError(
                f"gradient rule of op '{op.name}' gave {len(grads)} gradients for {len(ins)} inputs"
            )
        outs: list[str | None] = []
        for k, (d, want) in enumerate(zip(grads, wants, strict=True)):
            if want and d is not None and rec.type(d) != ins[k]:
                raise AssertionError(
                    f"gradient rule of op '{op.name}' gave {rec.type(d)} for input {k} "
                    f"of '{node}', expected {ins[k]}"
                )
            outs.append(d if want else None)
        # only what the wanted gradients need runs (the gradient graph's other nodes are dead)
        live = {d for d in outs if d is not None}
        steps = []
        for step in reversed(rec.steps):
            if step[0] in live:
                steps.append(step)
                live.update(step[2])
        steps.reverse()
        self._rec = (steps, rec.consts, types)
        # what it allocates, as engine/tape_memory.py reads it: (step, op, argument refs) in
        # the order they run, and each ref's type
        self.steps = tuple((name, rec.op_names[name], args) for name, _, args in steps)
        self.types = types
        self._outs = tuple(outs)
        self.slots = tuple(k for k, d in enumerate(outs) if d is not None)  # gradients given
        self.reads = tuple(k for k in range(len(ins)) if f"x{k}" in live)  # inputs it reads
        self.reads_y = "y" in live  # whether it reads the node's value
        self.variants: dict[int, VjpFn] = {}

    @property
    def outs(self) -> tuple[str | None, ...]:
        """The ref of each input's gradient (None where none is given)."""
        return self._outs

    def variant(self, known: int) -> VjpFn:
        """The function (g, the run's values, the node's input positions, its position, the
        cotangents, its name) that adds a part (name, slot, gradient, whether it is known) to
        the cotangent of each input it gives a gradient, given `known`: bit 0 for g, bit
        k + 1 for input k, the last for y. A cotangent is its one part, or a list of them."""
        got = self.variants.get(known)
        if got is None:
            got = self.variants[known] = self._generate(known)
        return got

    def _generate(self, known: int) -> VjpFn:
        steps, consts, types = self._rec
        arity = len(self._outs)
        refs = ["g", *[f"x{k}" for k in range(arity)], "y"]
        is_known = {r: bool(known >> b & 1) for b, r in enumerate(refs)}
        is_known.update(dict.fromkeys(consts, True))
        namespace: dict[str, Any] = {"fold": _fold, **consts}
        last = {a: k for k, (_, _, args) in enumerate(steps) for a in args}
        outputs = set(self._outs)
        # it reads its inputs (and value) from the run's values, by position
        body = [f"    x{k} = v[ins[{k}]]\n" for k in self.reads]
        if self.reads_y:
            body.append("    y = v[i]\n")
        for k, (name, kernel, args) in enumerate(steps):
            namespace[f"k_{name}"] = kernel
            call = f"k_{name}({', '.join(args)})"
            is_known[name] = all(is_known[a] for a in args) and types[name].size <= FOLD_ELEMENTS
            body.append(f"    {name} = {'fold(' + call + ')' if is_known[name] else call}\n")
            # temporaries die after their last use, as in a compiled program
            dead = sorted({a for a in args if a.startswith("t") and last[a] == k} - outputs)
            if dead:
                body.append(f"    del {', '.join(dead)}\n")
        for k, d in enumerate(self._outs):
            if d is not None:
                body += [
                    f"    p = (name, {k}, {d}, {is_known[d]})\n",
                    f"    c = cot.setdefault(ins[{k}], p)\n",
                    "    if c is not p:\n",
                    "        if c.__class__ is tuple:\n",
                    f"            cot[ins[{k}]] = [c, p]\n",
                    "        else:\n",
                    "            c.append(p)\n",
                ]
        source = f"def vjp(g, v, ins, i, cot, name):\n{''.join(body) or '    pass'}"
        exec(compile(source, "<graphgrad eager vjp>", "exec"), namespace)
        fn: VjpFn = namespace["vjp"]
        return fn


class Signature:
    """What the eager tier needs of nodes alike (op, attributes, input types): the kernel,
    whether it is costly (cancellation is checked before it), and its VJPs."""

    __slots__ = ("attrs", "costly", "ins", "kernel", "node", "op", "out", "vjps")

    def __init__(self, graph: Graph, i: int) -> None:
        self.op, self.attrs, self.node = graph.ops[i], graph.nodes[i].attrs, graph.nodes[i].name
        self.ins = [graph.types[j] for j in graph.input_pos[i]]
        self.out = graph.types[i]
        self.kernel = self.op.lower(self.attrs, self.ins)
        self.costly = self.op.flops(self.ins, self.out, self.attrs) >= CHECK_ELEMENTS
        self.vjps: dict[tuple[bool, ...], Vjp] = {}

    def vjp(self, wants: tuple[bool, ...]) -> Vjp:
        got = self.vjps.get(wants)
        if got is None:
            got = self.vjps[wants] = Vjp(
                self.op, self.node, self.ins, self.out, self.attrs, wants, self.costly
            )
        return got


_SIGNATURES: LRU[tuple[Any, ...], Signature] = LRU(
    MAX_SIGNATURES, MAX_SIGNATURES * SIGNATURE_BYTES, lambda s: SIGNATURE_BYTES
)


def _signature(graph: Graph, i: int, seen: dict[Any, Signature] | None = None) -> Signature:
    """The node's signature: from `seen` (one lowering's, no lock) or the bounded cache, made
    on a miss. Keyed by op, input shapes and dtypes, and attributes."""
    types, attrs = graph.types, graph.nodes[i].attrs
    key: tuple[Any, ...] | None = (
        graph.ops[i].name,
        *[(types[j].shape, types[j].dtype) for j in graph.input_pos[i]],
    )
    if attrs:
        key = (*key, tuple(sorted(attrs.items())))  # type: ignore[misc]
    try:
        got = seen.get(key) if seen is not None else None
        if got is not None:
            return got
        sig = _SIGNATURES.get(key)  # type: ignore[arg-type]
    except TypeError:  # an attribute that is no plain value: not shared
        key, sig = None, None
    if sig is None:
        sig = Signature(graph, i)
        if key is not None:
            _SIGNATURES.put(key, sig)
    if seen is not None and key is not None:
        seen[key] = sig
    return sig


# How a forward step makes its value: its kernel on one, two or any number of inputs, folded
# (a node of constants), or a constant; CHECKED added where cancellation is checked first.
CALL1, CALL2, CALL, FOLD, CONST, CHECKED = 0, 1, 2, 3, 4, 8
NEVER = 1 << 62  # the step after the last: ends the list of deaths
CHECK_LOWERING = 4096  # steps of Python a lowering takes between checks of cancellation


class Tape:
    """A request lowered for the eager tier: flat lists, one entry per step and no object
    per node (making a tape is most of a first call, and per-node objects would also cost the
    collector a scan each). Forward steps, in topological order: node, kind (above), kernel
    or value, input positions. Backward steps, in the order they run: node, its Vjp, input
    positions, which of its arguments are known (bits as `Vjp.variant` reads them), name. Values
    die after the step that reads them last: `die_at` (steps counted forward then backward,
    ascending, NEVER last) beside `dying`. Made by array operations over the request's nodes
    (no gradient graph); kept in the plan cache, with how many times the request ran eagerly.
    A run holds its values in a frame, a list indexed by node position (a dict costs a run
    ~8 % more): the tape keeps up to MAX_FRAMES of them, empty, for its next runs (a run
    takes one or, where concurrent runs hold them all, makes its own), so the frame is part
    of the tape's memory, not of a run's. A request that spans a small part of its graph
    (`dense` False) runs in a dict instead: a list would hold a slot per node of the graph."""

    __slots__ = (
        "b_fn",
        "b_ins",
        "b_known",
        "b_name",
        "b_node",
        "b_vjp",
        "calls",
        "default_seed",
        "dense",
        "die_at",
        "dying",
        "f_fn",
        "f_ins",
        "f_kind",
        "f_node",
        "frames",
        "keep",
        "pass_plan",
        "seeds",
        "size",
    )
    f_node: list[int]
    f_kind: list[int]
    f_fn: list[Any]
    f_ins: list[tuple[int, ...]]
    b_node: list[int]
    b_vjp: list[Vjp]
    b_fn: list[VjpFn]
    b_ins: list[tuple[int, ...]]
    b_known: list[int]
    b_name: list[str]
    die_at: list[int]
    dying: list[int]

    def __init__(
        self, graph: Graph, key: RequestKey, check: Callable[[], None] | None = None
    ) -> None:
        """`check`: cancellation, checked now and then as the tape is made."""
        self.pass_plan = pp = plan_pass(graph, key.outputs, key.wrt, key.seeded)
        # outputs seeded: with grad_outputs, else the first output with 1 (a constant)
        self.seeds = ([graph.index[s] for s in key.seeded] or [pp.outputs[0]]) if pp.wrt else []
        self.default_seed = not key.seeded
        self.keep = frozenset(pp.wrt)  # nodes whose cotangent is a gradient asked for
        self.calls = 0
        _lower(self, graph, pp, check or _unchecked)
        self.size = len(graph)
        # a frame by position where the request spans much of the graph; else a dict
        self.dense = self.size <= 4 * (len(pp.needed_inputs) + len(self.f_node)) + 1024
        self.frames: list[list[Any]] = [[None] * self.size] if self.dense else []

    def approx_bytes(self) -> int:
        steps = TAPE_STEP_BYTES * (len(self.f_node) + len(self.b_node))
        return steps + (FRAME_SLOT_BYTES * self.size * MAX_FRAMES if self.dense else 0)


MAX_FRAMES = 2  # empty frames a tape keeps for its next runs
FRAME_SLOT_BYTES = 8

TAPE_STEP_BYTES = 120  # a step's entries in the tape's lists, its positions and its death


def _unchecked() -> None:
    """No cancellation to check (a tape made for admission's estimate)."""


_TAPES: DerivedCache[RequestKey, Tape] = DerivedCache("eager tapes")


def tape(graph: Graph, key: RequestKey) -> Tape:
    """The request's tape, made without running it where the plan cache has none (admission
    reads its memory from it, engine/tape_memory.py; the first call then runs it)."""
    return _TAPES.get_or_make(key, lambda: Tape(graph, key))


def held_tape(key: RequestKey) -> Tape | None:
    """The request's tape, if the plan cache holds it."""
    return _TAPES.get(key)


def record(
    graph: Graph, key: RequestKey, request: RunRequest, cancel: Cancellation
) -> tuple[Tape, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A request's first call: its feeds checked, its tape made, then run; the tape is kept
    in the plan cache, its call counted. Values by output name and gradients by wrt name;
    raises EagerOpError where an op fails (no tape is kept then)."""
    pp = plan_pass(graph, key.outputs, key.wrt, key.seeded)
    v: dict[int, Any] = check_feeds(graph, pp, request.feeds)  # live values by position
    seeds = seed_cotangents(graph, pp, request.grad_outputs)
    tp = Tape(graph, key, cancel.check)
    values, grads = _run(graph, tp, v, seeds, cancel)
    tp = _TAPES.get_or_make(key, lambda: tp)
    tp.calls += 1
    return tp, values, grads


def _lower(tp: Tape, graph: Graph, pp: PassPlan, check: Callable[[], None]) -> None:
    """Fill the tape's steps and its deaths. Nodes alike (op, and the identity of their input
    types: nodes alike share their type objects) are grouped by array operations, so the
    signature, kernel and VJP are looked up once per group, not per node; only nodes of ops
    with attributes, of more than two inputs, or downstream of constants (folding) take a
    step of Python each (their signatures looked up once per kind in `seen`). `check`
    (cancellation) runs between the phases and every CHECK_LOWERING steps of Python."""
    nodes, ops, types, input_pos = graph.nodes, graph.ops, graph.types, graph.input_pos
    forward = pp.forward
    nf = len(forward)
    f_ins = _gather(input_pos, forward)
    arity = np.fromiter(map(len, f_ins), dtype=np.intp, count=nf)
    flat = np.fromiter(itertools.chain.from_iterable(f_ins), dtype=np.intp, count=int(arity.sum()))
    # each step's first and second input (-1: none)
    start = np.cumsum(arity) - arity
    padded = np.append(flat, [-1, -1])  # (a last step without inputs starts at len(flat))
    first = np.where(arity >= 1, padded[start], -1)
    second = np.where(arity >= 2, padded[start + 1], -1)
    op_id = np.fromiter(map(id, _gather(ops, forward)), dtype=np.int64, count=nf)
    # the identity of each input's type (only at what the steps read: feeds and steps)
    type_id = np.zeros(len(types), dtype=np.int64)
    read = list(itertools.chain(pp.needed_inputs, forward))
    type_id[read] = np.fromiter(map(id, _gather(types, read)), np.int64, len(read))
    t0 = np.where(first >= 0, type_id[first], 0)
    t1 = np.where(second >= 0, type_id[second], 0)
    groups, rep, inv = _groups(op_id, t0, t1, arity)
    check()
    # per group: its signature (None: its nodes take the per-node way), kernel, costliness
    sigs: list[Signature | None] = []
    for k in rep.tolist():
        op = ops[forward[k]]
        odd = op is CONSTANT or bool(op.attrs) or len(f_ins[k]) > 2
        sigs.append(None if odd else _signature(graph, forward[k]))
    g_fn = np.empty(groups, dtype=object)
    g_fn[:] = [s.kernel if s is not None else None for s in sigs]
    g_costly = np.fromiter((s is not None and s.costly for s in sigs), dtype=bool, count=groups)
    g_odd = np.fromiter((s is None for s in sigs), dtype=bool, count=groups)
    f_fn: list[Any] = g_fn[inv].tolist()
    kinds = np.where(arity == 2, CALL2, np.where(arity == 1, CALL1, CALL))
    costly = g_costly[inv]
    step_sig: dict[int, Signature] = {}  # step -> its signature, for the per-node way
    seen: dict[Any, Signature] = {}
    consts: list[int] = []
    for n_odd, k in enumerate(np.flatnonzero(g_odd[inv]).tolist()):
        if not n_odd % CHECK_LOWERING:
            check()
        i = forward[k]
        if ops[i] is CONSTANT:
            consts.append(k)
            f_fn[k] = nodes[i].attrs["value"]
        else:
            sig = step_sig[k] = _signature(graph, i, seen)
            f_fn[k] = sig.kernel
    if step_sig:
        costly[list(step_sig)] = [sig.costly for sig in step_sig.values()]
    kinds[consts] = CONST
    constant = kinds == CONST
    known = _fold_known(graph, forward, f_ins, kinds, np.flatnonzero(constant), check)
    # cancellation is checked before a costly step and every CHECK_EVERY steps (constants aside)
    rank = np.cumsum(~constant) - 1
    checked = ~constant & (costly | (rank % CHECK_EVERY == 0))
    f_kind: list[int] = (kinds + CHECKED * checked).tolist()
    # backward steps: nodes whose VJP runs, grouped by signature group and wanted inputs
    n = len(nodes)
    runs = np.zeros(n, dtype=bool)
    runs[np.asarray(pp.backward, dtype=np.intp)] = True
    rel = np.frombuffer(pp.relevant + b"\0", dtype=bool)  # (the last for "no input")
    fwd = np.asarray(forward, dtype=np.intp)
    bsteps = np.flatnonzero(runs[fwd] & ~constant)
    nb = len(bsteps)
    b_first, b_second = first[bsteps], second[bsteps]
    wants = rel[b_first] | (rel[b_second] << 1)  # (-1 reads rel[n]: False)
    b_code = inv[bsteps] * 4 + wants
    vgroups, vrep, vinv = np.unique(b_code, return_index=True, return_inverse=True)
    vjps: list[Vjp | None] = []
    for k in vrep.tolist():
        s = bsteps[k]
        sig = sigs[inv[s]]
        ar = int(arity[s])
        vjps.append(
            None if sig is None else sig.vjp(tuple(bool(wants[k] >> r & 1) for r in range(ar)))
        )
    g_vjp = np.empty(len(vgroups), dtype=object)
    g_vjp[:] = vjps
    b_vjp: list[Vjp] = g_vjp[vinv].tolist()
    g_vjp[:] = [None if vjp is None else vjp.variant(0) for vjp in vjps]
    b_fn: list[VjpFn] = g_vjp[vinv].tolist()  # each VJP's function where nothing is known
    b_ins = f_ins.copy() if nb == nf else _gather(f_ins, bsteps.tolist())
    b_pos = fwd[bsteps]  # the backward steps' nodes
    b_node: list[int] = b_pos.tolist()
    # value -> its earliest VJP reader (counted in forward order): VJPs run in reverse
    # topological order, so that one reads it last (a node's own VJP, reading its value, runs
    # after its users')
    g_reads = np.zeros((len(vgroups), 3), dtype=bool)  # input 0, input 1, its value
    for g, vjp in enumerate(vjps):
        if vjp is not None:
            g_reads[g] = (0 in vjp.reads, 1 in vjp.reads, vjp.reads_y)
    reads = g_reads[vinv]
    order = np.arange(nb, dtype=np.intp)
    readers = [order[reads[:, 0]], order[reads[:, 1]], order[reads[:, 2]]]
    values = [b_first[reads[:, 0]], b_second[reads[:, 1]], b_pos[reads[:, 2]]]
    b_known = [0] * nb
    check()
    if known:
        for b, (ins, i) in enumerate(zip(b_ins, b_node, strict=True)):
            if not b % CHECK_LOWERING:
                check()
            for bit, j in enumerate((*ins, i), 1):
                if j in known:
                    b_known[b] |= 1 << bit
    special = np.flatnonzero(g_odd[inv[bsteps]])  # the per-node way
    s_readers: list[int] = []
    s_values: list[int] = []
    s_vjps: dict[tuple[Signature, Any], Vjp] = {}
    relevant = pp.relevant
    for n_odd, (b, k, w) in enumerate(
        zip(special.tolist(), bsteps[special].tolist(), wants[special].tolist(), strict=True)
    ):
        if not n_odd % CHECK_LOWERING:
            check()
        ins, i, sig = b_ins[b], b_node[b], step_sig[k]
        if len(ins) > 2:
            w = tuple([relevant[j] == 1 for j in ins])
        vjp = s_vjps.get((sig, w))
        if vjp is None:
            wanted = w if len(ins) > 2 else tuple([bool(w >> r & 1) for r in range(len(ins))])
            vjp = s_vjps[sig, w] = sig.vjp(wanted)
        b_vjp[b] = vjp
        b_fn[b] = vjp.variant(b_known[b])
        for r in vjp.reads:
            s_readers.append(b)
            s_values.append(ins[r])
        if vjp.reads_y:
            s_readers.append(b)
            s_values.append(i)
    readers.append(np.array(s_readers, dtype=np.intp))
    values.append(np.array(s_values, dtype=np.intp))
    if known:  # (the per-node way's are made above)
        for b in np.flatnonzero(np.array(b_known, dtype=bool) & ~g_odd[inv[bsteps]]).tolist():
            b_fn[b] = b_vjp[b].variant(b_known[b])
    last_bwd = np.full(n, nb, dtype=np.intp)
    np.minimum.at(last_bwd, np.concatenate(values), np.concatenate(readers))
    last_bwd[last_bwd == nb] = -1
    b_name = [node.name for node in _gather(nodes, b_node)]
    for lst in (b_node, b_vjp, b_fn, b_ins, b_known, b_name):
        lst.reverse()
    tp.f_node, tp.f_kind, tp.f_fn, tp.f_ins = list(forward), f_kind, f_fn, f_ins
    tp.b_node, tp.b_vjp, tp.b_fn, tp.b_ins = b_node, b_vjp, b_fn, b_ins
    tp.b_known, tp.b_name = b_known, b_name
    last_fwd = _last_forward_reads(fwd, arity, flat, n)
    tp.die_at, tp.dying = _deaths(_mortal(pp), last_fwd, last_bwd, nf, nb)


def _gather(items: Sequence[Any], at: Sequence[int]) -> list[Any]:
    """[items[i] for i in at], in one call of C (itemgetter) rather than a step each."""
    if len(at) < 2:
        return [items[i] for i in at]
    return list(itemgetter(*at)(items))


def _groups(
    op_id: np.ndarray, t0: np.ndarray, t1: np.ndarray, arity: np.ndarray
) -> tuple[int, np.ndarray, np.ndarray]:
    """Steps alike (the same op, arity and input types by identity): how many groups, each
    group's first step, and each step's group. One sort of a hash of the four; a collision
    (two kinds in one group) is caught and they are sorted apart exactly instead."""
    mixed = (op_id * _MIX[0]) ^ (t0 * _MIX[1]) ^ (t1 * _MIX[2]) ^ (arity * _MIX[3])
    _, rep, inv = np.unique(mixed, return_index=True, return_inverse=True)
    alike = all(bool((a == a[rep][inv]).all()) for a in (op_id, t0, t1, arity))
    if not alike:
        _, rep, inv = np.unique(
            np.stack([op_id, t0, t1, arity], axis=1), axis=0, return_index=True, return_inverse=True
        )
    inv = inv.reshape(-1)
    return len(rep), rep, inv


# odd 64-bit multipliers (wrapping): a hash of the four keys of a step
_MIX = np.array(
    [0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0x27D4EB2F165667C5],
    dtype=np.uint64,
).view(np.int64)


def _fold_known(
    graph: Graph,
    forward: Sequence[int],
    f_ins: list[tuple[int, ...]],
    kinds: np.ndarray,
    constants: np.ndarray,
    check: Callable[[], None],
) -> set[int]:
    """The nodes folded, as codegen's `_simplify` folds them: constants, and nodes of at most
    FOLD_ELEMENTS whose inputs are all known (their steps' kind set to FOLD). A step of Python
    per node from the first constant on; none without constants."""
    known: set[int] = set()
    if not len(constants):
        return known
    types = graph.types
    for k in range(int(constants[0]), len(forward)):
        if not k % CHECK_LOWERING:
            check()
        i = forward[k]
        if kinds[k] == CONST:
            known.add(i)
        else:
            ins = f_ins[k]
            if ins and all([j in known for j in ins]) and types[i].size <= FOLD_ELEMENTS:
                kinds[k] = FOLD
                known.add(i)
    return known


def _last_forward_reads(
    fwd: np.ndarray, arity: np.ndarray, inputs: np.ndarray, n: int
) -> np.ndarray:
    """Value -> the forward step that reads it last (its own where nothing reads it; -1 for
    what no step reads or makes): `fwd` the steps' nodes, `inputs` their inputs in a row,
    `arity` how many each."""
    steps = np.arange(len(fwd))
    last = np.full(n, -1, dtype=np.intp)
    last[fwd] = steps
    np.maximum.at(last, inputs, np.repeat(steps, arity))
    return last


def _mortal(pp: PassPlan) -> np.ndarray:
    """The values a run may free: feeds and the values it makes, but not the outputs."""
    values = np.concatenate(
        [np.asarray(pp.needed_inputs, dtype=np.intp), np.asarray(pp.forward, dtype=np.intp)]
    )
    return values[~np.isin(values, np.asarray(pp.outputs, dtype=np.intp))]


def _by_step(values: np.ndarray, step: np.ndarray) -> tuple[list[int], list[int]]:
    """The steps ascending, NEVER last, and the values in the same order."""
    order = np.argsort(step, kind="stable")
    return [*step[order].tolist(), NEVER], values[order].tolist()


def _deaths(
    mortal: np.ndarray, last_fwd: np.ndarray, last_bwd: np.ndarray, nf: int, nb: int
) -> tuple[list[int], list[int]]:
    """Each value's death: after its last read, by a VJP (the last to run) or else by a
    forward node; steps counted forward (0..nf-1), then backward in the order they run."""
    late = last_bwd[mortal]
    return _by_step(mortal, np.where(late < 0, last_fwd[mortal], nf + nb - 1 - late))


def run_tape(
    graph: Graph, tp: Tape, request: RunRequest, cancel: Cancellation
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Values by output name and gradients by wrt name; raises EagerOpError where an op
    fails (the caller runs the lowered program, which names the node)."""
    pp = tp.pass_plan
    v: dict[int, Any] = check_feeds(graph, pp, request.feeds)  # live values by position
    return _run(graph, tp, v, seed_cotangents(graph, pp, request.grad_outputs), cancel)


def _run(
    graph: Graph,
    tp: Tape,
    feeds: dict[int, np.ndarray],
    seeds: dict[int, np.ndarray],
    cancel: Cancellation,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The tape run on the feeds `feeds` (by position) and the seeds, in a frame of the
    tape's (given back empty after a run that succeeds)."""
    pp = tp.pass_plan
    frames = tp.frames
    v: Any = {}  # live values by position
    if tp.dense:
        try:
            v = frames.pop()
        except IndexError:  # concurrent runs hold the tape's frames
            v = [None] * tp.size
    for j, value in feeds.items():
        v[j] = value
    check = cancel.check
    die_at, dying = tp.die_at, tp.dying
    d = 0  # the next death
    nxt = die_at[0]
    i = -1
    try:
        with np.errstate(all="ignore"):  # NaN and infinity are values like any other
            for k, i, kind, fn, ins in zip(
                itertools.count(), tp.f_node, tp.f_kind, tp.f_fn, tp.f_ins
            ):
                if kind == CALL2:
                    v[i] = fn(v[ins[0]], v[ins[1]])
                elif kind == CALL1:
                    v[i] = fn(v[ins[0]])
                else:
                    v[i] = _odd_step(kind, fn, ins, v, check)
                while nxt == k:
                    v[dying[d]] = None
                    d += 1
                    nxt = die_at[d]
            i = -1  # (the backward pass names its own node)
            grads = _backward(graph, tp, v, seeds, check, d) if pp.wrt else {}
    except GraphError:
        raise  # cancelled, or a deadline passed: not an op's fault
    except (ValueError, ArithmeticError) as e:
        raise EagerOpError(str(e), graph.nodes[i].name if i >= 0 else None) from e
    values = {graph.nodes[o].name: np.asarray(v[o]) for o in pp.outputs}
    if tp.dense:
        for j in itertools.chain(feeds, pp.outputs):  # what never dies; the rest died already
            v[j] = None
        if len(frames) < MAX_FRAMES:
            frames.append(v)
    return values, grads


def _odd_step(kind: int, fn: Any, ins: tuple[int, ...], v: Any, check: Callable[[], None]) -> Any:
    """A forward step that checks cancellation first, has more than two inputs, folds or is
    a constant."""
    if kind >= CHECKED:
        check()
        kind -= CHECKED
    if kind == CALL2:
        return fn(v[ins[0]], v[ins[1]])
    if kind == CALL1:
        return fn(v[ins[0]])
    if kind == CALL:
        return fn(*[v[j] for j in ins])
    if kind == FOLD:
        return _fold(fn(*[v[j] for j in ins]))
    return fn  # a constant


def _backward(
    graph: Graph,
    tp: Tape,
    v: Any,
    seeds: dict[int, np.ndarray],
    check: Callable[[], None],
    d: int,
) -> dict[str, np.ndarray]:
    """Each VJP applied in reverse topological order; gradients by wrt name. `d`: the next
    death (the forward steps' are done)."""
    pp, types, nodes = tp.pass_plan, graph.types, graph.nodes
    # node -> its cotangent's contribution (consumer name, "" for a seed; slot; value;
    # whether it is known, a constant), or while several come, a list of them, summed in that
    # order by `_total`
    cot: dict[int, Any] = {}
    for o in tp.seeds:
        seed = seeds[o]
        if tp.default_seed:  # the first output, a scalar, seeded with 1: a constant node there
            seed = check_attr(CONSTANT, "value", np.asarray(1, dtype=types[o].dtype), node=None)
        cot[o] = ("", 0, seed, tp.default_seed)
    totals: dict[int, Any] = {}
    keep, die_at, dying = tp.keep, tp.die_at, tp.dying
    nxt = die_at[d]
    since = CHECK_EVERY
    name = ""
    nf = len(tp.f_node)
    try:
        for k, i, fn, vjp, ins, name in zip(
            itertools.count(nf), tp.b_node, tp.b_fn, tp.b_vjp, tp.b_ins, tp.b_name
        ):
            p: Any = cot.pop(i, None)
            if p is not None:  # (a cotangent may be cut off by ops no gradient flows through)
                if p.__class__ is tuple:
                    _, _, g, gk = p
                else:
                    g, gk = _total(p, vjp.add, vjp.folds)
                if i in keep:
                    totals[i] = g
                if since >= CHECK_EVERY or vjp.costly:
                    check()
                    since = 0
                since += 1
                if gk:  # its cotangent is a constant: the variant that folds with it
                    fn = vjp.variant(tp.b_known[k - nf] | 1)
                fn(g, v, ins, i, cot, name)
                g = p = None  # nothing held past its last use
            while nxt == k:
                v[dying[d]] = None
                d += 1
                nxt = die_at[d]
    except GraphError:
        raise  # cancelled, or a deadline passed: not an op's fault
    except (ValueError, ArithmeticError) as e:  # a VJP failed: its node named
        raise EagerOpError(str(e), name, gradient=True) from e
    grads: dict[str, np.ndarray] = {}
    for w in pp.wrt:
        name = nodes[w].name
        if name in grads:
            continue
        p = cot.get(w)
        if w in totals:
            g = totals[w]
        elif p.__class__ is list:
            t = types[w]
            g = _total(p, ADD.lower({}, (t, t)), t.size <= FOLD_ELEMENTS)[0]
        elif p is not None:
            g = p[2]
        else:  # no path from w to a differentiated output: zeros of its type
            g = np.zeros(types[w].shape, dtype=types[w].dtype)
        grads[name] = owned(g)
    return grads


def _total(
    parts: list[tuple[str, int, Any, bool]], add: Callable[..., Any], folds: bool
) -> tuple[Any, bool]:
    """A cotangent: its parts added one by one with `add` in the fixed order (seed, consumer
    name, slot), as the gradient graph's sum nodes add them; sums of constants fold where
    `folds`. Returns it and whether it is known (constant)."""
    parts.sort()  # by (consumer name, slot): unique to each part, so the values never compare
    if len(parts) == 2:  # most sums: no slice, no loop
        (_, _, a, ka), (_, _, b, kb) = parts
        if ka and kb and folds:
            return _fold(add(a, b)), True
        return add(a, b), False
    _, _, acc, known = parts[0]
    for _, _, d, k in parts[1:]:
        if known and k and folds:
            acc = _fold(add(acc, d))
        else:
            acc, known = add(acc, d), False
    return acc, known
