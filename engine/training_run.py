"""A training run: one or more templates, their networks cut into chunks, run in segments.

Segments (a few dozen steps of every chunk inline; on Ray, as many as fill about half a
second) are the unit of progress, cancellation and checkpointing: after each one the run
reports progress and can write a checkpoint from which a new run resumes with identical
results. Chunks run inline or as Ray tasks.
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from graphgrad.engine.errors import GraphError, RequestError
from graphgrad.engine.executor import Cancellation
from graphgrad.engine.training import ChunkState, ChunkTrainer, TrainSpec, activation_bytes, split

# A chunk's activations should stay in cache. 4 MiB measured best here (2 MiB of L2 per
# core, a large L3): 4 chunks of the 1000-network ensemble ran 1.06x faster than 8 and
# 1.55x faster than 2.
CACHE_BYTES = 4 << 20
# A segment running as a Ray task should last about this long: long enough that Ray's cost
# per task (about 5 ms here with every CPU busy) is lost in it, short enough for live
# progress, prompt checkpoints and a fair share of CPUs between chunks.
SEGMENT_SECONDS = 0.5


@dataclass(frozen=True)
class Progress:
    steps_done: int  # the slowest chunk's step
    steps: int
    networks: int
    networks_done: int
    loss_median: float
    loss_best: float
    loss_worst: float
    # Networks whose latest loss is NaN or infinite (left out of the statistics above).
    networks_nonfinite: int = 0


def chunk_count(spec: TrainSpec, cpus: int) -> int:
    """Chunks sized by the cost model: cache-sized, and at least a few per CPU when parallel."""
    by_cache = math.ceil(spec.n * activation_bytes(spec.template) / CACHE_BYTES)
    by_cpu = 3 * cpus if cpus > 1 else 1
    return max(1, min(spec.n, max(by_cache, by_cpu)))


def next_segment(steps_run: int, seconds: float, current: int) -> int:
    """Steps for a chunk's next segment, from how long its last `steps_run` steps took:
    about SEGMENT_SECONDS' worth, growing at most 8-fold at a time."""
    if steps_run <= 0:
        return current
    fit = int(steps_run * SEGMENT_SECONDS / max(seconds, 1e-9))
    return max(1, min(fit, 8 * current))


class SegmentRunner:
    """Runs every chunk up to `steps`, reporting after each segment; the local runner goes
    round-robin through the chunks in this thread."""

    def train(
        self,
        chunks: Sequence[TrainSpec],
        states: list[ChunkState],
        steps: int,
        segment: int,
        cancel: Cancellation,
        on_segment: Callable[[], None],
    ) -> None:
        trainers = [ChunkTrainer(c) for c in chunks]
        while (step := min(s.step for s in states)) < steps:
            until = min(steps, step + segment)
            for k, trainer in enumerate(trainers):
                states[k] = trainer.run(states[k], until, cancel=cancel)
            on_segment()


class CheckpointError(GraphError):
    """Stored checkpoint bytes that do not fit the run they should resume."""


@dataclass(frozen=True)
class HistorySegment:
    """Losses of one chunk's networks for steps [first, first + losses.shape[1])."""

    chunk: int  # flat index over the run's chunks
    first: int
    losses: np.ndarray  # [networks of the chunk, steps] float64


