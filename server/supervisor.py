"""`graphgrad serve --workers N`: N server processes on one port, under a supervisor.

The supervisor binds the port with SO_REUSEPORT and never listens on it (so port 0 is
resolved once and the port stays ours while workers come and go; the kernel spreads
connections over the workers' listening sockets only), starts the embedded Ray once and
hands its address to every worker, then runs the workers: each is `graphgrad serve` itself,
one process with its own engine and caches, on that port and the shared data directory. A
worker that dies is replaced (as gunicorn does); SIGTERM/SIGINT are passed on to every
worker, each drains within --grace, and the supervisor exits once all have stopped.

Each worker holds the read end of a pipe only the supervisor writes to: the supervisor
writes the number of live workers on it (GetServerInfo.workers), and its end of file tells
the worker that the supervisor is gone, even by SIGKILL, so the worker drains and exits too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from graphgrad.server.blas import BLAS_THREADS, SHARED_BY_WORKERS
from graphgrad.server.logs import worker_id

log = logging.getLogger("graphgrad.supervisor")

# One process by default: a worker's numpy already uses every core (BLAS threads) and the
# embedded Ray runs a worker per CPU, so more processes only help where the GIL of one is
# the bound (many small requests); bench/throughput.py measures both. See the README.
DEFAULT_WORKERS = 1
WORKER_FLAG = "--worker-of"  # hidden: the fd of a worker's pipe from its supervisor
SERVING = re.compile(r"serving on grpcs?://")
# A worker that dies this young is restarted after a pause that doubles up to the last,
# so one that cannot start does not spin the machine.
YOUNG_S, FIRST_PAUSE_S, LAST_PAUSE_S = 5.0, 0.5, 30.0
POLL_S = 0.1  # how often the supervisor looks at its workers and its signals
# numpy's BLAS starts a thread per core in every process: N workers with as many each
# oversubscribe the cores, and OpenBLAS's spinning threads then slow chains of small matmuls
# manyfold (bench/blas_share.py). Each worker gets its share of the cores in BLAS_THREADS
# (server/blas.py), unless the operator set them.
# Beyond --grace a worker still gets this long to cancel what runs and exit before SIGKILL.
EXIT_SLACK_S = 10.0


def worker_env(count: int, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The environment of one of `count` workers: `environ` with BLAS threads split between
    them where it does not set them (and the count, so each worker splits its share again
    between its runs at once: server/blas.py)."""
    if any(name in environ for name in BLAS_THREADS):
        return dict(environ)
    share = str(max(1, (os.cpu_count() or 1) // count))
    return {**environ, **{name: share for name in BLAS_THREADS}, SHARED_BY_WORKERS: str(count)}


def reserve_port(host: str, port: int) -> socket.socket:
    """A bound, never listening SO_REUSEPORT socket on host:port (port 0: a free one), which
    workers listening with SO_REUSEPORT share; OSError where the port is taken."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


@dataclass
class Worker:
    """One worker process and the supervisor's end of its pipe."""

    proc: subprocess.Popen[str]
    pipe: int
    started: float = field(default_factory=time.monotonic)
    serving: threading.Event = field(default_factory=threading.Event)

    @property
    def name(self) -> str:
        return worker_id(self.proc.pid)

    def tell(self, live: int) -> None:
        with contextlib.suppress(OSError):  # it is exiting: the supervisor's loop sees that next
            os.write(self.pipe, f"{live}\n".encode())

    def close(self) -> None:
        os.close(self.pipe)


class Supervisor:
    """Runs `count` copies of `graphgrad serve ARGV WORKER_ARGS` on one port (see the module
    docstring); `argv`: the supervisor's own options, `worker_args`: what workers add to
    them (the address of the Ray they share); `on_exit(pid)` after a worker has exited."""

    def __init__(
        self,
        argv: Sequence[str],
        count: int,
        host: str,
        port: int,
        grace: float,
        worker_args: Sequence[str] = (),
        on_exit: Callable[[int], None] = lambda pid: None,
    ) -> None:
        self.sock = reserve_port(host, port)
        self.port = self.sock.getsockname()[1]
        self.address = f"{host}:{self.port}"
        # The last of a flag wins: these override what the user gave the supervisor.
        extra = [*worker_args, "--port", str(self.port), "--workers", "1"]
        self.argv, self.count, self.grace = [*argv, *extra], count, grace
        self.on_exit = on_exit  # called with the pid of each worker that has exited
        self.workers: list[Worker | None] = [None] * count
        self.pauses = [0.0] * count  # per slot: the pause before its next restart
        self.due = [0.0] * count  # per empty slot: when its next worker may start

    def _spawn(self) -> Worker:
        read, write = os.pipe()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "graphgrad.server", *self.argv, WORKER_FLAG, str(read)],
                stdout=subprocess.PIPE,
                text=True,
                pass_fds=(read,),
                env=worker_env(self.count),
            )
        finally:
            os.close(read)
        worker = Worker(proc, write)
        threading.Thread(target=self._read_stdout, args=(worker,), daemon=True).start()
        return worker

    @staticmethod
    def _read_stdout(worker: Worker) -> None:
        """The first line says it serves; anything later is passed on to stderr."""
        assert worker.proc.stdout is not None
        for line in worker.proc.stdout:
            if not worker.serving.is_set() and SERVING.search(line):
                worker.serving.set()
            else:
                sys.stderr.write(line)

    def live(self) -> list[Worker]:
        return [w for w in self.workers if w is not None and w.proc.poll() is None]

    def _broadcast(self) -> None:
        live = self.live()
        for w in live:
            w.tell(len(live))

    def start(self, signalled: Sequence[int] = ()) -> bool:
        """Spawn every worker and wait until each serves (True), or until a signal is in
        `signalled` (False: the caller stops them); OSError if one exits first."""
        for slot in range(self.count):
            self.workers[slot] = self._spawn()
            self._broadcast()
        for w in self.workers:
            assert w is not None
            while not w.serving.wait(POLL_S):
                if signalled:  # e.g. ^C, which reaches the workers too
                    return False
                if w.proc.poll() is not None:
                    self.stop(0)
                    raise OSError(f"worker {w.name} exited with status {w.proc.returncode}")
        return True

    def tend(self, now: float | None = None) -> None:
        """Replace each worker that has exited: at once, or after a pause where it died young.
        `now`: time.monotonic()'s reading (a test's clock)."""
        now, changed = time.monotonic() if now is None else now, False
        for slot, w in enumerate(self.workers):
            if w is not None and w.proc.poll() is not None:
                w.close()
                self.on_exit(w.proc.pid)
                young = now - w.started < YOUNG_S
                pause = min(LAST_PAUSE_S, 2 * self.pauses[slot] or FIRST_PAUSE_S)
                self.pauses[slot] = pause if young else 0.0
                self.due[slot] = now + self.pauses[slot]
                log.warning(
                    "worker %s exited with status %s; starting another%s",
                    w.name,
                    w.proc.returncode,
                    f" in {self.pauses[slot]:.1f}s" if self.pauses[slot] else "",
                )
                self.workers[slot], changed = None, True
            if self.workers[slot] is None and now >= self.due[slot]:
                self.workers[slot], changed = self._spawn(), True
        if changed:
            self._broadcast()

    def stop(self, grace: float | None = None) -> None:
        """SIGTERM every worker; each drains within `grace`; SIGKILL any still there after."""
        grace = self.grace if grace is None else grace
        live = self.live()
        for w in live:
            w.proc.send_signal(signal.SIGTERM)
        give_up = time.monotonic() + grace + EXIT_SLACK_S
        for w in live:
            try:
                w.proc.wait(max(0.0, give_up - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker %s did not exit within the grace period; killing it", w.name)
                w.proc.kill()
                w.proc.wait()
        for slot in self.workers:
            if slot is not None:
                slot.close()
        self.sock.close()

    def serve(self, on_serving: Callable[[str], None] = lambda address: None) -> None:
        """Start, call `on_serving(address)`, keep the workers running until SIGTERM or
        SIGINT, then stop them gracefully."""
        # A flag, not an Event: a handler that set an Event could wait on a lock its own
        # thread holds (handlers run on the main thread, between any two bytecodes).
        signalled: list[int] = []
        previous = {
            sig: signal.signal(sig, lambda signum, frame: signalled.append(signum))
            for sig in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            if self.start(signalled):
                on_serving(self.address)
            while not signalled:
                time.sleep(POLL_S)
                self.tend()
            log.info(
                "shutting down %d workers: each finishes its in-flight calls (grace %.0fs)",
                len(self.live()),
                self.grace,
            )
            self.stop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


class SupervisorLink:
    """A worker's end of the pipe from its supervisor: the count of live workers, and a
    call of `on_gone` when the supervisor has exited."""

    def __init__(self, fd: int, on_gone: Callable[[], None]) -> None:
        os.set_inheritable(fd, False)  # the worker's own children must not hold it
        self.fd, self.on_gone = fd, on_gone
        self.workers = 1
        threading.Thread(target=self._listen, name="supervisor-link", daemon=True).start()

    def _listen(self) -> None:
        with os.fdopen(self.fd, "rb", buffering=0) as pipe:
            for line in pipe:
                self.workers = int(line)
        self.on_gone()
