"""Batched training: N networks of one template trained together, every step in one call.

The template computes one network's scalar loss on one batch. `ChunkTrainer` stacks a chunk
of networks with the batching transform, so a step over all of them is one pass of a few
numpy calls per op. Minibatches are drawn per network from a generator keyed by (seed,
network index, epoch), so results do not depend on how networks are chunked or on resuming.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from .autodiff import RunRequest
from .batching import batch_graph
from .errors import RequestError
from .executor import Cancellation, LocalExecutor
from .ir import Graph
from .lru import LRU

Arrays = dict[str, np.ndarray]


@dataclass(frozen=True)
class SGD:
    """Stochastic gradient descent with optional momentum (PyTorch's formulation)."""

    lr: float = 0.1
    momentum: float = 0.0

    def init(self, params: Arrays) -> Arrays:
        return {k: np.zeros_like(v) for k, v in params.items()} if self.momentum else {}

    def update(self, params: Arrays, grads: Arrays, state: Arrays, step: int) -> None:
        for k, g in grads.items():
            if self.momentum:
                state[k] = self.momentum * state[k] + g
                g = state[k]
            params[k] = params[k] - self.lr * g


@dataclass(frozen=True)
class Adam:
    """Adam (Kingma & Ba), with bias correction."""

    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def init(self, params: Arrays) -> Arrays:
        state = {f"m:{k}": np.zeros_like(v) for k, v in params.items()}
        state |= {f"v:{k}": np.zeros_like(v) for k, v in params.items()}
        return state

    def update(self, params: Arrays, grads: Arrays, state: Arrays, step: int) -> None:
        t = step + 1
        for k, g in grads.items():
            m = state[f"m:{k}"] = self.beta1 * state[f"m:{k}"] + (1 - self.beta1) * g
            v = state[f"v:{k}"] = self.beta2 * state[f"v:{k}"] + (1 - self.beta2) * g * g
            m_hat = m / (1 - self.beta1**t)
            v_hat = v / (1 - self.beta2**t)
            params[k] = params[k] - self.lr * m_hat / (np.sqrt(v_hat) + self.eps)


Optimizer = SGD | Adam


@dataclass
class ChunkState:
    """Where a chunk of networks is: checkpointable and resumable."""

    step: int
    params: Arrays
    opt_state: Arrays
    history: np.ndarray  # [n, steps] loss per network per step (NaN where not yet run)

    def writable(self) -> ChunkState:
        """A copy the next steps may write to (states from Ray's object store are read-only)."""
        return ChunkState(
            self.step,
            {k: v.copy() for k, v in self.params.items()},
            {k: v.copy() for k, v in self.opt_state.items()},
            self.history.copy(),
        )


@dataclass
class TrainSpec:
    """One training job over networks [offset, offset + n) of one template."""

    template: Graph
    loss: str
    params: Arrays  # name -> [n, ...]
    data: Arrays  # name -> [n, S, ...] (per network) or [S, ...] (shared)
    optimizer: Optimizer
    steps: int
    batch_size: int | None = None
    seed: int = 0
    offset: int = 0  # global index of the first network (keys its data shuffling)
    per_network: frozenset[str] = field(default_factory=frozenset)  # data with a network axis

    @property
    def n(self) -> int:
        return len(next(iter(self.params.values())))


def check_spec(spec: TrainSpec) -> None:
    graph = spec.template
    inputs = {
        node.name: t for node, t in zip(graph.nodes, graph.types, strict=True) if node.op == "input"
    }
    if spec.loss not in graph.index or graph.types[graph.index[spec.loss]].shape != ():
        raise RequestError(
            f"the loss '{spec.loss}' must be a scalar node of the template", field="loss"
        )
    missing = set(inputs) - set(spec.params) - set(spec.data)
    if missing:
        raise RequestError(f"inputs {sorted(missing)} are neither params nor data", field="data")
    ns = {len(v) for v in spec.params.values()}
    if len(ns) != 1:
        raise RequestError(
            f"params disagree on the number of networks: {sorted(ns)}", field="params"
        )
    for name, value in spec.params.items():
        t = inputs.get(name)
        if t is None:
            raise RequestError(f"param '{name}' is not an input of the template", field="params")
        if value.shape[1:] != t.shape or value.dtype.name != t.dtype:
            raise RequestError(
                f"param '{name}' must be [N, *{t.shape}] {t.dtype}, got "
                f"{value.shape} {value.dtype.name}",
                field=f"params['{name}']",
            )
    for name, value in spec.data.items():
        t = inputs.get(name)
        if t is None:
            raise RequestError(f"data '{name}' is not an input of the template", field="data")
        rows = t.shape[1:]
        if value.shape[-len(rows) or None :] != rows and rows:
            raise RequestError(
                f"data '{name}' rows must have shape {rows}, got {value.shape}",
                field=f"data['{name}']",
            )


_STACKED: LRU[tuple[str, str, frozenset[str], int], tuple[Graph, str]] = LRU(64)


def stacked(template: Graph, loss: str, batched: frozenset[str], n: int) -> tuple[Graph, str]:
    """The stacked graph and its loss node, built once per process (a job's segments reuse
    it, with the plans memoised on it)."""

    def make() -> tuple[Graph, str]:
        graph, refs = batch_graph(template, set(batched), n)
        return graph, refs[loss].name

    return _STACKED.get_or_make((template.fingerprint, loss, batched, n), make)


class ChunkTrainer:
    """Trains the networks of one spec; `run` goes from any state to any later step."""

    def __init__(self, spec: TrainSpec) -> None:
        check_spec(spec)
        self.spec = spec
        batched = set(spec.params) | set(spec.per_network)
        if spec.batch_size is not None:
            batched |= set(spec.data)  # every network draws its own minibatches
        self.graph, self.loss = stacked(spec.template, spec.loss, frozenset(batched), spec.n)
        self.params = tuple(spec.params)
        self.executor = LocalExecutor()
        sizes = {
            name: v.shape[1] if name in spec.per_network else v.shape[0]
            for name, v in spec.data.items()
        }
        self.samples = min(sizes.values()) if sizes else 0
        self._perm_epoch, self._perms = -1, np.zeros((0, 0), dtype=np.int64)

    def initial_state(self) -> ChunkState:
        params = {k: v.copy() for k, v in self.spec.params.items()}
        history = np.full((self.spec.n, self.spec.steps), np.nan, dtype=np.float64)
        return ChunkState(0, params, self.spec.optimizer.init(params), history)

    def _batch(self, step: int) -> Arrays:
        spec = self.spec
        if spec.batch_size is None:
            return dict(spec.data)
        b = spec.batch_size
        per_epoch = max(self.samples // b, 1)
        epoch, offset = divmod(step, per_epoch)
        if epoch != self._perm_epoch:
            self._perms = np.stack(
                [
                    np.random.default_rng([spec.seed, spec.offset + j, epoch]).permutation(
                        self.samples
                    )
                    for j in range(spec.n)
                ]
            )
            self._perm_epoch = epoch
        idx = self._perms[:, offset * b : (offset + 1) * b]  # [n, b]
        rows = np.arange(spec.n)[:, None]
        return {
            name: (v[rows, idx] if name in spec.per_network else v[idx])
            for name, v in spec.data.items()
        }

    def step(self, state: ChunkState, cancel: Cancellation | None = None) -> None:
        spec = self.spec
        feeds = {**state.params, **self._batch(state.step)}
        loss_type = self.graph.types[self.graph.index[self.loss]]
        seed = np.ones(loss_type.shape, loss_type.dtype)
        res = self.executor.run(
            self.graph, RunRequest((self.loss,), feeds, self.params, {self.loss: seed}), cancel
        )
        state.history[:, state.step] = res.values[self.loss]
        spec.optimizer.update(state.params, res.grads, state.opt_state, state.step)
        state.step += 1

    def run(
        self,
        state: ChunkState,
        until: int | None = None,
        on_step: Callable[[ChunkState], None] | None = None,
        cancel: Cancellation | None = None,
    ) -> ChunkState:
        until = self.spec.steps if until is None else min(until, self.spec.steps)
        while state.step < until:
            if cancel is not None:
                cancel.check()
            self.step(state, cancel)
            if on_step is not None:
                on_step(state)
        return state


def split(spec: TrainSpec, chunks: int) -> list[TrainSpec]:
    """The spec cut into `chunks` specs over consecutive networks."""
    bounds = np.linspace(0, spec.n, chunks + 1).astype(int)
    out = []
    for lo, hi in itertools.pairwise(bounds):
        if hi > lo:
            out.append(
                dataclasses.replace(
                    spec,
                    params={k: v[lo:hi] for k, v in spec.params.items()},
                    data={
                        k: (v[lo:hi] if k in spec.per_network else v) for k, v in spec.data.items()
                    },
                    offset=spec.offset + int(lo),
                )
            )
    return out


def classify_data(
    template: Graph, data: Mapping[str, np.ndarray], n: int, batch_size: int | None
) -> frozenset[str]:
    """Which data arrays carry a leading network axis: those with one more axis than a batch."""
    per_network = set()
    for name, value in data.items():
        t = template.types[template.index[name]]
        if value.ndim == len(t.shape) + 1 and value.shape[0] == n:
            per_network.add(name)
        elif value.ndim != len(t.shape):
            raise RequestError(
                f"data '{name}' must be [N, S, ...] or [S, ...] with rows "
                f"{t.shape[1:]}, got {value.shape}",
                field=f"data['{name}']",
            )
        if batch_size is not None and (
            t.shape[:1] != (batch_size,)
            or value.shape[value.ndim - len(t.shape) + 1 :] != t.shape[1:]
        ):
            raise RequestError(
                f"data '{name}': the template input {t.shape} holds one minibatch, "
                f"so it must be [batch_size={batch_size}, *rows] with the rows of "
                f"the data {value.shape}",
                field=f"data['{name}']",
            )
        if batch_size is None and value.shape[-len(t.shape) :] != t.shape:
            raise RequestError(
                f"data '{name}': without batch_size each step uses all samples, "
                f"so they must match the template input {t.shape}, got "
                f"{value.shape}",
                field=f"data['{name}']",
            )
    return frozenset(per_network)