@dataclass
class TrainingRun:
    groups: list[TrainSpec]  # one per distinct template
    cpus: int = 1
    segment_steps: int = 25
    runner: SegmentRunner = field(default_factory=SegmentRunner)
    layout: list[int] | None = None  # chunks per group; None: sized by the cost model
    # Keep taken history segments in memory for `history()`; a job whose history is
    # appended to a store instead turns this off, so its memory stays one segment deep.
    keep_history: bool = True
    chunks: list[list[TrainSpec]] = field(init=False)

    def __post_init__(self) -> None:
        if not self.groups:  # each group has at least one network (TrainSpec checks it)
            raise RequestError("the job has no templates", field="templates")
        counts = self.layout or [chunk_count(g, self.cpus) for g in self.groups]
        self.chunks = [split(g, c) for g, c in zip(self.groups, counts, strict=True)]
        self.layout = [len(cs) for cs in self.chunks]
        # Chunk states, flat over groups: the runner updates them as segments finish.
        self._states = [ChunkTrainer(c).initial_state() for cs in self.chunks for c in cs]
        self._last = [np.full(c.n, np.nan) for cs in self.chunks for c in cs]
        self._taken: list[HistorySegment] = []

    @property
    def states(self) -> list[list[ChunkState]]:
        out, k = [], 0
        for cs in self.chunks:
            out.append(self._states[k : k + len(cs)])
            k += len(cs)
        return out

    @property
    def steps(self) -> int:
        return self.groups[0].steps

    @property
    def networks(self) -> int:
        return sum(g.n for g in self.groups)

    def chunk_sizes(self) -> list[int]:
        return [c.n for cs in self.chunks for c in cs]

    def take_history(self) -> list[HistorySegment]:
        """The losses run since the last call, one segment per chunk that ran."""
        out = []
        for i, st in enumerate(self._states):
            if st.losses:
                seg = HistorySegment(i, st.step - len(st.losses), st.history)
                st.losses.clear()
                self._last[i] = seg.losses[:, -1]
                out.append(seg)
        if self.keep_history:
            self._taken.extend(out)
        return out

    def checkpoint(self) -> bytes:
        """The run's state as an .npz (plain arrays, never pickled), with its chunk layout.
        Parameters and optimizer state only: the history goes to `take_history()`."""
        arrays: dict[str, np.ndarray] = {"layout": np.asarray(self.layout)}
        for i, st in enumerate(self._states):
            arrays[f"{i}/step"] = np.asarray(st.step)
            arrays[f"{i}/last"] = st.losses[-1] if st.losses else self._last[i]
            arrays |= {f"{i}/p/{k}": v for k, v in st.params.items()}
            arrays |= {f"{i}/o/{k}": v for k, v in st.opt_state.items()}
        buf = io.BytesIO()
        np.savez(buf, **arrays)  # type: ignore[arg-type]
        return buf.getvalue()

    @classmethod
    def resumed(
        cls,
        groups: list[TrainSpec],
        blob: bytes,
        cpus: int,
        runner: SegmentRunner,
        keep_history: bool = True,
    ) -> TrainingRun:
        """A run of `groups` continuing from `checkpoint()` bytes, cut into the same chunks.
        Raises CheckpointError when the bytes do not fit these groups."""
        try:
            with np.load(io.BytesIO(blob), allow_pickle=False) as z:
                return cls._from_arrays(groups, z, cpus, runner, keep_history)
        except CheckpointError:
            raise
        except Exception as e:  # any unreadable .npz: zip, header, pickled object arrays
            raise CheckpointError(f"the checkpoint is unreadable: {type(e).__name__}: {e}") from e

    @classmethod
    def _from_arrays(
        cls,
        groups: list[TrainSpec],
        z: Mapping[str, np.ndarray],
        cpus: int,
        runner: SegmentRunner,
        keep_history: bool,
    ) -> TrainingRun:
        def read(key: str, like: np.ndarray) -> np.ndarray:
            if key not in z:
                raise CheckpointError(f"the checkpoint lacks '{key}'")
            v = z[key]
            if v.shape != like.shape or v.dtype != like.dtype:
                raise CheckpointError(
                    f"checkpoint array '{key}' must be {like.shape} {like.dtype}, "
                    f"got {v.shape} {v.dtype}"
                )
            return v

        if "layout" not in z:
            raise CheckpointError("the checkpoint lacks 'layout'")
        layout = z["layout"]
        sizes = [g.n for g in groups]
        if (
            layout.shape != (len(groups),)
            or layout.dtype.kind not in "iu"
            or any(not 1 <= int(c) <= n for c, n in zip(layout, sizes, strict=True))
        ):
            raise CheckpointError(
                f"the checkpoint's layout must be {len(groups)} chunk counts within the "
                f"networks per group {sizes}, got {layout.tolist()}"
            )
        run = cls(groups, cpus=cpus, runner=runner, layout=[int(c) for c in layout])
        run.keep_history = keep_history
        states = []
        for i, old in enumerate(run._states):
            step = int(read(f"{i}/step", np.asarray(0)))
            if not 0 <= step <= run.steps:
                raise CheckpointError(f"checkpoint step {step} is outside [0, {run.steps}]")
            params = {k: read(f"{i}/p/{k}", v) for k, v in old.params.items()}
            opt = {k: read(f"{i}/o/{k}", v) for k, v in old.opt_state.items()}
            state = ChunkState(step, params, opt)
            if f"{i}/history" in z:  # a store from before history rows: its steps so far
                legacy = read(f"{i}/history", np.zeros((len(run._last[i]), run.steps)))
                state.losses = list(legacy[:, :step].T)
            else:
                run._last[i] = read(f"{i}/last", run._last[i])
            states.append(state)
        run._states = states
        return run

    def progress(self) -> Progress:
        step = min(s.step for s in self._states)
        lasts = [s.losses[-1] if s.losses else self._last[i] for i, s in enumerate(self._states)]
        last = np.concatenate(lasts)
        finite = last[np.isfinite(last)]
        # A chunk that has not run yet holds NaN in place of a loss: not a diverged network.
        nonfinite = sum(
            int(np.count_nonzero(~np.isfinite(v)))
            for v, s in zip(lasts, self._states, strict=True)
            if s.step > 0
        )
        stats = (
            (float(np.median(finite)), float(finite.min()), float(finite.max()))
            if finite.size
            else (math.nan, math.nan, math.nan)
        )
        done = sum(len(self._last[i]) for i, s in enumerate(self._states) if s.step >= self.steps)
        return Progress(step, self.steps, self.networks, done, *stats, nonfinite)

    def run(
        self,
        cancel: Cancellation | None = None,
        on_segment: Callable[[TrainingRun], None] | None = None,
    ) -> None:
        chunks = [c for cs in self.chunks for c in cs]
        self.runner.train(
            chunks,
            self._states,
            self.steps,
            self.segment_steps,
            cancel or Cancellation(),
            lambda: on_segment(self) if on_segment else None,
        )

    def params(self) -> list[dict[str, np.ndarray]]:
        """Final (or current) parameters per group, stacked [n, ...] in network order."""
        return [
            {k: np.concatenate([s.params[k] for s in states]) for k in states[0].params}
            for states in self.states
        ]

    def history(self, stored: Sequence[HistorySegment] = ()) -> np.ndarray:
        """Loss per network per step, [networks, steps], groups in order; NaN for steps not
        run. Built from `stored` segments (a store's), those kept and those not yet taken."""
        pending = [
            HistorySegment(i, s.step - len(s.losses), s.history)
            for i, s in enumerate(self._states)
            if s.losses
        ]
        return assemble_history(self.chunk_sizes(), self.steps, [*stored, *self._taken, *pending])


