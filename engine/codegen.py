"""Compiled programs: a task's nodes as straight-line Python, generated once per task.

Each node becomes one line calling its op's kernel (bound as a local of the generated
function), with the node's name in a comment; a value is deleted right after its last use;
constants are bound once (hoisted), and a node whose op, attributes and inputs repeat an
earlier node's is not computed again (common subexpressions give identical bits). Large
programs are generated in chunks of CHUNK nodes, so compile time stays linear in the
node count. An op that fails raises an ExecutionError naming its node.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from graphgrad.engine.cancel import Cancellation
from graphgrad.engine.errors import ExecutionError, GraphError
from graphgrad.engine.ir import Graph
from graphgrad.engine.ops import CONSTANT

Values = dict[int, Any]
CHUNK = 2000  # nodes per generated function
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

    def approx_bytes(self) -> int:
        """Estimated memory (what the plan cache counts): code, bindings and source."""
        return PROGRAM_NODE_BYTES * self.nodes + 2 * len(self.source)

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
    # Common subexpressions: a node equal to an earlier one (op, attributes, inputs) reuses it.
    alias: dict[int, int] = {}
    seen: dict[tuple[Any, ...], int] = {}
    for i in nodes:
        ins = tuple(alias.get(j, j) for j in graph.input_pos[i])
        key = _cse_key(graph, i, ins)
        if key is not None:
            first = seen.setdefault(key, i)
            if first != i:
                alias[i] = first
    order = [i for i in nodes if i not in alias]
    last: dict[int, int] = {}
    for k, i in enumerate(order):
        last.setdefault(i, k)
        for j in graph.input_pos[i]:
            last[alias.get(j, j)] = k
    kept = {alias.get(i, i) for i in keep}
    chunks, sources, where = [], [], {}
    for start in range(0, max(len(order), 1), CHUNK):
        part = order[start : start + CHUNK]
        fn, source, lines = _chunk(graph, part, start, last, alias, kept, len(order))
        chunks.append(fn)
        sources.append(source)
        where.update(lines)
    aliased = [(i, alias[i]) for i in keep if i in alias]
    if aliased:
        chunks.append(_copy_aliases(aliased))
    return Program("\n\n".join(sources), keep, tuple(chunks), where, len(nodes))


def _cse_key(graph: Graph, i: int, ins: tuple[int, ...]) -> tuple[Any, ...] | None:
    attrs = graph.nodes[i].attrs
    if graph.ops[i] is CONSTANT or any(isinstance(v, np.ndarray) for v in attrs.values()):
        return None
    return (graph.ops[i].name, ins, tuple(sorted(attrs.items())))


def _copy_aliases(pairs: list[tuple[int, int]]) -> Callable[[Values, Callable[[], None]], None]:
    def copy(values: Values, check: Callable[[], None]) -> None:
        for i, j in pairs:
            values[i] = values[j]

    return copy


def _chunk(
    graph: Graph,
    part: list[int],
    start: int,
    last: dict[int, int],
    alias: dict[int, int],
    kept: set[int],
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
        for j in graph.input_pos[i]:
            j = alias.get(j, j)
            if j not in mine and j not in loaded:
                loaded.add(j)
                later = last.get(j, -1) >= end or j in kept
                body.append(f"{v(j)} = env{'[' if later else '.pop('}{j}{']' if later else ')'}")
    for k, i in enumerate(part, start):
        node, op = graph.nodes[i], graph.ops[i]
        if op is CONSTANT:
            binds[f"c{i}"] = node.attrs["value"]
            body.append(f"v{i} = c{i}  # {node.name!r}")
        else:
            binds[f"k{i}"] = op.lower(node.attrs, [graph.types[j] for j in graph.input_pos[i]])
            args = ", ".join(v(j) for j in graph.input_pos[i])
            body.append("check()")
            body.append(f"v{i} = k{i}({args})  # {node.name!r} {op.name}")
            where[len(body)] = (node.name, op.name)
        dead = [
            j
            for j in sorted({alias.get(j, j) for j in (*graph.input_pos[i], i)})
            if j not in kept and last[j] == k and (j in mine or j in loaded)
        ]
        if dead:
            body.append(f"del {', '.join(f'v{j}' for j in dead)}")
    for i in part:
        if i in kept or last[i] >= end:
            body.append(f"env[{i}] = v{i}")
    filename = f"<graphgrad program {next(_SERIAL)}: nodes {start}-{end - 1} of {total}>"
    params = ", ".join(binds)
    header = f"def make({params}):\n    def chunk(env, check):\n"
    source = header + "".join(f"        {line}\n" for line in body or ["pass"])
    source += "    return chunk\n"
    offset = 2  # the body's first line is line 3
    lines = {(filename, n + offset): w for n, w in where.items()}
    namespace: dict[str, Any] = {}
    exec(compile(source, filename, "exec"), namespace)
    return namespace["make"](**binds), source, lines
