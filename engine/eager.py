"""The first tier of in-process runs: a request evaluated over its own graph, as a tape.

A request's first calls need not pay for the gradient transform (engine/grad.py) and the
lowering of its program (engine/codegen.py): linear, but tens of microseconds of Python per
node, against about half a microsecond per node for a compiled call. Like a JIT's first tier,
this module runs the request directly: the forward nodes in topological order, each through
its op's kernel, then, in reverse topological order, each node's VJP applied to values. The
local executor uses it until a request has been seen TIER_UP_CALLS times (engine/executor.py).

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

import gc
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
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
    """An op failed in the eager tier: the lowered program runs the request to name it."""


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

    def type(self, name: str) -> TensorType:
        return self._types[name]

    def emit(self, op: str, inputs: Sequence[str], attrs: Mapping[str, Any] | None = None) -> str:
        o = lookup(op)
        types = [self._types[x] for x in inputs]
        t = o.infer(types, dict(attrs or {}))
        canon = {k: check_attr(o, k, v, node=None) for k, v in (attrs or {}).items()}
        name = f"t{len(self._types)}"
        self._types[name] = t
        self.steps.append((name, o.lower(canon, types), tuple(inputs)))
        return name

    def const(self, value: float, like: str) -> str:
        dtype = self.type(like).dtype
        name = f"c{len(self._types)}"
        arr = check_attr(CONSTANT, "value", np.asarray(value, dtype=dtype), node=None)
        self._types[name] = TensorType((), dtype)
        self.consts[name] = arr
        return name


VjpFn = Callable[..., tuple[Any, ...]]


class Vjp:
    """One signature's VJP: its recorded steps, the inputs it reads, and a generated function
    per pattern of known (constant) arguments, which decides which steps fold."""

    __slots__ = ("_outs", "_rec", "costly", "reads", "reads_y", "slots", "variants")

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
        self._outs = tuple(outs)
        self.slots = tuple(k for k, d in enumerate(outs) if d is not None)  # gradients given
        self.reads = tuple(k for k in range(len(ins)) if f"x{k}" in live)  # inputs it reads
        self.reads_y = "y" in live  # whether it reads the node's value
        self.variants: dict[int, tuple[VjpFn, tuple[bool, ...]]] = {}

    def variant(self, known: int) -> tuple[VjpFn, tuple[bool, ...]]:
        """The function (g, the inputs it reads, y if it reads it) -> one gradient per input
        (None where not wanted), and which gradients are known, given `known`: bit 0 for g,
        bit k + 1 for input k, the last for y."""
        got = self.variants.get(known)
        if got is None:
            got = self.variants[known] = self._generate(known)
        return got

    def _generate(self, known: int) -> tuple[VjpFn, tuple[bool, ...]]:
        steps, consts, types = self._rec
        arity = len(self._outs)
        refs = ["g", *[f"x{k}" for k in range(arity)], "y"]
        is_known = {r: bool(known >> b & 1) for b, r in enumerate(refs)}
        is_known.update(dict.fromkeys(consts, True))
        params = ["g", *[f"x{k}" for k in self.reads], *(["y"] if self.reads_y else [])]
        namespace: dict[str, Any] = {"fold": _fold, **consts}
        last = {a: k for k, (_, _, args) in enumerate(steps) for a in args}
        outputs = set(self._outs)
        body = []
        for k, (name, kernel, args) in enumerate(steps):
            namespace[f"k_{name}"] = kernel
            call = f"k_{name}({', '.join(args)})"
            is_known[name] = all(is_known[a] for a in args) and types[name].size <= FOLD_ELEMENTS
            body.append(f"    {name} = {'fold(' + call + ')' if is_known[name] else call}\n")
            # temporaries die after their last use, as in a compiled program
            dead = sorted({a for a in args if a.startswith("t") and last[a] == k} - outputs)
            if dead:
                body.append(f"    del {', '.join(dead)}\n")
        outs = ", ".join("None" if d is None else d for d in self._outs)
        source = f"def vjp({', '.join(params)}):\n{''.join(body)}    return ({outs},)\n"
        exec(compile(source, "<graphgrad eager vjp>", "exec"), namespace)
        return namespace["vjp"], tuple(d is not None and is_known[d] for d in self._outs)


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


def _signature(graph: Graph, i: int) -> Signature:
    """The node's signature: from the bounded cache, made on a miss."""
    types, attrs = graph.types, graph.nodes[i].attrs
    key: tuple[Any, ...] | None = (
        graph.ops[i].name,
        *[(types[j].shape, types[j].dtype) for j in graph.input_pos[i]],
    )
    if attrs:
        key = (*key, tuple(sorted(attrs.items())))  # type: ignore[misc]
        try:
            hash(key)
        except TypeError:  # an attribute that is no plain value: not shared
            key = None
    sig = _SIGNATURES.get(key) if key is not None else None
    if sig is None:
        sig = Signature(graph, i)
        if key is not None:
            _SIGNATURES.put(key, sig)
    return sig


