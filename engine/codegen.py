"""Compiled programs: a task's nodes as straight-line Python, generated once per task.

Each node becomes one line calling its op's kernel (bound as a local of the generated
function), with the node's name in a comment; a value is deleted right after its last use.
Before generating, the nodes are simplified, every step exact (the same bits as running them):
constants are bound once (hoisted) and nodes of constants folded (their kernel run once, at
compile time); a node equal to one of its inputs (x * 1, x / 1, x ** 1, x - 0, a reshape to
the same shape) is that input; a node whose op, attributes and inputs repeat an earlier node's
is not computed again (common subexpressions). An op whose registry entry says `inplace`
writes into the buffer of an input that dies there (`out=`) when that buffer was made by the
program, is no view's base, and is no export (never a feed, a constant or a value another task
or the caller reads). Cancellation is checked before costly ops and every CHECK_EVERY ops.
Large programs are generated in chunks of CHUNK nodes, so compile time stays linear in the
node count. An op that fails raises an ExecutionError naming its node.

Programs run in two tiers, as JIT engines do: the nodes are first lowered to a list of steps
(kernel, argument and result positions, in-place buffer, cancellation check, values that die)
which an interpreter runs; the Python source is rendered from those same steps and compiled
only when a program is called for the TIER_UP_CALLS-th time (see there why then). Both tiers
run the same kernels in the same order with the same buffers, checks and frees: the same bits
by construction. A request made a few times (an explain, one of many distinct requests) never
pays for `compile`.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import numpy as np

from graphgrad.engine.cancel import Cancellation
from graphgrad.engine.errors import ExecutionError, GraphError
from graphgrad.engine.ir import Graph
from graphgrad.engine.ops import CONSTANT
from graphgrad.engine.plan_cache import DerivedCache

Values = dict[int, Any]
CHUNK = 2000  # nodes per generated function
# Cancellation is checked before every op that may take a while, and every CHECK_EVERY ops.
CHECK_EVERY, CHECK_ELEMENTS = 16, 1 << 16
FOLD_ELEMENTS = 4096  # nodes of constants with at most this many elements are folded
# Compiling costs about what 30 interpreted calls lose to the compiled tier (bench/bigdag.py at
# K = 20,000: ~0.45 s against ~15 ms a call); compiling at half that many calls means a program
# run a few times (an explain, one of a sweep of distinct requests, a test) never compiles,
# one in a loop reaches compiled speed early, and the benchmarks' 20 warm-up calls measure it.
TIER_UP_CALLS = 16
TOUCH_EVERY = 32  # a compiled program in use is marked recent in the plan cache every so often
STEP_BYTES = 400  # a lowered step: its tuple, positions and kernel (tests/test_caches.py checks)
PROGRAM_NODE_BYTES = 600  # code, names and bindings per node (tests/test_caches.py checks)
_SERIAL = itertools.count()
NO_BUFFER = -1


class Step(NamedTuple):
    """One node of a program, lowered: what both tiers run."""

    node: int  # position: its value's key
    fn: Any  # the kernel; for a constant (or a folded node) its value
    args: tuple[int, ...]  # positions read (aliases resolved)
    into: int  # the dead input whose buffer the result is written into (`out=`), or NO_BUFFER
    check: bool  # check cancellation first
    dead: tuple[int, ...]  # values last used here: freed after it
    const: bool
    name: str  # the node's name and op, for comments and errors
    op: str


# A Step from a tuple of its fields without NamedTuple's Python-level __new__ (a step per node)
_new_step = tuple.__new__


class Chunk(NamedTuple):
    """Steps `start:end` of a program, which a generated function holds."""

    start: int
    end: int
    loads: tuple[tuple[int, bool], ...]  # values made earlier or fed; True: later chunks read it
    stores: tuple[int, ...]  # values later chunks or the caller read


ChunkFn = Callable[[Values, Callable[[], None]], None]


class Compiled:
    """The compiled tier of a program: its chunks as Python functions (in the plan cache)."""

    __slots__ = ("__weakref__", "fns", "nodes", "source", "where")

    def __init__(
        self,
        fns: list[ChunkFn],
        source: str,
        where: dict[tuple[str, int], tuple[str, str]],
        nodes: int,
    ) -> None:
        self.fns, self.source, self.where, self.nodes = fns, source, where, nodes

    def approx_bytes(self) -> int:
        return PROGRAM_NODE_BYTES * self.nodes + 2 * len(self.source)


_COMPILED: DerivedCache[int, Compiled] = DerivedCache("compiled programs")


class Program:
    """A lowered task: call it with the values it reads (consumed) to get its exports.
    Interpreted until its TIER_UP_CALLS-th call, then compiled (see the module's doc)."""

    __slots__ = (
        "_calls",
        "_compilable",
        "_compiled",
        "aliased",
        "chunks",
        "const_bytes",
        "exports",
        "nodes",
        "serial",
        "steps",
        "total",
    )

    def __init__(
        self,
        steps: tuple[Step, ...],
        chunks: tuple[Chunk, ...],
        exports: tuple[int, ...],
        aliased: tuple[tuple[int, int, bool], ...],
        nodes: int,
        const_bytes: int,
    ) -> None:
        self.steps, self.chunks, self.exports, self.aliased = steps, chunks, exports, aliased
        self.nodes, self.const_bytes, self.total = nodes, const_bytes, len(steps)
        self.serial = next(_SERIAL)
        self._calls = 0
        self._compiled: weakref.ref[Compiled] | None = None
        self._compilable = True  # False once its compiled tier proved larger than the cache

    def approx_bytes(self) -> int:
        """Estimated memory (what the plan cache counts): the steps and constants; the compiled
        tier is an entry of its own."""
        return STEP_BYTES * self.nodes + self.const_bytes

    @property
    def tier(self) -> str:
        return "compiled" if self._live() is not None else "interpreted"

    @property
    def source(self) -> str:
        """The generated Python (rendered on demand: the interpreted tier has none)."""
        compiled = self._live()
        return (
            compiled.source
            if compiled is not None
            else "\n\n".join(_render(self, c)[0] for c in self.chunks)
        )

    def compiled(self) -> Compiled:
        """The compiled tier, made now if it is not held. The plan cache holds it (an entry of
        its own, counted in bytes); the program only refers to it, so when the cache drops it the
        program is interpreted again until its next tier-up. One larger than the cache's whole
        budget is used once and the program stays interpreted."""
        compiled = _COMPILED.get_or_make(self.serial, lambda: _compile(self))
        if _COMPILED.get(self.serial) is compiled:
            self._compiled = weakref.ref(compiled)
        else:
            self._compiled, self._compilable = None, False
        return compiled

    def _live(self) -> Compiled | None:
        ref = self._compiled
        return ref() if ref is not None else None

    def __call__(self, values: Values, cancel: Cancellation) -> dict[int, np.ndarray]:
        self._calls = calls = self._calls + 1
        ref = self._compiled
        compiled = ref() if ref is not None else None
        if compiled is None:
            if calls >= TIER_UP_CALLS and self._compilable:
                compiled = self.compiled()
        elif calls % TOUCH_EVERY == 0:
            _COMPILED.get(self.serial)  # in use: the cache's LRU drops it last
        check = cancel.check
        if compiled is None:
            with np.errstate(all="ignore"):  # NaN and infinity are values like any other
                self._interpret(values, check)
            return {i: np.asarray(values[i]) for i in self.exports}
        try:
            with np.errstate(all="ignore"):
                for fn in compiled.fns:
                    fn(values, check)
        except GraphError:
            raise  # cancelled, or a deadline passed: not the op's fault
        except (ValueError, ArithmeticError) as e:
            node, op = _failed(compiled, e)
            raise ExecutionError(f"op '{op}' failed: {e}", node=node) from e
        return {i: np.asarray(values[i]) for i in self.exports}

    def _interpret(self, env: Values, check: Callable[[], None]) -> None:
        """Run the steps one by one over `env`: what the generated chunks do, without locals
        (a value lives in `env` until the step that frees it)."""
        step = None
        try:
            for step in self.steps:
                i, fn, args, into, chk, dead, const, _, _ = step
                if chk:
                    check()
                if const:
                    env[i] = fn
                elif into != NO_BUFFER:
                    env[i] = fn(*[env[a] for a in args], out=env[into])
                elif len(args) == 1:
                    env[i] = fn(env[args[0]])
                elif len(args) == 2:
                    env[i] = fn(env[args[0]], env[args[1]])
                else:
                    env[i] = fn(*[env[a] for a in args])
                for d in dead:
                    del env[d]
        except GraphError:
            raise  # cancelled, or a deadline passed: not the op's fault
        except (ValueError, ArithmeticError) as e:
            assert step is not None
            raise ExecutionError(f"op '{step.op}' failed: {e}", node=step.name) from e
        for i, j, own in self.aliased:
            env[i] = np.array(env[j]) if own else env[j]


def _failed(compiled: Compiled, e: BaseException) -> tuple[str, str]:
    tb, found = e.__traceback__, ("?", "?")
    while tb is not None:
        key = (tb.tb_frame.f_code.co_filename, tb.tb_lineno)
        found = compiled.where.get(key, found)
        tb = tb.tb_next
    return found


def compile_program(graph: Graph, nodes: Sequence[int], exports: Iterable[int]) -> Program:
    """The program evaluating `nodes` (topological order) and returning `exports`, lowered
    (its compiled tier is made when it is called again: `Program.compiled`)."""
    keep = tuple(dict.fromkeys(exports))
    known, alias = _simplify(graph, nodes)
    input_pos, ops, types = graph.input_pos, graph.ops, graph.types
    computed = [i for i in nodes if i not in alias and i not in known]
    # what each computed node reads, aliases resolved
    args_of = {
        i: tuple([alias.get(j, j) for j in input_pos[i]]) if alias else input_pos[i]
        for i in computed
    }
    read = {j for i in computed for j in args_of[i]}
    kept = {alias.get(i, i) for i in keep}
    order = [i for i in nodes if i not in alias and (i not in known or i in read or i in kept)]
    last: dict[int, int] = {}
    viewed: set[int] = set()  # read by an op that is not in-place (its result may be a view)
    for k, i in enumerate(order):
        last.setdefault(i, k)
        args = args_of.get(i, ())
        for j in args:
            last[j] = k
        if args and not ops[i].inplace:
            viewed.update(args)
    # A buffer an op may overwrite: made here by an in-place op, never a view (every reader
    # is an in-place ufunc, so no reshape or transpose of it lives on), not exported.
    scratch = {
        i
        for i in computed
        if ops[i].inplace and types[i].shape and i not in kept and i not in viewed
    }
    steps: list[Step] = []
    chunks = []
    for start in range(0, max(len(order), 1), CHUNK):
        part = order[start : start + CHUNK]
        chunks.append(_lower(graph, part, start, last, args_of, kept, known, scratch, steps))
    made = set(order) - set(known)
    aliased = tuple((i, alias[i], alias[i] not in made) for i in keep if i in alias)
    consts = sum(known[i].nbytes for i in order if i in known)
    return Program(tuple(steps), tuple(chunks), keep, aliased, len(nodes), consts)


def _simplify(graph: Graph, nodes: Sequence[int]) -> tuple[dict[int, np.ndarray], dict[int, int]]:
    """Constant values (constants, and nodes of constants folded: the kernel run once, the same
    bits) and aliases: a node equal to an earlier one (common subexpressions) or to one of its
    inputs (x * 1, x / 1, x ** 1, x - 0, a reshape or broadcast to the same type: exact)."""
    known: dict[int, np.ndarray] = {}
    alias: dict[int, int] = {}
    seen: dict[tuple[Any, ...], int] = {}
    for i in nodes:
        op, t = graph.ops[i], graph.types[i]
        ins = tuple([alias.get(j, j) for j in graph.input_pos[i]]) if alias else graph.input_pos[i]
        if op is CONSTANT:
            known[i] = graph.nodes[i].attrs["value"]
            continue
        if ins and ins[0] in known and all(j in known for j in ins) and t.size <= FOLD_ELEMENTS:
            value = _fold(graph, i, [known[j] for j in ins])
            if value is not None:
                known[i] = value
                continue
        same = _identity_of(graph, i, ins, known)
        if same is not None:
            alias[i] = same
            if same in known:
                known[i] = known[same]
            continue
        key = _cse_key(graph, i, ins)
        if key is not None:
            first = seen.setdefault(key, i)
            if first != i:
                alias[i] = first
    return known, alias


def _fold(graph: Graph, i: int, args: list[np.ndarray]) -> np.ndarray | None:
    """The node's value from constant inputs; None where its op fails (it fails at run time,
    naming the node)."""
    node, op = graph.nodes[i], graph.ops[i]
    try:
        with np.errstate(all="ignore"):
            kernel = op.lower(node.attrs, [graph.types[j] for j in graph.input_pos[i]])
            value = np.array(kernel(*args))  # a copy: owned, then frozen below
    except (ValueError, ArithmeticError, TypeError):
        return None
    value.flags.writeable = False  # bound into every call: nothing may write it
    return value


def _identity_of(
    graph: Graph, i: int, ins: tuple[int, ...], known: dict[int, np.ndarray]
) -> int | None:
    """The input whose value node `i` equals bit for bit, if any."""
    op, t = graph.ops[i].name, graph.types[i]
    if op in ("reshape", "broadcast_to"):
        return ins[0] if graph.types[ins[0]] == t else None
    if len(ins) != 2 or not (ins[0] in known or ins[1] in known):
        return None
    a, b = ins
    if op in _RIGHT_IDENTITY and b in known and graph.types[a] == t:
        c = known[b]
        if op == "sub":  # x - (+0) is x (and -0 - +0 is -0); x + 0 is not (-0 + 0 is +0)
            return a if not np.any(c) and not np.signbit(c).any() else None
        return a if bool(np.all(c == 1)) else None
    if op == "mul" and a in known and graph.types[b] == t and bool(np.all(known[a] == 1)):
        return b
    return None


_RIGHT_IDENTITY = ("mul", "div", "pow", "sub")


def _cse_key(graph: Graph, i: int, ins: tuple[int, ...]) -> tuple[Any, ...] | None:
    attrs = graph.nodes[i].attrs
    if not attrs:
        return (graph.ops[i].name, ins, ())
    if graph.ops[i] is CONSTANT or any(isinstance(v, np.ndarray) for v in attrs.values()):
        return None
    return (graph.ops[i].name, ins, tuple(sorted(attrs.items())))


def _copy_aliases(
    pairs: list[tuple[int, int, bool]],
) -> Callable[[Values, Callable[[], None]], None]:
    """Exports equal to another value; copied where that value is not made here (a feed the
    caller holds, a constant bound into the program)."""

    def copy(values: Values, check: Callable[[], None]) -> None:
        for i, j, own in pairs:
            values[i] = np.array(values[j]) if own else values[j]

    return copy


def _costly(graph: Graph, i: int, memo: dict[tuple[Any, ...], bool]) -> bool:
    """Whether the op may take a while; `memo` holds the answers for ops without attributes,
    which depend on the op and the types alone."""
    op, t, attrs = graph.ops[i], graph.types[i], graph.nodes[i].attrs
    ins = [graph.types[j] for j in graph.input_pos[i]]
    key = (op.name, t.shape, t.dtype, *[(x.shape, x.dtype) for x in ins])  # hashed in C
    costly = None if attrs else memo.get(key)
    if costly is None:
        costly = op.flops(ins, t, attrs) >= CHECK_ELEMENTS
        if not attrs:
            memo[key] = costly
    return costly


def _dead_buffer(
    graph: Graph,
    i: int,
    k: int,
    args: tuple[int, ...],
    mine: set[int],
    last: dict[int, int],
    scratch: set[int],
) -> int | None:
    """An input of node `i` (the k-th evaluated, reading `args`) whose buffer its op may write
    its result into: a scratch buffer of the output's type made in this chunk and read for the
    last time here."""
    if not graph.ops[i].inplace or not graph.types[i].shape:
        return None
    for j in args:
        if j in scratch and j in mine and last[j] == k and graph.types[j] == graph.types[i]:
            return j
    return None


def _lower(
    graph: Graph,
    part: list[int],
    start: int,
    last: dict[int, int],
    args_of: dict[int, tuple[int, ...]],
    kept: set[int],
    known: dict[int, np.ndarray],
    scratch: set[int],
    steps: list[Step],
) -> Chunk:
    """Append the steps of the nodes `part` (the `start`-th onwards) to `steps`: its chunk."""
    end = start + len(part)
    mine = set(part)
    # Values made by earlier chunks or fed: popped when nothing after this chunk reads them.
    loads: dict[int, bool] = {}
    for i in part:
        for j in args_of.get(i, ()):
            if j not in mine and j not in loads:
                loads[j] = last.get(j, -1) >= end or j in kept
    since_check = CHECK_EVERY  # a chunk checks before its first op
    costly: dict[tuple[Any, ...], bool] = {}
    nodes, ops, types, input_pos = graph.nodes, graph.ops, graph.types, graph.input_pos
    for k, i in enumerate(part, start):
        node, op = nodes[i], ops[i]
        args = args_of.get(i, ())
        # values last read here (or never read): freed after this step (what a chunk reads is
        # made in it or loaded, so every one is its to free)
        dead = [j for j in args if last[j] == k and j not in kept]
        if last[i] == k and i not in kept:
            dead.append(i)
        if len(dead) > 1:
            dead = sorted(set(dead))
        if i in known:
            opname = CONSTANT.name if op is CONSTANT else op.name
            fields = (i, known[i], (), NO_BUFFER, False, tuple(dead), True, node.name, opname)
            steps.append(_new_step(Step, fields))
            continue
        fn = op.lower(node.attrs, [types[j] for j in input_pos[i]])
        into = _dead_buffer(graph, i, k, args, mine, last, scratch)
        check = since_check >= CHECK_EVERY or _costly(graph, i, costly)
        if check:
            since_check = 0
        since_check += 1
        into = NO_BUFFER if into is None else into
        step = (i, fn, args, into, check, tuple(dead), False, node.name, op.name)
        steps.append(_new_step(Step, step))
    stores = tuple(i for i in part if i in kept or last[i] >= end)
    return Chunk(start, end, tuple(loads.items()), stores)


def _render(
    program: Program, chunk: Chunk
) -> tuple[str, dict[str, Any], dict[int, tuple[str, str]]]:
    """The chunk's generated Python, the globals it binds, and its lines' (node, op)."""
    binds: dict[str, Any] = {}
    body = [
        f"v{j} = env{'[' if later else '.pop('}{j}{']' if later else ')'}"
        for j, later in chunk.loads
    ]
    where: dict[int, tuple[str, str]] = {}
    for i, fn, args, into, check, dead, const, name, op in program.steps[chunk.start : chunk.end]:
        if const:
            binds[f"c{i}"] = fn
            body.append(f"v{i} = c{i}  # {name!r}{'' if op == CONSTANT.name else ' (folded)'}")
        else:
            binds[f"k{i}"] = fn
            call = ", ".join(f"v{j}" for j in args)
            if into != NO_BUFFER:
                call += f", out=v{into}"  # its value dies here: its buffer is reused
            if check:
                body.append("check()")
            body.append(f"v{i} = k{i}({call})  # {name!r} {op}")
            where[len(body)] = (name, op)
        if dead:
            body.append(f"del {', '.join(f'v{j}' for j in dead)}")
    body += [f"env[{i}] = v{i}" for i in chunk.stores]
    source = "def chunk(env, check):\n" + "".join(f"    {line}\n" for line in body or ["pass"])
    return source, binds, where


def _compile(program: Program) -> Compiled:
    fns: list[ChunkFn] = []
    sources: list[str] = []
    where: dict[tuple[str, int], tuple[str, str]] = {}
    for chunk in program.chunks:
        source, binds, lines = _render(program, chunk)
        filename = (
            f"<graphgrad program {program.serial}: nodes {chunk.start}-{chunk.end - 1} "
            f"of {program.total}>"
        )
        offset = 1  # the body's first line is line 2
        where.update({(filename, n + offset): w for n, w in lines.items()})
        # Kernels and constants are the function's globals (dict lookups with inline caches):
        # binding thousands of them as parameters costs quadratic time in CPython's call.
        namespace: dict[str, Any] = dict(binds)
        exec(compile(source, filename, "exec"), namespace)
        fns.append(namespace["chunk"])
        sources.append(source)
    if program.aliased:
        fns.append(_copy_aliases(list(program.aliased)))
    return Compiled(fns, "\n\n".join(sources), where, program.nodes)
