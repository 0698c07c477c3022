"""Training on Ray: each chunk of networks as a chain of Ray tasks (engine/training_run.py
runs them inline otherwise), on the Ray connection of the Ray executor."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import ray
from ray.exceptions import RayTaskError

from graphgrad.engine.cancel import Cancellation
from graphgrad.engine.errors import CancelledError
from graphgrad.engine.ray_executor import (
    RayExecutor,
    cancel_all,
    tune_allocator,
    unwrap_task_error,
)
from graphgrad.engine.training import ChunkState, ChunkTrainer, TrainSpec
from graphgrad.engine.training_run import SegmentRunner, next_segment


@ray.remote
def _train_segment(spec: TrainSpec, state: ChunkState, until: int) -> tuple[ChunkState, float]:
    tune_allocator()
    start = time.perf_counter()
    done = ChunkTrainer(spec).run(state.writable(), until)
    return done, time.perf_counter() - start


class RaySegmentRunner(SegmentRunner):
    """Each chunk as a chain of Ray tasks, one segment in flight per chunk: no barrier between
    chunks, progress as each segment finishes. Segments grow (see `next_segment`) until each
    lasts about SEGMENT_SECONDS, so Ray's cost per task is lost in them. A killed worker
    costs a retry (segments are deterministic)."""

    def __init__(self, executor: RayExecutor) -> None:
        self.executor = executor

    def train(
        self,
        chunks: Sequence[TrainSpec],
        states: list[ChunkState],
        steps: int,
        segment: int,
        cancel: Cancellation,
        on_segment: Callable[[], None],
    ) -> None:
        self.executor.start()
        spec_refs = [ray.put(spec) for spec in chunks]
        lengths = [segment] * len(chunks)
        owner: dict[Any, int] = {}

        def submit(k: int) -> None:
            until = min(steps, states[k].step + lengths[k])
            owner[_train_segment.remote(spec_refs[k], states[k], until)] = k

        for k in range(len(chunks)):
            if states[k].step < steps:
                submit(k)
        try:
            while owner:
                cancel.check()
                ready, _ = ray.wait(list(owner), num_returns=1, timeout=0.1)
                for ref in ready:
                    k = owner.pop(ref)
                    done, seconds = ray.get(ref)
                    lengths[k] = next_segment(done.step - states[k].step, seconds, lengths[k])
                    done.losses[:0] = states[k].losses  # those not yet taken, then the new
                    states[k] = done
                    if done.step < steps:
                        submit(k)
                if ready:
                    on_segment()
        except CancelledError:
            cancel_all(list(owner))
            raise
        except RayTaskError as e:
            raise unwrap_task_error(e) from None
