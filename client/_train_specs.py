"""`client.train(...)`'s arguments as engine training specs, one per template (both clients
build them; the remote one then encodes them with graphgrad.wire)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from graphgrad._builder import Tensor
from graphgrad.engine import Graph, Optimizer, RequestError, TrainSpec, check_settings, within

ArrayMap = Mapping[str, Any]


def build_specs(
    loss: Tensor | Sequence[Tensor],
    params: ArrayMap | Sequence[ArrayMap],
    data: ArrayMap | Sequence[ArrayMap] | None,
    optimizer: Optimizer,
    steps: int,
    batch_size: int | None,
    seed: int,
) -> list[TrainSpec]:
    """One spec per template; `params`/`data` are given per template (or data once for all)."""
    losses = [loss] if isinstance(loss, Tensor) else list(loss)
    param_list = [params] if isinstance(params, Mapping) else list(params)
    data_list = (
        [data or {}] * len(losses) if data is None or isinstance(data, Mapping) else list(data)
    )
    if not len(losses) == len(param_list) == len(data_list):
        raise RequestError(
            f"{len(losses)} losses but {len(param_list)} params and "
            f"{len(data_list)} data mappings: give one per template",
            field="templates",
        )
    check_settings(optimizer, steps, batch_size, seed)
    specs = []
    for k, (L, p, d) in enumerate(zip(losses, param_list, data_list, strict=True)):
        graph = L.graph.freeze()
        with within(f"templates[{k}]"):
            specs.append(
                TrainSpec.build(
                    graph,
                    L.name,
                    {n: _array(graph, "params", n, v) for n, v in p.items()},
                    {n: _array(graph, "data", n, v) for n, v in d.items()},
                    optimizer,
                    steps,
                    batch_size,
                    seed,
                )
            )
    return specs


def _array(graph: Graph, kind: str, name: str, value: Any) -> np.ndarray:
    """Arrays as given; anything else (lists, numbers) in the dtype of the input it feeds."""
    if isinstance(value, np.ndarray):
        return value
    i = graph.index.get(name)
    try:
        return np.asarray(value, dtype=None if i is None else graph.types[i].dtype)
    except (TypeError, ValueError) as e:
        raise RequestError(
            f"{kind} '{name}' is not an array of numbers: {e}", field=f"{kind}['{name}']"
        ) from e