# how a forward step makes its value: its kernel on one, two or any number of inputs, folded
# (a node of constants), or a constant
CALL1, CALL2, CALL, FOLD, CONST = 0, 1, 2, 3, 4
# A forward step: [position, how (above), kernel or constant value, inputs, check first,
# values freed after]. A backward step: [position, its Vjp, the values it reads, how many,
# inputs, node name, keep the cotangent (a wrt node), which of its arguments are known
# (bits as `Vjp.variant` reads them, the cotangent's aside), values freed after].


class Tape:
    """A request lowered for the eager tier, per primal node: its kernel and VJP, where to
    check cancellation, and which values die after it. Made in one pass over the request's
    nodes (no gradient graph); kept in the plan cache, with how many times the request ran
    eagerly."""

    __slots__ = ("backward", "calls", "default_seed", "forward", "pass_plan", "seeds")

    def __init__(self, graph: Graph, key: RequestKey) -> None:
        self.pass_plan = pp = plan_pass(graph, key.outputs, key.wrt, key.seeded)
        with _gc_paused():
            self.forward, self.backward = _steps(graph, pp)
        # outputs seeded: with grad_outputs, else the first output with 1 (a constant)
        self.seeds = ([graph.index[s] for s in key.seeded] or [pp.outputs[0]]) if pp.wrt else []
        self.default_seed = not key.seeded
        self.calls = 0

    def approx_bytes(self) -> int:
        return TAPE_STEP_BYTES * (len(self.forward) + len(self.backward))


TAPE_STEP_BYTES = 300  # a step's list, its positions and its entry in the tape
_TAPES: DerivedCache[RequestKey, Tape] = DerivedCache("eager tapes")


def tape(graph: Graph, key: RequestKey) -> Tape:
    """The request's tape, made once (in the plan cache)."""
    return _TAPES.get_or_make(key, lambda: Tape(graph, key))


@contextmanager
def _gc_paused() -> Iterator[None]:
    """The cyclic collector paused while a tape is made: it allocates a few acyclic objects
    per node, and on a large heap the collections they set off would cost more than making
    the tape (a third more at K = 20,000 in bench/bigdag.py)."""
    global _PAUSED
    with _PAUSE_LOCK:
        _PAUSED += 1
        if _PAUSED == 1:
            _WAS_ENABLED.append(gc.isenabled())
            gc.disable()
    try:
        yield
    finally:
        with _PAUSE_LOCK:
            _PAUSED -= 1
            if _PAUSED == 0 and _WAS_ENABLED.pop():
                gc.enable()


_PAUSE_LOCK = threading.Lock()
_PAUSED = 0
_WAS_ENABLED: list[bool] = []


