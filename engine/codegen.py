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
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .cancel import Cancellation
from .errors import ExecutionError, GraphError
from .ir import Graph
from .ops import CONSTANT

Values = dict[int, Any]
CHUNK = 2000  # nodes per generated function
# Cancellation is checked before every op that may take a while, and every CHECK_EVERY ops.
CHECK_EVERY, CHECK_ELEMENTS = 16, 1 << 16
FOLD_ELEMENTS = 4096  # nodes of constants with at most this many elements are folded
PROGRAM_NODE_BYTES = 600  # code, names and bindings per node (tests/test_caches.py checks)
_SERIAL = itertools.count()


@dataclass(frozen=True, slots=True, eq=False)
class Program:
    """A compiled task: call it with the values it reads (consumed) to get its exports."""

    source: str  # the generated Python, for reading (see Explanation.source)
    exports: tuple[int, ...]
    chunks: tuple[Callable[[Values, Callable[[], None]], None], ...]
    where: dict[tuple[str, int], tuple[str, str]]  # (file, line) -> (node, op)
    nodes: int
    const_bytes: int = 0  # constants bound into the program (folded ones included)

    def approx_bytes(self) -> int:
        """Estimated memory (what the plan cache counts): code, bindings, constants, source."""
        return PROGRAM_NODE_BYTES * self.nodes + 2 * len(self.source) + self.const_bytes

    def __call__(self, values: Values, cancel: Cancellation) -> dict[int, np.ndarray]:
        check = cancel.check
        try:
            with np.errstate(all="ignore"):  # NaN and infinity are values like any other
                for chunk in self.chunks:
                    chunk(values, check)
        except GraphError:
            raise  # cancelled, or a deadline passed: not the op's fault
        except (ValueError, ArithmeticError) as e:
            node, op = self._failed(e)
            raise ExecutionError(f"op '{op}' failed: {e}", node=node) from e
        return {i: np.asarray(values[i]) for i in self.exports}

    def _failed(self, e: BaseException) -> tuple[str, str]:
        tb, found = e.__traceback__, ("?", "?")
        while tb is not None:
            key = (tb.tb_frame.f_code.co_filename, tb.tb_lineno)
            found = self.where.get(key, found)
            tb = tb.tb_next
        return found


def compile_program(graph: Graph, nodes: Sequence[int], exports: Iterable[int]) -> Program:
    """The program evaluating `nodes` (topological order) and returning `exports`."""
    keep = tuple(dict.fromkeys(exports))
    known, alias = _simplify(graph, nodes)
    computed = [i for i in nodes if i not in alias and i not in known]
    read = {alias.get(j, j) for i in computed for j in graph.input_pos[i]}
    kept = {alias.get(i, i) for i in keep}
    order = [i for i in nodes if i not in alias and (i not in known or i in read or i in kept)]
    last: dict[int, int] = {}
    readers: dict[int, list[int]] = {}
    for k, i in enumerate(order):
        last.setdefault(i, k)
        for j in () if i in known else graph.input_pos[i]:
            last[alias.get(j, j)] = k
            readers.setdefault(alias.get(j, j), []).append(i)
    # A buffer an op may overwrite: made here by an in-place op, never a view (every reader
    # is an in-place ufunc, so no reshape or transpose of it lives on), not exported.
    scratch = {
        i
        for i in computed
        if graph.ops[i].inplace
        and graph.types[i].shape
        and i not in kept
        and all(graph.ops[r].inplace for r in readers.get(i, ()))
    }
    chunks, sources, where = [], [], {}
    for start in range(0, max(len(order), 1), CHUNK):
        part = order[start : start + CHUNK]
        fn, source, lines = _chunk(
            graph, part, start, last, alias, kept, known, scratch, len(order)
        )
        chunks.append(fn)
        sources.append(source)
        where.update(lines)
    made = set(order) - set(known)
    aliased = [(i, alias[i], alias[i] not in made) for i in keep if i in alias]
    if aliased:
        chunks.append(_copy_aliases(aliased))
    consts = sum(known[i].nbytes for i in order if i in known)
    return Program("\n\n".join(sources), keep, tuple(chunks), where, len(nodes), consts)


