"""Batched training: N networks of one template trained together, every step in one call.

The template computes one network's scalar loss on one batch. `ChunkTrainer` stacks a chunk
of networks with the batching transform and differentiates the stacked graph (engine/grad.py);
that gradient graph is compiled once per chunk shape (engine/codegen.py) and every step, of
every segment, inline or in a Ray worker, is one call of that program: a few numpy calls per
op for all the networks. Minibatches are drawn per network from a generator keyed by (seed,
network index, epoch), so results do not depend on how networks are chunked or on resuming.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from graphgrad.engine.batching import batch_graph
from graphgrad.engine.cancel import Cancellation
from graphgrad.engine.codegen import Program, compile_program
from graphgrad.engine.errors import RequestError
from graphgrad.engine.grad import grad_graph
from graphgrad.engine.ir import Graph
from graphgrad.engine.memory import request_memory
from graphgrad.engine.ops import FLOAT_DTYPES, INPUT, TensorType
from graphgrad.engine.plan_cache import DerivedCache

Arrays = dict[str, np.ndarray]
# Bounds the loop count of a job; its memory and storage are bounded by the server's
# max_request_bytes through `job_bytes`.
MAX_STEPS = 100_000_000


def _hyper(owner: str, name: str, value: object, lo: float, hi: float, closed: str) -> None:
    """`value` must be a finite real in the interval from lo to hi; `closed` says which ends
    belong to it ("[)", "()", ...)."""
    ok = isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)
    if ok:
        v = float(value)  # type: ignore[arg-type]
        ok = (
            math.isfinite(v)
            and (lo <= v if closed[0] == "[" else lo < v)
            and (v <= hi if closed[1] == "]" else v < hi)
        )
    if not ok:
        raise RequestError(
            f"{owner} {name} must be a finite number in {closed[0]}{lo:g}, {hi:g}{closed[1]}, "
            f"got {value!r}",
            field=name,
        )


@dataclass(frozen=True)
class SGD:
    """Stochastic gradient descent with optional momentum (PyTorch's formulation)."""

    lr: float = 0.1
    momentum: float = 0.0

    def __post_init__(self) -> None:
        _hyper("SGD", "lr", self.lr, 0, math.inf, "()")
        _hyper("SGD", "momentum", self.momentum, 0, 1, "[)")  # 1 or more never forgets

    @property
    def slots(self) -> int:
        """State arrays per parameter."""
        return 1 if self.momentum else 0

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

    def __post_init__(self) -> None:
        _hyper("Adam", "lr", self.lr, 0, math.inf, "()")
        _hyper("Adam", "beta1", self.beta1, 0, 1, "[)")
        _hyper("Adam", "beta2", self.beta2, 0, 1, "[)")  # 1 divides by 1 - beta2**t = 0
        _hyper("Adam", "eps", self.eps, 0, math.inf, "()")

    @property
    def slots(self) -> int:
        return 2

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
    # Loss per network of the steps [step - len(losses), step) not yet taken by the owner
    # (a job appends them to its durable history): memory grows with a segment, not a job.
    losses: list[np.ndarray] = field(default_factory=list)

    @property
    def history(self) -> np.ndarray:
        """The losses not yet taken, [n, len(losses)]."""
        n = len(next(iter(self.params.values())))
        return np.stack(self.losses, axis=1) if self.losses else np.zeros((n, 0))

    def writable(self) -> ChunkState:
        """A copy the next steps may write to (states from Ray's object store are read-only),
        with no losses: the copy's losses are those of the steps it goes on to run."""
        return ChunkState(
            self.step,
            {k: v.copy() for k, v in self.params.items()},
            {k: v.copy() for k, v in self.opt_state.items()},
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

    def __post_init__(self) -> None:
        check_spec(self)

    @property
    def n(self) -> int:
        return len(next(iter(self.params.values())))

    @classmethod
    def build(
        cls,
        template: Graph,
        loss: str,
        params: Mapping[str, np.ndarray],
        data: Mapping[str, np.ndarray],
        optimizer: Optimizer,
        steps: int,
        batch_size: int | None = None,
        seed: int = 0,
    ) -> TrainSpec:
        """A spec checked completely: its structure against the template (as every TrainSpec)
        and every value finite. Which data carry a network axis follows from their rank."""
        spec = cls(
            template,
            loss,
            dict(params),
            dict(data),
            optimizer,
            steps,
            batch_size,
            seed,
            per_network=classify_data(template, data),
        )
        for kind, arrays in (("params", spec.params), ("data", spec.data)):
            for name, value in arrays.items():
                if not np.isfinite(value).all():
                    raise RequestError(
                        f"{_label(kind)} '{name}' holds NaN or infinite values",
                        field=f"{kind}['{name}']",
                    )
        return spec


@contextmanager
def within(prefix: str) -> Iterator[None]:
    """RequestErrors raised inside name their field under `prefix`: `params['W1']` within
    `templates[0]` becomes `templates[0].params['W1']`."""
    try:
        yield
    except RequestError as e:
        field = prefix if e.field is None else f"{prefix}.{e.field}"
        raise RequestError(f"{prefix}: {e}", field=field) from e


def _integer(name: str, value: object, lo: int, hi: int | None = None) -> None:
    ok = isinstance(value, int | np.integer) and not isinstance(value, bool)
    if ok and lo <= value and (hi is None or value <= hi):  # type: ignore[operator]
        return
    bound = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
    raise RequestError(f"{name} must be an integer {bound}, got {value!r}", field=name)


def _label(kind: str) -> str:
    return "param" if kind == "params" else kind


def _template_input(graph: Graph, kind: str, name: str) -> TensorType:
    i = graph.index.get(name)
    if i is None:
        raise RequestError(
            f"{_label(kind)} '{name}' is not a node of the template", field=f"{kind}['{name}']"
        )
    if graph.ops[i] is not INPUT:
        raise RequestError(
            f"{_label(kind)} '{name}' must name an input of the template, not a "
            f"'{graph.nodes[i].op}' node",
            field=f"{kind}['{name}']",
        )
    return graph.types[i]


def _array(kind: str, name: str, value: object) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise RequestError(
            f"{_label(kind)} '{name}' must be a numpy array, got {type(value).__name__}",
            field=f"{kind}['{name}']",
        )
    return value


def check_settings(optimizer: object, steps: object, batch_size: object, seed: object) -> None:
    """The settings a job's templates share (callers check them once, before the templates,
    so that their errors name the job's own fields)."""
    if not isinstance(optimizer, SGD | Adam):
        raise RequestError(
            f"optimizer must be SGD or Adam, got {type(optimizer).__name__}", field="optimizer"
        )
    _integer("steps", steps, 1, MAX_STEPS)
    if batch_size is not None:
        _integer("batch_size", batch_size, 1)
    _integer("seed", seed, 0)  # minibatch shuffles are seeded by (seed, network, epoch)


def check_spec(spec: TrainSpec) -> None:
    """Everything a spec's structure must satisfy for training to run: names, dtypes, shapes
    and counts against the template's declared inputs, and the shared settings."""
    check_settings(spec.optimizer, spec.steps, spec.batch_size, spec.seed)
    _integer("offset", spec.offset, 0)
    graph = spec.template
    i = graph.index.get(spec.loss) if isinstance(spec.loss, str) else None
    if i is None:
        raise RequestError(f"the loss '{spec.loss}' is not a node of the template", field="loss")
    if graph.types[i].shape != ():
        raise RequestError(
            f"the loss '{spec.loss}' must be a scalar, got shape {graph.types[i].shape}",
            field="loss",
        )
    n = _check_params(spec)
    _check_data(spec, n)
    for node, op in zip(graph.nodes, graph.ops, strict=True):
        if op is INPUT and node.name not in spec.params and node.name not in spec.data:
            raise RequestError(
                f"template input '{node.name}' is given neither as a param nor as data",
                field=f"data['{node.name}']",
            )


def _check_params(spec: TrainSpec) -> int:
    """The number of networks N, which every param must agree on."""
    if not spec.params:
        raise RequestError("the job has no params: nothing to train", field="params")
    first, n = "", -1
    for name, value in sorted(spec.params.items()):  # the same error for any map order
        t = _template_input(spec.template, "params", name)
        if t.dtype not in FLOAT_DTYPES:
            raise RequestError(
                f"param '{name}' is an integer ({t.dtype}) input of the template: params "
                f"are trained by their gradients, so they must be {' or '.join(FLOAT_DTYPES)}",
                field=f"params['{name}']",
            )
        value = _array("params", name, value)
        if value.shape[1:] != t.shape or value.ndim != len(t.shape) + 1 or value.dtype != t.dtype:
            raise RequestError(
                f"param '{name}' must be [N, {', '.join(map(str, t.shape))}] {t.dtype} "
                f"(N networks), got {list(value.shape)} {value.dtype.name}",
                field=f"params['{name}']",
            )
        if n < 0:
            first, n = name, value.shape[0]
        elif value.shape[0] != n:
            raise RequestError(
                f"param '{name}' has {value.shape[0]} networks but '{first}' has {n}",
                field=f"params['{name}']",
            )
    if n == 0:
        raise RequestError(
            f"param '{first}' has 0 networks: a job trains at least one",
            field=f"params['{first}']",
        )
    return n


def _check_data(spec: TrainSpec, n: int) -> None:
    """Each data array is [N, *shape] or [*shape] where shape is the template input's; with
    batch_size the input holds one minibatch [batch_size, *rows] and the data [S, *rows]
    samples, the same S for every array and at least batch_size of them."""
    b = spec.batch_size
    first: tuple[str, int] | None = None  # the first data's name and sample count
    for name in spec.per_network - set(spec.data):
        raise RequestError(f"per_network names '{name}', which is not data", field="data")
    for name, value in sorted(spec.data.items()):
        where = f"data['{name}']"
        t = _template_input(spec.template, "data", name)
        if name in spec.params:
            raise RequestError(f"'{name}' is given both as a param and as data", field=where)
        value = _array("data", name, value)
        if value.dtype != t.dtype:
            raise RequestError(
                f"data '{name}' must be {t.dtype} like the template input, got {value.dtype.name}",
                field=where,
            )
        lead = (n,) if name in spec.per_network else ()
        rows = t.shape if b is None else t.shape[1:]
        if b is not None and t.shape[:1] != (b,):
            raise RequestError(
                f"data '{name}': with batch_size={b} the template input holds one minibatch, "
                f"so its shape must be ({b}, ...), got {t.shape}",
                field=where,
            )
        sample_axis = 0 if b is None else 1
        if (
            value.ndim != len(lead) + sample_axis + len(rows)
            or value.shape[: len(lead)] != lead
            or value.shape[value.ndim - len(rows) :] != rows
        ):
            s = [] if b is None else ["S"]
            shape = ", ".join([*s, *map(str, rows)])
            raise RequestError(
                f"data '{name}' must be [{shape}] (shared) or [N={n}, {shape}] (per network), "
                f"got {list(value.shape)}",
                field=where,
            )
        if b is not None:
            count = value.shape[len(lead)]
            if count == 0:
                raise RequestError(f"data '{name}' has no samples", field=where)
            if first is None:
                first = (name, count)
            elif count != first[1]:
                raise RequestError(
                    f"data '{name}' has {count} samples but '{first[0]}' has {first[1]}",
                    field=where,
                )
            if count < b:
                raise RequestError(
                    f"data '{name}' has {count} samples, fewer than batch_size={b}", field=where
                )


@dataclass(frozen=True, slots=True, eq=False)
class CompiledStep:
    """One training step of a chunk shape, compiled once: the stacked template's gradient
    graph (the batching transform, then the gradient transform, like any other graph) as one
    straight-line program from the feeds to the losses and the params' gradients."""

    graph: Graph  # the stacked gradient graph
    program: Program
    inputs: tuple[tuple[str, int], ...]  # fed input name -> position
    seed: int  # the input fed the loss cotangent: ones, every network's loss weighs 1
    loss: int
    grads: tuple[tuple[str, int], ...]  # param -> position of its gradient

    def approx_bytes(self) -> int:
        """What the step cache counts: the gradient graph and its program."""
        return self.graph.approx_bytes() + self.program.approx_bytes()

    def __call__(self, feeds: Arrays, cancel: Cancellation) -> tuple[np.ndarray, Arrays]:
        """The losses [n] and the gradients of their sum, by param name."""
        values: dict[int, np.ndarray] = {pos: feeds[name] for name, pos in self.inputs}
        t = self.graph.types[self.seed]
        values[self.seed] = np.ones(t.shape, t.dtype)  # fresh: a program consumes its values
        out = self.program(values, cancel)
        return out[self.loss], {name: out[pos] for name, pos in self.grads}


def compile_step(
    template: Graph, loss: str, batched: frozenset[str], n: int, params: tuple[str, ...]
) -> CompiledStep:
    """The step of `n` networks of `template` (inputs in `batched` stacked), differentiating
    the sum of their losses with respect to `params`."""
    graph, refs = batch_graph(template, set(batched), n)
    losses = refs[loss].name
    grads = grad_graph(graph, [losses], params, [losses])
    full = grads.graph
    pos = full.index
    exports = [pos[losses], *(pos[g] for g in grads.grads)]
    needed = full.ancestors(exports)
    program = compile_program(full, [i for i in needed if full.ops[i] is not INPUT], exports)
    inputs = tuple((full.nodes[i].name, i) for i in needed if full.ops[i] is INPUT)
    seed = pos[grads.seeds[losses]]
    return CompiledStep(
        full,
        program,
        tuple((name, i) for name, i in inputs if i != seed),
        seed,
        pos[losses],
        tuple((p, pos[g]) for p, g in zip(params, grads.grads, strict=True)),
    )


@dataclass(frozen=True, slots=True)
class StepKey:
    """A chunk shape: what a compiled step depends on."""

    template: str  # the template's fingerprint (the step's positions are its own graph's)
    loss: str
    batched: frozenset[str]
    n: int
    params: tuple[str, ...]


# Per process, in the plan cache's budget: a job's chunks of one shape, its segments and its
# steps share one program (in a Ray worker, every segment the worker runs).
_STEPS: DerivedCache[StepKey, CompiledStep] = DerivedCache("training steps")


def compiled_step(
    template: Graph, loss: str, batched: frozenset[str], n: int, params: tuple[str, ...]
) -> CompiledStep:
    """`compile_step`, made once per process and chunk shape."""
    key = StepKey(template.fingerprint, loss, batched, n, params)
    return _STEPS.get_or_make(key, lambda: compile_step(template, loss, batched, n, params))


class ChunkTrainer:
    """Trains the networks of one spec; `run` goes from any state to any later step."""

    def __init__(self, spec: TrainSpec) -> None:
        self.spec = spec  # checked when it was made
        batched = set(spec.params) | set(spec.per_network)
        if spec.batch_size is not None:
            batched |= set(spec.data)  # every network draws its own minibatches
        params = tuple(sorted(spec.params))
        self.compiled = compiled_step(spec.template, spec.loss, frozenset(batched), spec.n, params)
        sizes = {
            name: v.shape[1] if name in spec.per_network else v.shape[0]
            for name, v in spec.data.items()
        }
        self.samples = min(sizes.values()) if sizes else 0
        self._perm_epoch, self._perms = -1, np.zeros((0, 0), dtype=np.int64)

    def initial_state(self) -> ChunkState:
        params = {k: v.copy() for k, v in self.spec.params.items()}
        return ChunkState(0, params, self.spec.optimizer.init(params))

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
        losses, grads = self.compiled(feeds, cancel or Cancellation())
        state.losses.append(np.asarray(losses, dtype=np.float64).copy())
        spec.optimizer.update(state.params, grads, state.opt_state, state.step)
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


def classify_data(template: Graph, data: Mapping[str, np.ndarray]) -> frozenset[str]:
    """Which data arrays carry a leading network axis: those with one more axis than the
    template's input (check_spec says whether the rest fits)."""
    return frozenset(
        name
        for name, value in data.items()
        if name in template.index
        and isinstance(value, np.ndarray)
        and value.ndim == len(template.types[template.index[name]].shape) + 1
    )


def activation_bytes(template: Graph) -> int:
    """Bytes of every value of one network's step (what its backward may keep)."""
    return sum(t.nbytes for t in template.types)


def step_bytes(spec: TrainSpec) -> int:
    """About the most bytes a step of all the spec's networks holds while its program runs:
    one network's step replayed over its gradient graph (engine/memory.py), times the
    networks (the stacked graph holds theirs side by side)."""
    params = sorted(spec.params)
    return spec.n * request_memory(spec.template, [spec.loss], params).kept


def job_bytes(specs: Sequence[TrainSpec]) -> int:
    """About the most memory and storage a job of these specs takes, from N x steps: its
    inputs; the loss history (kept durably and assembled for the results); parameters and
    optimizer state (in memory, in a checkpoint, and the checkpoint's bytes); a step of
    every network (`step_bytes`) and the optimizer's update; the minibatch permutations."""
    total = 0
    for s in specs:
        inputs = sum(v.nbytes for v in (*s.params.values(), *s.data.values()))
        state = sum(v.nbytes for v in s.params.values()) * (1 + s.optimizer.slots)
        history = s.n * s.steps * 8
        # The update goes one param at a time; Adam's holds about six arrays of its size.
        step = step_bytes(s) + 6 * max(v.nbytes for v in s.params.values())
        samples = max(
            (v.shape[1 if k in s.per_network else 0] for k, v in s.data.items()), default=0
        )
        perms = s.n * samples * 8 if s.batch_size is not None else 0
        total += inputs + 3 * state + 2 * history + step + perms
    return total
