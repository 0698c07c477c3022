"""Dynamic batching of Run requests (Triton's dynamic batcher, for gradients): concurrent
requests with the same stack key that arrive within a window run as one stacked run.

Batches are gathered on the event loop: a member (parsed, checked and admitted on the loop)
awaits a future in the open batch of its key. When the window ends or the batch is full, ONE
hop to the thread pool runs the batch and works out every member's answer there; back on the
loop each member's future is set. So a batch of k costs one hop, not k hops and k waits on a
thread condition. A batch whose latest run (at the same size, answers included) took under
`batch_quick_seconds` of CPU (`quick_seconds` for a request alone) runs on the loop itself:
for a small network the hop there and back costs more than the stacked run. A batch runs
stacked only where stacking was measured to cost less CPU per request than running alone at
its size, or is not measured yet (Costs); else its members run one after another, still in
one hop. A request whose key was measured to cost less alone than stacked at every size tried
runs at once, without waiting the window (it would run alone anyway), unless a batch of its
key is open; every _RETRY-th opens one, so the sizes that gather are measured again as costs
drift.
Only members holding one of the server's run slots ever wait here, and each keeps its slot
until its batch has run (or it leaves an open batch), so nothing queues beyond the server's
max_concurrent_runs. If the stacked run itself fails, every member runs alone, so each error
stays with the request that caused it. A member cancelled while its batch is open leaves it.
A member with a deadline shortens the wait: the batch leaves by the time half of any member's
time left has gone, so a window longer than a request's deadline never makes it miss it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from graphgrad.engine.stacking import stack_size

log = logging.getLogger("graphgrad.server.batcher")

K = TypeVar("K")  # the stack key
Q = TypeVar("Q")  # what run_batch stacks of a member
R = TypeVar("R")  # a member's result


@dataclass(frozen=True)
class BatchingConfig:
    window_us: int = 0  # 0: off
    max_batch: int = 8
    # A batch also closes once this long passes with no member joining (0: only its window
    # or max_batch close it): under load members keep coming and the batch fills up to the
    # window; with few requests in flight it closes soon after the last of them joined.
    idle_us: int = 0


@dataclass(eq=False)
class Member(Generic[Q, R]):
    """One request in a batch: `item` is what run_batch stacks, `alone()` its run by itself,
    `answer(result or error)` what its caller gets (worked out in the pool, so encoding costs
    no loop time), `release()` gives back its run slot once its batch has run."""

    item: Q
    alone: Callable[[], R]
    answer: Callable[[R | BaseException], Any]
    release: Callable[[], None] = lambda: None
    deadline: float | None = None  # a time.monotonic() value (None: none)
    future: asyncio.Future[Any] | None = None
    left: bool = False  # cancelled while its batch was open: it never ran


@dataclass(frozen=True)
class Batchable:
    """A servicer's side of a call that may join a batch, on the event loop:
    `candidate(request)` checks it (None: it runs alone the ordinary way, which reports what
    is wrong with it), else returns what `key` names (its stack key); `alone(candidate,
    cancel)` runs it by itself; `respond(candidate, outcome)` is its answer (raising the
    outcome if an error); `member(candidate, call, finish)` is it as a batch's Member."""

    candidate: Callable[[Any], Any]
    alone: Callable[[Any, Any], Any]
    respond: Callable[[Any, Any], Any]
    member: Callable[[Any, Any, Callable[[Callable[..., Any]], Any]], Member[Any, Any]]


MEASURE_EVERY = 8  # of the runs on the loop (Batcher.run_here), one in this many is timed

# How a member goes (Batcher.route): alone at once on the loop, alone at once in the pool, or
# into a batch (open, or opened for it) to wait for others.
LOOP, POOL, WAIT = "loop", "pool", "wait"


@dataclass(eq=False)
class _Batch(Generic[Q, R]):
    leave_at: float  # the loop's time when it stops waiting for more
    members: list[Member[Q, R]] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None
    due: float = 0.0  # when its timer closes it: leave_at, or sooner where it goes idle