def _simplify(graph: Graph, nodes: Sequence[int]) -> tuple[dict[int, np.ndarray], dict[int, int]]:
    """Constant values (constants, and nodes of constants folded: the kernel run once, the same
    bits) and aliases: a node equal to an earlier one (common subexpressions) or to one of its
    inputs (x * 1, x / 1, x ** 1, x - 0, a reshape or broadcast to the same type: exact)."""
    known: dict[int, np.ndarray] = {}
    alias: dict[int, int] = {}
    seen: dict[tuple[Any, ...], int] = {}
    for i in nodes:
        op, t = graph.ops[i], graph.types[i]
        ins = tuple(alias.get(j, j) for j in graph.input_pos[i])
        if op is CONSTANT:
            known[i] = graph.nodes[i].attrs["value"]
            continue
        if ins and all(j in known for j in ins) and t.size <= FOLD_ELEMENTS:
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
    if len(ins) != 2:
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


def _costly(graph: Graph, i: int) -> bool:
    t, ins = graph.types[i], [graph.types[j] for j in graph.input_pos[i]]
    return graph.ops[i].flops(ins, t, graph.nodes[i].attrs) >= CHECK_ELEMENTS


def _dead_buffer(
    graph: Graph,
    i: int,
    k: int,
    mine: set[int],
    last: dict[int, int],
    alias: dict[int, int],
    scratch: set[int],
) -> int | None:
    """An input of node `i` (the k-th evaluated) whose buffer its op may write its result into:
    a scratch buffer of the output's type made in this chunk and read for the last time here."""
    if not graph.ops[i].inplace or not graph.types[i].shape:
        return None
    for j in graph.input_pos[i]:
        j = alias.get(j, j)
        if j in scratch and j in mine and last[j] == k and graph.types[j] == graph.types[i]:
            return j
    return None


def _chunk(
    graph: Graph,
    part: list[int],
    start: int,
    last: dict[int, int],
    alias: dict[int, int],
    kept: set[int],
    known: dict[int, np.ndarray],
    scratch: set[int],
    total: int,
) -> tuple[Callable[..., None], str, dict[tuple[str, int], tuple[str, str]]]:
    end = start + len(part)
    mine = set(part)
    binds: dict[str, Any] = {}
    body: list[str] = []
    where: dict[int, tuple[str, str]] = {}

    def v(j: int) -> str:
        return f"v{alias.get(j, j)}"

    # Values made by earlier chunks or fed: popped when nothing after this chunk reads them.
    loaded: set[int] = set()
    for i in part:
        for j in () if i in known else graph.input_pos[i]:
            j = alias.get(j, j)
            if j not in mine and j not in loaded:
                loaded.add(j)
                later = last.get(j, -1) >= end or j in kept
                body.append(f"{v(j)} = env{'[' if later else '.pop('}{j}{']' if later else ')'}")
    since_check = CHECK_EVERY  # a chunk checks before its first op
    for k, i in enumerate(part, start):
        node, op = graph.nodes[i], graph.ops[i]
        reads = () if i in known else graph.input_pos[i]
        if i in known:
            binds[f"c{i}"] = known[i]
            body.append(f"v{i} = c{i}  # {node.name!r}{'' if op is CONSTANT else ' (folded)'}")
        else:
            binds[f"k{i}"] = op.lower(node.attrs, [graph.types[j] for j in graph.input_pos[i]])
            args = ", ".join(v(j) for j in graph.input_pos[i])
            into = _dead_buffer(graph, i, k, mine, last, alias, scratch)
            if into is not None:
                args += f", out=v{into}"  # its value dies here: its buffer is reused
            if since_check >= CHECK_EVERY or _costly(graph, i):
                body.append("check()")
                since_check = 0
            since_check += 1
            body.append(f"v{i} = k{i}({args})  # {node.name!r} {op.name}")
            where[len(body)] = (node.name, op.name)
        dead = [
            j
            for j in sorted({alias.get(j, j) for j in (*reads, i)})
            if j not in kept and last[j] == k and (j in mine or j in loaded)
        ]
        if dead:
            body.append(f"del {', '.join(f'v{j}' for j in dead)}")
    for i in part:
        if i in kept or last[i] >= end:
            body.append(f"env[{i}] = v{i}")
    filename = f"<graphgrad program {next(_SERIAL)}: nodes {start}-{end - 1} of {total}>"
    # Kernels and constants are the function's globals (dict lookups with inline caches):
    # binding thousands of them as parameters costs quadratic time in CPython's call.
    source = "def chunk(env, check):\n" + "".join(f"    {line}\n" for line in body or ["pass"])
    offset = 1  # the body's first line is line 2
    lines = {(filename, n + offset): w for n, w in where.items()}
    namespace: dict[str, Any] = dict(binds)
    exec(compile(source, filename, "exec"), namespace)
    return namespace["chunk"], source, lines