def _steps(graph: Graph, pp: PassPlan) -> tuple[list[list[Any]], list[list[Any]]]:
    """The tape's forward and backward steps, in one pass over the forward nodes (the values
    each step frees are filled in at the end)."""
    nodes, ops, types, input_pos = graph.nodes, graph.ops, graph.types, graph.input_pos
    relevant, runs_vjp, wrt = pp.relevant, set(pp.backward), set(pp.wrt)
    known: set[int] = set()  # constants and folded nodes: what codegen's `_simplify` folds
    # Signatures by op and the identity of the input types (alive with the graph, and shared
    # by most nodes alike): no hashing of shapes per node.
    sigs: dict[tuple[Any, ...], Signature] = {}
    fwd: list[list[Any]] = []
    bwd: list[list[Any]] = []  # in forward order: run reversed
    last_fwd = [-1] * len(nodes)  # value -> the forward step that reads it last
    # value -> the backward step that reads it last: that of its earliest reader (VJPs run in
    # reverse topological order; a node's own VJP, reading its value, runs after its users')
    last_bwd = [-1] * len(nodes)
    since = CHECK_EVERY
    for k, i in enumerate(pp.forward):
        op, ins = ops[i], input_pos[i]
        last_fwd[i] = k  # read by nothing: it dies where it is made
        for j in ins:
            last_fwd[j] = k
        if op is CONSTANT:
            fwd.append([i, CONST, nodes[i].attrs["value"], ins, False, ()])
            known.add(i)
            continue
        if nodes[i].attrs:
            sig = _signature(graph, i)
        else:
            if len(ins) == 2:
                skey: tuple[Any, ...] = (op.name, id(types[ins[0]]), id(types[ins[1]]))
            elif len(ins) == 1:
                skey = (op.name, id(types[ins[0]]))
            else:
                skey = (op.name, *[id(types[j]) for j in ins])
            got_sig = sigs.get(skey)
            sig = got_sig if got_sig is not None else sigs.setdefault(skey, _signature(graph, i))
        kind = CALL2 if len(ins) == 2 else CALL1 if len(ins) == 1 else CALL
        if known and all([j in known for j in ins]) and types[i].size <= FOLD_ELEMENTS:
            kind = FOLD
            known.add(i)
        check = since >= CHECK_EVERY or sig.costly
        since = 1 if check else since + 1
        fwd.append([i, kind, sig.kernel, ins, check, ()])
        if i not in runs_vjp:
            continue
        if len(ins) == 2:
            wants: tuple[bool, ...] = (ins[0] in relevant, ins[1] in relevant)
        else:
            wants = tuple([j in relevant for j in ins])
        vjp = sig.vjps.get(wants)
        if vjp is None:
            vjp = sig.vjp(wants)
        if vjp.reads_y:
            reads = (*[ins[r] for r in vjp.reads], i)
        else:
            reads = tuple([ins[r] for r in vjp.reads])
        b = len(bwd)
        for j in reads:
            if last_bwd[j] < 0:
                last_bwd[j] = b
        kmask = 0
        if known:
            for bit, j in enumerate((*ins, i), 1):
                if j in known:
                    kmask |= 1 << bit
        bwd.append([i, vjp, reads, len(reads), ins, nodes[i].name, i in wrt, kmask, ()])
    # Each value dies after its last read: by a VJP (the last to run), else by a forward node.
    kept = set(pp.outputs)
    for j in (*pp.needed_inputs, *pp.forward):
        if j not in kept:
            late = last_bwd[j]
            step = fwd[last_fwd[j]] if late < 0 else bwd[late]
            if step[-1]:
                step[-1].append(j)
            else:
                step[-1] = [j]
    bwd.reverse()
    return fwd, bwd