class Batcher(Generic[K, Q, R]):
    """`run_batch(key, items)` runs items (two or more) stacked and returns one outcome per
    item, in order: its result or its own error; it raises if the stacked run failed.
    Call `run` on the event loop only; the batcher itself takes no locks."""

    def __init__(
        self,
        config: BatchingConfig,
        run_batch: Callable[[K, Sequence[Q]], Sequence[R | BaseException]],
        on_batch: Callable[[int], None] = lambda size: None,
        quick_seconds: float = 0.0,
        costs: Costs[K] | None = None,
        batch_quick_seconds: float | None = None,
    ) -> None:
        """`quick_seconds`: a request alone whose latest run took less CPU runs on the loop;
        `batch_quick_seconds` (default: the same), a batch of two or more at its size;
        `costs`: what decides, from CPU time measured, whether a batch runs stacked."""
        if config.window_us <= 0 or config.max_batch < 2:
            raise ValueError(f"batching needs a window > 0 and max_batch >= 2, got {config}")
        self.config = config
        self._window = config.window_us / 1e6
        self._idle = config.idle_us / 1e6 if config.idle_us > 0 else None
        self._run_batch, self._on_batch = run_batch, on_batch
        self._quick_seconds = quick_seconds
        self._batch_quick_seconds = (
            quick_seconds if batch_quick_seconds is None else batch_quick_seconds
        )
        self._open: dict[K, _Batch[Q, R]] = {}  # at most one open batch per key
        self._costs: Costs[K] = costs or Costs()
        self._unmeasured: dict[K, int] = {}  # run_here's runs of a key since one was timed

    def route(self, key: K) -> str:
        """How a member of `key` goes now: WAIT where a batch of its key is open, or waiting
        pays (Costs.waits); else alone at once, on the LOOP where its latest lone run was
        quick (most requests under load: the caller runs it, run_here), else in the POOL.
        Asked once per member: `run` is given the answer (Costs.waits counts its calls)."""
        if key in self._open or self._costs.waits(key):
            return WAIT
        return LOOP if self._quick(key, 1) else POOL

    def run_here(
        self, key: K, alone: Callable[[], R], answer: Callable[[R | BaseException], Any]
    ) -> Any:
        """A member routed to the LOOP, run now without a Member, future or batch: its
        `answer(result or error)`. Every MEASURE_EVERY-th such run has its CPU time noted as a
        lone run's and a batch of one's (each read of a thread's CPU clock is a system call,
        ~0.5-1.5 us; these are moving averages, and most requests under load come here),
        counted per key: keys taking turns are each timed (a key's first run is)."""
        since = self._unmeasured.get(key, MEASURE_EVERY - 1) + 1
        if since < MEASURE_EVERY:
            self._unmeasured[key] = since
            return answer(_alone(alone))
        if len(self._unmeasured) >= _MOST_TIMINGS:
            self._unmeasured.clear()
        self._unmeasured[key] = 0
        started = time.thread_time()
        outcome = _alone(alone)
        ran = time.thread_time()
        try:
            return answer(outcome)
        finally:
            _note(self._costs.alone, key, ran - started)
            _note(self._costs.batch, (key, 1), time.thread_time() - started)

    async def run(
        self, key: K, member: Member[Q, R], pool: futures.Executor, route: str | None = None
    ) -> Any:
        """The member's answer, once its batch (closed by the window or by max_batch) has run
        in `pool` (or on the loop); at once, alone, where waiting does not pay (Costs.waits).
        Cancelled while its batch is open, the member leaves it. `route`: route(key), asked
        by the caller just before (None: asked here)."""
        loop = asyncio.get_running_loop()
        route = route or self.route(key)
        if route == LOOP:
            return self._answers(key, [member])[0]
        if route == POOL:
            member.future = loop.create_future()
            self._start(key, [member], pool)
            return await member.future
        batch = self._open.get(key)
        wait = self._window
        if member.deadline is not None:
            wait = min(wait, (member.deadline - time.monotonic()) / 2)
        now = loop.time()
        leave_at = now + max(0.0, wait)
        if batch is None:
            batch = self._open[key] = _Batch(leave_at)
        batch.leave_at = min(batch.leave_at, leave_at)  # the first, or one in a hurry
        due = batch.leave_at if self._idle is None else min(batch.leave_at, now + self._idle)
        if batch.timer is None or due != batch.due:
            if batch.timer is not None:
                batch.timer.cancel()
            batch.due = due
            batch.timer = loop.call_at(due, self._close, key, batch, pool)
        member.future = loop.create_future()
        batch.members.append(member)
        if len(batch.members) >= self._costs.preferred(key, self.config.max_batch):
            self._close(key, batch, pool)
        try:
            return await member.future
        except asyncio.CancelledError:
            self._leave(key, batch, member)
            raise

    def rows(self, n: int) -> int:
        """The rows n members stack at, as engine/stacking.py pads them (the next power of
        two, at most max_batch): how their stacked runs' costs are learnt together."""
        return stack_size(n, self.config.max_batch)

    def waiting(self) -> int:
        """Requests in batches still open (waiting for others to join)."""
        return sum(len(b.members) for b in self._open.values())

    def _leave(self, key: K, batch: _Batch[Q, R], member: Member[Q, R]) -> None:
        if self._open.get(key) is batch and member in batch.members:
            batch.members.remove(member)  # it never runs, so its slot goes back now
            member.left = True
            member.release()
            if not batch.members and batch.timer is not None:
                batch.timer.cancel()
                del self._open[key]

    def _close(self, key: K, batch: _Batch[Q, R], pool: futures.Executor) -> None:
        """No more join; the batch runs in one hop to the pool, and every member's future is
        set from there."""
        if self._open.get(key) is not batch:
            return  # closed already (full before its window ended)
        del self._open[key]
        if batch.timer is not None:
            batch.timer.cancel()
        if batch.members:
            self._costs.note_gathered(key, len(batch.members))
            self._start(key, batch.members, pool)

    def _start(self, key: K, members: list[Member[Q, R]], pool: futures.Executor) -> None:
        """Run a closed batch: on the loop when its latest run at its size was quick, else
        in one hop to the pool; every member's future is set from there."""
        if self._quick(key, len(members)):
            self._settle(members, self._answers(key, members), None)
            return
        try:
            hop = asyncio.get_running_loop().run_in_executor(pool, self._answers, key, members)
        except Exception as e:  # no thread to be had: the server is stopping
            for m in members:
                m.release()
            self._settle(members, None, e)
            return
        hop.add_done_callback(lambda done: self._settle(members, *_outcome(done)))

    def _quick(self, key: K, n: int) -> bool:
        """Whether a batch of n of `key` runs on the loop: its latest run took under
        quick_seconds of CPU (batch_quick_seconds for two or more; one not measured yet goes
        to the pool)."""
        bound = self._quick_seconds if n == 1 else self._batch_quick_seconds
        return self._costs.batch.get((key, n), bound) < bound

    def _settle(
        self, members: list[Member[Q, R]], answers: list[Any] | None, error: BaseException | None
    ) -> None:
        for j, m in enumerate(members):
            if m.future is None or m.future.done():  # its caller has gone
                continue
            if answers is not None:
                m.future.set_result(answers[j])
            else:
                m.future.set_exception(error or RuntimeError("the batch was not run"))

    def _answers(self, key: K, members: list[Member[Q, R]]) -> list[Any]:
        """Run the batch (in the pool, or on the loop when quick): each member's answer, in
        order; slots are given back."""
        started = time.thread_time()  # CPU time: in the pool, waits for the GIL do not count
        try:
            outcomes = self._outcomes(key, members, started)
            return [m.answer(o) for m, o in zip(members, outcomes, strict=True)]
        finally:
            for m in members:
                m.release()
            _note(self._costs.batch, (key, len(members)), time.thread_time() - started)

    def _outcomes(
        self, key: K, members: list[Member[Q, R]], began: float
    ) -> list[R | BaseException]:
        """Stacked, where stacking was measured to cost less per request than running alone
        at this batch size (or is not measured yet); else each member alone. `began`: the
        batch's thread_time(), the start of a lone member's run (one clock read fewer on the
        path of most requests under load)."""
        n = len(members)
        rows = self.rows(n)
        if n > 1 and self._costs.stack(key, n, rows):
            started = time.thread_time()
            try:
                self._on_batch(n)
                outcomes = list(self._run_batch(key, [m.item for m in members]))
                if len(outcomes) != n:
                    raise RuntimeError(f"{len(outcomes)} outcomes for {n} members")
                self._costs.note_stacked(key, n, (time.thread_time() - started) / n, rows)
                return outcomes
            except Exception as e:  # each member runs alone, so errors stay per request
                log.warning("a stacked run of %d requests failed, each runs alone: %s", n, e)
        started = began if n == 1 else time.thread_time()
        outcomes = [_alone(m.alone) for m in members]
        _note(self._costs.alone, key, (time.thread_time() - started) / n)
        return outcomes