def assemble_history(
    sizes: Sequence[int], steps: int, segments: Sequence[HistorySegment]
) -> np.ndarray:
    """The [sum(sizes), steps] history of chunks of `sizes` networks from their segments."""
    offsets = np.cumsum([0, *sizes])
    out = np.full((int(offsets[-1]), steps), np.nan)
    for seg in segments:
        fits = (
            0 <= seg.chunk < len(sizes)
            and seg.losses.ndim == 2
            and seg.losses.shape[0] == sizes[seg.chunk]
            and 0 <= seg.first <= seg.first + seg.losses.shape[1] <= steps
        )
        if not fits:
            raise CheckpointError(f"a history segment of chunk {seg.chunk} does not fit the run")
        lo = offsets[seg.chunk]
        out[lo : lo + sizes[seg.chunk], seg.first : seg.first + seg.losses.shape[1]] = seg.losses
    return out


Placement = tuple[int, int, int]  # (group, first network, end) of one submitted spec


def group_specs(specs: Sequence[TrainSpec]) -> tuple[list[TrainSpec], list[Placement]]:
    """Specs that differ only in their per-network arrays are trained as one stack (networks
    keep their order; a network's minibatch shuffles are keyed by its index in its group).
    Also returns where each spec's networks went."""
    groups: list[TrainSpec] = []
    placement: list[Placement] = []
    for s in specs:
        for k, g in enumerate(groups):
            if _stackable(g, s):
                groups[k] = dataclasses.replace(
                    g,
                    params={n: np.concatenate([g.params[n], s.params[n]]) for n in g.params},
                    data={
                        n: np.concatenate([g.data[n], s.data[n]]) if n in g.per_network else v
                        for n, v in g.data.items()
                    },
                )
                placement.append((k, g.n, g.n + s.n))
                break
        else:
            groups.append(s)
            placement.append((len(groups) - 1, 0, s.n))
    return groups, placement


def _stackable(a: TrainSpec, b: TrainSpec) -> bool:
    same = (
        a.template.fingerprint == b.template.fingerprint
        and a.loss == b.loss
        and set(a.params) == set(b.params)
        and set(a.data) == set(b.data)
        and a.per_network == b.per_network
        and a.optimizer == b.optimizer
        and a.steps == b.steps
        and a.batch_size == b.batch_size
        and a.seed == b.seed
    )
    return same and all(
        np.array_equal(a.data[k], b.data[k]) for k in a.data if k not in a.per_network
    )
