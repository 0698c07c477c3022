"""Turning the SDK's friendly `run` arguments into the engine's graph and RunRequest."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from graphgrad import engine
from graphgrad._builder import Graph, Tensor, _current
from graphgrad.engine import RunRequest

NodeRef = Tensor | str


def as_list(refs: NodeRef | Sequence[NodeRef] | None) -> list[NodeRef]:
    if refs is None:
        return []
    if isinstance(refs, Tensor | str):
        return [refs]
    return list(refs)


def name_of(ref: NodeRef, what: str) -> str:
    if isinstance(ref, Tensor):
        return ref.name
    if isinstance(ref, str):
        return ref
    raise TypeError(f"{what} must be graph nodes or node names, got {type(ref).__name__}")


def find_graph(*groups: Sequence[Any]) -> Graph:
    """The builder graph the request is about: that of any node given, else the active one."""
    graphs = {id(r.graph): r.graph for group in groups for r in group if isinstance(r, Tensor)}
    if len(graphs) > 1:
        raise ValueError("the outputs, feeds and wrt of one run must belong to one graph")
    if graphs:
        return next(iter(graphs.values()))
    active = _current.get()
    if active is None:
        raise ValueError("outputs are given by name only: pass nodes, or run inside `with graph:`")
    return active


def build_request(
    outputs: NodeRef | Sequence[NodeRef],
    feeds: Mapping[NodeRef, Any] | None,
    wrt: NodeRef | Sequence[NodeRef] | None,
    grad_outputs: Mapping[NodeRef, Any] | None,
) -> tuple[Graph, engine.Graph, RunRequest]:
    outs, wrts = as_list(outputs), as_list(wrt)
    feeds = dict(feeds or {})
    builder = find_graph(outs, wrts, list(feeds), list(grad_outputs or {}))
    graph = builder.freeze()
    request = RunRequest(
        outputs=tuple(name_of(o, "outputs") for o in outs),
        feeds=typed_feeds(graph, feeds),
        wrt=tuple(name_of(w, "wrt") for w in wrts),
        grad_outputs=named_seeds(grad_outputs),
    )
    return builder, graph, request


def typed_feeds(graph: engine.Graph, feeds: Mapping[NodeRef, Any] | None) -> dict[str, np.ndarray]:
    """Feeds by input name; lists and Python numbers take the declared dtype, arrays are
    checked (by the engine or the server), never cast."""
    typed = {}
    for key, value in (feeds or {}).items():
        name = name_of(key, "feed keys")
        if not isinstance(value, np.ndarray):
            i = graph.index.get(name)
            value = np.asarray(value, dtype=graph.types[i].dtype if i is not None else None)
        typed[name] = value
    return typed


def named_seeds(grad_outputs: Mapping[NodeRef, Any] | None) -> dict[str, np.ndarray] | None:
    if grad_outputs is None:
        return None
    return {name_of(k, "grad_outputs keys"): np.asarray(v) for k, v in grad_outputs.items()}