_MOST_TIMINGS = 4096  # entries of each table of Costs
_RETRY = 16  # a choice measured to lose is tried again every this many batches: costs drift
GATHERS, GATHER_SAMPLES = 1.5, 8  # waiting pays where batches gather this many on average


def _note(table: dict[Any, float], key: Any, seconds: float) -> float:
    """A moving average of CPU seconds, returned; past _MOST_TIMINGS entries the table forgets
    them all and learns again (a bound on memory)."""
    if len(table) >= _MOST_TIMINGS:
        table.clear()
    table[key] = new = _average(table.get(key), seconds)
    return new


def _average(old: float | None, value: float) -> float:
    """The moving average every table of Costs keeps: a new value weighs a quarter."""
    return value if old is None else 0.75 * old + 0.25 * value


@dataclass
class Costs(Generic[K]):
    """CPU seconds measured: a whole batch's run (answers included) by key and size, and per
    request, stacked by key and size, and alone by key. Written from pool threads too: each
    dict operation is atomic, and a lost update only delays what is learnt."""

    batch: dict[tuple[K, int], float] = field(default_factory=dict)
    stacked: dict[tuple[K, int], float] = field(default_factory=dict)
    alone: dict[K, float] = field(default_factory=dict)
    counts: dict[tuple[K, int], int] = field(default_factory=dict)  # batches since a retry
    best: dict[K, dict[int, float]] = field(default_factory=dict)  # stacked, by key and size
    skips: dict[K, int] = field(default_factory=dict)  # requests run at once since one waited
    # members the batches that waited gathered (a moving average), and how many were noted
    gathered: dict[K, tuple[float, int]] = field(default_factory=dict)

    def note_gathered(self, key: K, n: int) -> None:
        """A batch that waited closed with n members."""
        if len(self.gathered) >= _MOST_TIMINGS:
            self.gathered.clear()
        average, count = self.gathered.get(key, (None, 0))
        self.gathered[key] = (_average(average, n), count + 1)

    def note_stacked(self, key: K, n: int, seconds: float, rows: int | None = None) -> None:
        """A stacked run's CPU seconds per request, at n members stacked at `rows` rows (n
        where None: a stack costs by its rows, so sizes that stack at the same rows are
        learnt together). Kept per row: what a request costs in a full stack of `rows`."""
        rows = rows or n
        # the value noted, not read back: another thread's note may clear the table between
        average = _note(self.stacked, (key, rows), seconds * n / rows)
        if len(self.best) >= _MOST_TIMINGS:
            self.best.clear()
        # a new dict, not an update: waits() reads it on the loop while a pool thread notes
        self.best[key] = {**self.best.get(key, {}), rows: average}

    def preferred(self, key: K, most: int) -> int:
        """The size a batch of `key` runs at once it is reached (Triton's preferred batch
        size): the rows at which a stack was measured cheapest per request, where that beats
        running alone; else `most`."""
        sizes, alone = self.best.get(key), self.alone.get(key)
        if not sizes or alone is None:
            return most
        rows = min(sizes, key=sizes.__getitem__)
        return rows if sizes[rows] < alone else most

    def waits(self, key: K) -> bool:
        """Whether a request of `key` should wait for others to stack with: not where its
        last batches that waited (GATHER_SAMPLES at least) gathered fewer than GATHERS members
        on average (few requests in flight: it would wait for nobody), nor where running
        alone was measured to cost less than a stack at every size tried (then it would run
        alone anyway); every _RETRY-th still waits, as load and costs drift."""
        alone, sizes = self.alone.get(key), self.best.get(key)
        gathered = self.gathered.get(key)
        alone_in_flight = (
            gathered is not None and gathered[1] >= GATHER_SAMPLES and gathered[0] < GATHERS
        )
        if not alone_in_flight and (alone is None or not sizes or min(sizes.values()) < alone):
            return True
        if len(self.skips) >= _MOST_TIMINGS:
            self.skips.clear()
        count = self.skips[key] = (self.skips.get(key, 0) + 1) % _RETRY
        return count == 0

    def stack(self, key: K, n: int, rows: int | None = None) -> bool:
        """Whether n members of `key` should run stacked (at `rows` rows; n where None): what
        is not measured yet is tried (stacked first), then the cheaper way per request wins,
        the other tried again now and then."""
        rows = rows or n
        per_row, alone = self.stacked.get((key, rows)), self.alone.get(key)
        if per_row is None or alone is None:
            return per_row is None
        pays = per_row * rows / n < alone
        count = (self.counts.get((key, rows), 0) + 1) % _RETRY
        if len(self.counts) >= _MOST_TIMINGS:
            self.counts.clear()
        self.counts[key, rows] = count
        return pays if count else not pays


def _outcome(done: asyncio.Future[Any]) -> tuple[list[Any] | None, BaseException | None]:
    """A hop's answers, or why there are none."""
    if done.cancelled():
        return None, RuntimeError("the batch was not run: the server is stopping")
    error = done.exception()
    return (None, error) if error is not None else (done.result(), None)


def _alone(alone: Callable[[], R]) -> R | BaseException:
    try:
        return alone()
    except Exception as e:
        return e