def run_tape(
    graph: Graph, tp: Tape, request: RunRequest, cancel: Cancellation
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Values by output name and gradients by wrt name; raises EagerOpError where an op
    fails (the caller runs the lowered program, which names the node)."""
    pp = tp.pass_plan
    v: dict[int, Any] = check_feeds(graph, pp, request.feeds)  # live values by position
    seeds = seed_cotangents(graph, pp, request.grad_outputs)
    check = cancel.check
    try:
        with np.errstate(all="ignore"):  # NaN and infinity are values like any other
            for i, kind, fn, ins, chk, dead in tp.forward:
                if chk:
                    check()
                if kind == CALL2:
                    v[i] = fn(v[ins[0]], v[ins[1]])
                elif kind == CALL1:
                    v[i] = fn(v[ins[0]])
                elif kind == CALL:
                    v[i] = fn(*[v[j] for j in ins])
                elif kind == FOLD:
                    v[i] = _fold(fn(*[v[j] for j in ins]))
                else:
                    v[i] = fn
                for d in dead:
                    del v[d]
            grads = _backward(graph, tp, v, seeds, check) if pp.wrt else {}
    except GraphError:
        raise  # cancelled, or a deadline passed: not an op's fault
    except (ValueError, ArithmeticError) as e:
        raise EagerOpError(str(e)) from e
    return {graph.nodes[o].name: np.asarray(v[o]) for o in pp.outputs}, grads


def _backward(
    graph: Graph,
    tp: Tape,
    v: dict[int, Any],
    seeds: dict[int, np.ndarray],
    check: Callable[[], None],
) -> dict[str, np.ndarray]:
    """Each VJP applied in reverse topological order; gradients by wrt name."""
    pp, types = tp.pass_plan, graph.types
    # node -> its cotangent's parts: (consumer name, slot, value, known), summed in that order
    cot: dict[int, list[tuple[str, int, Any, bool]]] = {}
    for o in tp.seeds:
        seed = seeds[o]
        if tp.default_seed:  # the first output, a scalar, seeded with 1: a constant node there
            seed = check_attr(CONSTANT, "value", np.asarray(1, dtype=types[o].dtype), node=None)
        cot[o] = [("", 0, seed, tp.default_seed)]
    totals: dict[int, Any] = {}
    since = CHECK_EVERY
    for i, vjp, reads, nreads, ins, name, keep, kmask, dead in tp.backward:
        p = cot.pop(i, None)
        if p is not None:  # (a cotangent may be cut off by ops no gradient flows through)
            if len(p) == 1:
                _, _, g, gk = p[0]
            else:
                g, gk = _total(p, types[i])
            if keep:
                totals[i] = g
            if since >= CHECK_EVERY or vjp.costly:
                check()
                since = 0
            since += 1
            got = vjp.variants.get(kmask | gk)
            fn, kout = got if got is not None else vjp.variant(kmask | gk)
            if nreads == 1:
                out = fn(g, v[reads[0]])
            elif nreads == 0:
                out = fn(g)
            elif nreads == 2:
                out = fn(g, v[reads[0]], v[reads[1]])
            else:
                out = fn(g, *[v[j] for j in reads])
            for slot in vjp.slots:
                pj = cot.get(ins[slot])
                if pj is None:
                    cot[ins[slot]] = [(name, slot, out[slot], kout[slot])]
                else:
                    pj.append((name, slot, out[slot], kout[slot]))
            out = g = None  # nothing held past its last use
        for d in dead:
            del v[d]
    grads: dict[str, np.ndarray] = {}
    for w in pp.wrt:
        name = graph.nodes[w].name
        if name in grads:
            continue
        if w in totals:
            g = totals[w]
        elif w in cot:
            g = _total(cot[w], types[w])[0]
        else:  # no path from w to a differentiated output: zeros of its type
            g = np.zeros(types[w].shape, dtype=types[w].dtype)
        grads[name] = owned(g)
    return grads


def _total(parts: list[tuple[str, int, Any, bool]], t: TensorType) -> tuple[Any, bool]:
    """A cotangent: its parts added one by one in the fixed order (seed, consumer name,
    slot), as the gradient graph's sum nodes add them; sums of constants fold. Returns it and
    whether it is known (constant)."""
    parts.sort(key=_BY_CONSUMER)
    _, _, acc, known = parts[0]
    add = _ADDS.get((t.shape, t.dtype))  # the kernel of the gradient graph's sum nodes
    if add is None:
        if len(_ADDS) >= MAX_SIGNATURES:
            _ADDS.clear()
        add = _ADDS[t.shape, t.dtype] = ADD.lower({}, (t, t))
    small = t.size <= FOLD_ELEMENTS
    for _, _, d, k in parts[1:]:
        if known and k and small:
            acc = _fold(add(acc, d))
        else:
            acc, known = add(acc, d), False
    return acc, known


_BY_CONSUMER = itemgetter(0, 1)  # consumer name, slot
_ADDS: dict[tuple[tuple[int, ...], str], Callable[..., Any]] = {}  # by type (bounded)
