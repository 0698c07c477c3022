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


Sum = tuple[tuple[int, ...], int]  # a cotangent's parts (their keys, in order), how many fold
CALL, FOLD, CONST = 0, 1, 2  # how a forward step makes its value
# A forward step: [position, CALL | FOLD | CONST, kernel or constant value, inputs,
# check first, values freed after]. A backward step: [position, VJP function, the values it
# reads, inputs, which gradients are known, node name, keep the cotangent (a wrt node),
# check first, values freed after].


class Tape:
    """A request lowered for the eager tier, per primal node: its kernel or VJP function,
    where to check cancellation, and which values die after it. Made in one pass over the
    request's nodes (no gradient graph); kept in the plan cache, with how many times the
    request ran eagerly."""

    __slots__ = ("backward", "calls", "default_seed", "forward", "pass_plan", "seed", "sums")

    def __init__(self, graph: Graph, key: RequestKey) -> None:
        self.pass_plan = pp = plan_pass(graph, key.outputs, key.wrt, key.seeded)
        with _gc_paused():
            self.forward, self.backward, self.sums, self.seed = _steps(graph, pp, key)
        self.default_seed = not key.seeded  # the first output seeded with 1, a constant
        self.calls = 0

    def approx_bytes(self) -> int:
        return TAPE_STEP_BYTES * (len(self.forward) + len(self.backward))


TAPE_STEP_BYTES = 300  # a step's tuple, its positions and its entry in the tape
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
            was = gc.isenabled()
            gc.disable()
            _WAS_ENABLED.append(was)
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


def _steps(
    graph: Graph, pp: PassPlan, key: RequestKey
) -> tuple[list[list[Any]], list[list[Any]], dict[int, Sum], tuple[int, ...]]:
    """The tape's forward and backward steps (lists: fields are filled in as later nodes are
    seen), the sums of wrt nodes whose cotangent no step takes, and where the seed goes."""
    nodes, ops, types, input_pos = graph.nodes, graph.ops, graph.types, graph.input_pos
    relevant, runs_vjp = pp.relevant, set(pp.backward)
    known: set[int] = set()  # constants and folded nodes: what codegen's `_simplify` folds
    vjps: dict[int, Vjp] = {}
    # Signatures by op and the identity of the input types (alive with the graph, and shared
    # by most nodes alike): no hashing of shapes per node.
    sigs: dict[tuple[Any, ...], Signature] = {}
    fwd: list[list[Any]] = []
    last_fwd = [-1] * len(nodes)  # value -> the forward step that reads it last
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
        kind = CALL
        if known and all([j in known for j in ins]) and types[i].size <= FOLD_ELEMENTS:
            kind = FOLD
            known.add(i)
        check = since >= CHECK_EVERY or sig.costly
        since = 1 if check else since + 1
        fwd.append([i, kind, sig.kernel, ins, check, ()])
        if i in runs_vjp:
            if len(ins) == 2:
                wants: tuple[bool, ...] = (ins[0] in relevant, ins[1] in relevant)
            else:
                wants = tuple([j in relevant for j in ins])
            vjp = sig.vjps.get(wants)
            vjps[i] = vjp if vjp is not None else sig.vjp(wants)
    # The backward steps: VJPs of nodes a cotangent reaches. Each gradient a step gives is
    # stored under a key of its own (step * stride + slot; -1 - k for the k-th seed); the step
    # of the node it belongs to takes its parts in the fixed order (seed, consumer name, slot)
    # and adds them. Where all parts are known (constant) the sum folds, and a VJP's function
    # is chosen by which of its arguments are known.
    parts: dict[int, list[tuple[str, int, bool, int]]] = {}
    seeds: list[int] = []
    if pp.wrt:
        seeds = [graph.index[s] for s in key.seeded] or [pp.outputs[0]]
        for k, o in enumerate(seeds):
            parts[o] = [("", 0, not key.seeded, -1 - k)]
    stride = 1 + max([len(input_pos[i]) for i in pp.backward], default=0)
    bwd: list[list[Any]] = []
    last_bwd = [-1] * len(nodes)  # value -> the backward step that reads it last
    wrt = set(pp.wrt)
    since = CHECK_EVERY
    for i in pp.backward:
        pk = parts.pop(i, None)
        if pk is None:
            continue  # no cotangent reaches it: nothing to do
        if len(pk) == 1:
            srcs: tuple[int, ...] = (pk[0][3],)
            folds = 1 if pk[0][2] else 0
        else:
            srcs, folds = _order(pk, types[i])
        vjp, ins = vjps[i], input_pos[i]
        mask = 1 if folds == len(srcs) else 0
        if known:
            for b, j in enumerate(ins, 1):
                if j in known:
                    mask |= 1 << b
            if i in known:
                mask |= 1 << (len(ins) + 1)
        got = vjp.variants.get(mask)
        fn, kout = got if got is not None else vjp.variant(mask)
        name = nodes[i].name
        b = len(bwd)
        base = b * stride
        for slot in vjp.slots:
            entry = (name, slot, kout[slot], base + slot)
            pj = parts.get(ins[slot])
            if pj is None:
                parts[ins[slot]] = [entry]
            else:
                pj.append(entry)
        if vjp.reads_y:
            reads = (*[ins[r] for r in vjp.reads], i)
        else:
            reads = tuple([ins[r] for r in vjp.reads])
        for j in reads:
            last_bwd[j] = b
        check = since >= CHECK_EVERY or vjp.costly
        since = 1 if check else since + 1
        bwd.append([i, fn, reads, base, vjp.slots, srcs, folds, i in wrt, check, ()])
    # wrt nodes no step takes a cotangent from: summed after the steps
    sums = {w: _order(parts.pop(w), types[w]) for w in wrt if w in parts}
    # gradients nothing takes (of nodes off the differentiated paths) are not stored
    for pk in parts.values():
        for _, slot, _, k in pk:
            if k >= 0:
                step = bwd[k // stride]
                step[4] = tuple([s for s in step[4] if s != slot])
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
    return fwd, bwd, sums, tuple(seeds)


def _order(pk: list[tuple[str, int, bool, int]], t: TensorType) -> Sum:
    """A cotangent's parts in the fixed order (their keys), and how many lead the sum known
    (constants: their sums fold; all of them: the cotangent is known)."""
    pk.sort(key=_BY_CONSUMER)
    folds = 0
    if len(pk) == 1 or t.size <= FOLD_ELEMENTS:
        for _, _, k, _ in pk:
            if not k:
                break
            folds += 1
    return tuple([k for _, _, _, k in pk]), folds


_BY_CONSUMER = itemgetter(0, 1)  # consumer name, slot


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
                if kind == CALL:
                    if len(ins) == 2:
                        v[i] = fn(v[ins[0]], v[ins[1]])
                    elif len(ins) == 1:
                        v[i] = fn(v[ins[0]])
                    else:
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
    cot: dict[int, Any] = {}  # gradients given, by key, until the step summing them
    for k, o in enumerate(tp.seed):
        seed = seeds[o]
        if tp.default_seed:  # the first output, a scalar, seeded with 1: a constant node there
            seed = check_attr(CONSTANT, "value", np.asarray(1, dtype=types[o].dtype), node=None)
        cot[-1 - k] = seed
    totals: dict[int, Any] = {}
    for i, fn, reads, base, slots, srcs, folds, keep, chk, dead in tp.backward:
        if len(srcs) == 1:
            g = cot.pop(srcs[0])
        else:
            g = _sum([cot.pop(k) for k in srcs], folds, types[i])
        if keep:
            totals[i] = g
        if chk:
            check()
        if len(reads) == 1:
            out = fn(g, v[reads[0]])
        elif not reads:
            out = fn(g)
        elif len(reads) == 2:
            out = fn(g, v[reads[0]], v[reads[1]])
        else:
            out = fn(g, *[v[j] for j in reads])
        for slot in slots:
            cot[base + slot] = out[slot]
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
        elif w in tp.sums:
            srcs, folds = tp.sums[w]
            g = _sum([cot[k] for k in srcs], folds, types[w])
        else:  # no path from w to a differentiated output: zeros of its type
            g = np.zeros(types[w].shape, dtype=types[w].dtype)
        grads[name] = owned(g)
    return grads


def _sum(parts: list[Any], folds: int, t: TensorType) -> Any:
    """A cotangent: its parts (in the fixed order) added one by one, as the gradient graph's
    sum nodes add them; the first `folds` are constants, whose sums fold."""
    add = ADD.lower({}, (t, t))  # the kernel of the gradient graph's sum nodes
    acc = parts[0]
    if len(parts) == 1:
        return acc
    for r in range(1, len(parts)):
        acc = _fold(add(acc, parts[r])) if r < folds else add(acc, parts[r])
    return acc
