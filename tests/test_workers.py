"""`graphgrad serve --workers N` (issue 13, item 3), against real servers: N processes on one
port, each answering in its own name, one embedded Ray for all, SIGTERM draining every
worker, a killed worker replaced."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator

import grpc
import numpy as np
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import graphgrad as gg
from graphgrad import wire
from graphgrad.server import supervisor
from graphgrad.server.logs import worker_id
from graphgrad.v1 import service_pb2, service_pb2_grpc

from .server_proc import running_server

DEADLINE = 30.0  # per call: generous, so a pass never depends on the machine's speed
CONNECTIONS = 200  # fresh connections tried before giving up on seeing every worker


def fresh_channel(address: str) -> grpc.Channel:
    """A channel with a connection of its own (gRPC shares connections between channels to
    one target by default): the kernel picks its worker anew."""
    return grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])


def server_info(channel: grpc.Channel) -> service_pb2.GetServerInfoResponse:
    stub = service_pb2_grpc.GraphServiceStub(channel)
    return stub.GetServerInfo(service_pb2.GetServerInfoRequest(), timeout=DEADLINE)


def pid_of(worker: str) -> int:
    host, pid = worker.rsplit(":", 1)
    assert host == socket.gethostname()
    return int(pid)


def connections_by_worker(address: str, count: int) -> Iterator[tuple[str, grpc.Channel]]:
    """Open fresh connections until `count` different workers have answered; yield each
    worker's name with a channel connected to it (the caller closes those)."""
    seen: set[str] = set()
    for _ in range(CONNECTIONS):
        channel = fresh_channel(address)
        name = server_info(channel).worker
        if name in seen:
            channel.close()
            continue
        seen.add(name)
        yield name, channel
        if len(seen) == count:
            return
    raise AssertionError(f"{CONNECTIONS} connections reached only the workers {sorted(seen)}")


def workers_answering(address: str, count: int) -> dict[str, service_pb2.GetServerInfoResponse]:
    out = {}
    for name, channel in connections_by_worker(address, count):
        with channel:
            out[name] = server_info(channel)
    return out


def square_sum():
    with gg.Graph():
        x = gg.input("x", shape=(3,))
        y = gg.sum(x * x, name="y")
    return y


def run_request(y, x: np.ndarray) -> service_pb2.RunRequest:
    return service_pb2.RunRequest(
        graph=wire.encode_graph(y.graph.freeze()),
        feeds={"x": wire.encode_tensor(x)},
        outputs=[y.name],
        wrt=["x"],
    )


def one_ray(server_pid: int) -> list[psutil.Process]:
    """The GCS servers among the server's processes: one where Ray was started once."""
    tree = psutil.Process(server_pid).children(recursive=True)
    return [p for p in tree if "gcs_server" in p.name()]


def test_workers_answer_in_their_own_names_share_one_ray_and_are_replaced():
    """Two workers, each answering in its own name; one embedded Ray, which a replacement
    of a SIGKILLed worker joins too; the server keeps serving throughout."""
    y, x = square_sum(), np.array([1.0, -2.0, 3.0])
    with running_server("--workers", "2", "--ray-num-cpus", "1", ray=True) as server:
        seen = workers_answering(server.address, 2)
        for name, info in seen.items():
            assert info.workers == 2
            assert psutil.Process(pid_of(name)).ppid() == server.proc.pid
        # One Ray, started once by the supervisor: every worker joined it.
        addresses = {info.ray_address for info in seen.values()}
        assert len(addresses) == 1 and "" not in addresses, addresses
        assert len(one_ray(server.proc.pid)) == 1
        # A Run names the worker that answered, and each computes the same, right gradient.
        for name, channel in connections_by_worker(server.address, 2):
            with channel:
                stub = service_pb2_grpc.GraphServiceStub(channel)
                resp = stub.Run(run_request(y, x), timeout=DEADLINE)
            assert resp.stats.worker == name
            np.testing.assert_array_equal(wire.decode_tensor(resp.grads["x"]), 2 * x)

        killed, survivor = sorted(seen)
        victim = psutil.Process(pid_of(killed))
        victim.kill()
        victim.wait(60)  # connections the kernel queued for it until then are reset
        answers: dict[str, service_pb2.GetServerInfoResponse] = {}

        def a_new_worker_answers() -> bool:
            with fresh_channel(server.address) as channel:
                info = server_info(channel)  # the port is served all along
            answers[info.worker] = info
            return bool(answers.keys() - seen.keys())

        until(a_new_worker_answers, "a new worker answers")
        (replacement,) = answers.keys() - seen.keys()
        assert killed not in answers
        assert answers[replacement].workers == 2
        assert answers[replacement].ray_address in addresses
        assert psutil.Process(pid_of(replacement)).ppid() == server.proc.pid
        assert len(one_ray(server.proc.pid)) == 1
        with fresh_channel(server.address) as channel:
            stub = service_pb2_grpc.GraphServiceStub(channel)
            resp = stub.Run(run_request(y, x), timeout=DEADLINE)
        assert resp.stats.worker in (survivor, replacement)
        np.testing.assert_array_equal(wire.decode_tensor(resp.grads["x"]), 2 * x)


def probe_refused(channel: grpc.Channel) -> bool:
    """Whether a tiny Run on `channel` is refused for want of a run slot (see server_proc)."""
    y = square_sum()
    try:
        service_pb2_grpc.GraphServiceStub(channel).Run(
            run_request(y, np.zeros(3)), timeout=DEADLINE
        )
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return True
        raise
    return False


def until(condition, what: str, tries: int = 2000) -> None:
    """Until `condition()` holds; `tries` (of about 50 ms each) bounds the wait only."""
    for _ in range(tries):
        if condition():
            return
        threading.Event().wait(0.05)
    raise AssertionError(f"never: {what}")


def serving(channel: grpc.Channel) -> bool:
    try:
        check = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=DEADLINE
        )
    except grpc.RpcError:
        return False  # it no longer takes calls at all
    return check.status == health_pb2.HealthCheckResponse.SERVING


def test_sigterm_drains_every_worker():
    """Each worker runs a long call when the server gets SIGTERM: the health of each turns
    from SERVING, new connections are refused, both calls finish with their right answers
    and every process exits."""
    from .test_concurrency import slow_graph

    iterations = 300
    y, x = slow_graph(iterations), np.ones((200, 200))
    # Hand-derived: h @ (I / 2) is h / 2, so every element of h follows t -> tanh(t / 2).
    t = 1.0
    for _ in range(iterations):
        t = np.tanh(t / 2)
    expected = x.size * t
    long_run = service_pb2.RunRequest(
        graph=wire.encode_graph(y.graph.freeze()),
        feeds={"x": wire.encode_tensor(x)},
        outputs=[y.name],
    )
    # One run at a time and no queue per worker: a probe is refused while its long call runs.
    flags = ("--workers", "2", "--grace", "60", "--max-concurrent-runs", "1", "--run-queue", "0")
    with running_server(*flags) as server:
        pinned = list(connections_by_worker(server.address, 2))
        calls = [
            service_pb2_grpc.GraphServiceStub(channel).Run.future(long_run, timeout=120)
            for _, channel in pinned
        ]
        for name, channel in pinned:
            until(lambda: probe_refused(channel), f"{name} runs the long call")  # noqa: B023
        workers = [psutil.Process(pid_of(name)) for name, _ in pinned]
        server.proc.send_signal(signal.SIGTERM)
        for name, channel in pinned:
            until(lambda: not serving(channel), f"{name} stops serving")  # noqa: B023
        with fresh_channel(server.address) as channel, pytest.raises(grpc.RpcError) as refused:
            server_info(channel)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        answers = [call.result() for call in calls]
        assert server.proc.wait(120) == 0
        assert not [w for w in workers if w.is_running()]
        for channel in pinned:
            channel[1].close()
    assert [a.stats.worker for a in answers] == [name for name, _ in pinned]
    for answer in answers:
        np.testing.assert_allclose(wire.decode_tensor(answer.values[y.name]), expected, rtol=1e-12)


def test_one_worker_is_the_server_process_itself():
    """--workers 1 (the default) runs no supervisor: the process started answers."""
    with running_server() as server, fresh_channel(server.address) as channel:
        info = server_info(channel)
        assert (info.worker, info.workers) == (worker_id(server.proc.pid), 1)
        assert not psutil.Process(server.proc.pid).children()
        with gg.connect(server.address) as client:  # the SDK's stats name the worker too
            assert client.run(square_sum(), {"x": np.ones(3)}).stats.worker == info.worker


def test_a_taken_port_stops_the_supervisor_in_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        flags = ["--workers", "2", "--no-ray", "--port", str(port), "--data-dir", str(tmp_path)]
        done = subprocess.run(
            [sys.executable, "-m", "graphgrad.server", *flags],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert (done.returncode, done.stdout) == (1, "")
    assert f"graphgrad serve: cannot listen on 127.0.0.1:{port}: " in done.stderr


def test_a_job_survives_sigkill_of_the_worker_running_it(tmp_path):
    """The worker holding a job's lease is SIGKILLed mid-run: another worker of the same
    server takes the job over and ends it with an uninterrupted run's results. Then the
    supervisor is SIGKILLed: its workers exit too."""
    from .test_job_leases import (
        finish_as_uninterrupted,
        finished_by,
        sharing,
        submit_and_follow,
    )

    with running_server("--workers", "2", *sharing(tmp_path)) as server:
        killed = submit_and_follow(server.address)
        holder = psutil.Process(pid_of(killed.worker))
        assert holder.ppid() == server.proc.pid
        holder.kill()
        holder.wait(60)  # connections the kernel queued for it until then are reset
        finish_as_uninterrupted(server.address, killed)
        assert finished_by(server.log(), killed.id) not in ("", killed.worker)
        # A SIGKILLed supervisor leaves no worker behind: each sees its pipe close, drains.
        workers = [psutil.Process(pid_of(name)) for name in workers_answering(server.address, 2)]
        server.proc.kill()
        server.proc.wait()
        until(lambda: not [w for w in workers if w.is_running()], "every worker has exited")


class ExitingProcess:
    """A worker process's stand-in whose exit the test decides."""

    def __init__(self, pid: int) -> None:
        self.pid, self.returncode = pid, None

    def poll(self) -> int | None:
        return self.returncode


def test_a_worker_dying_young_is_restarted_after_a_pause_that_doubles(monkeypatch):
    """A worker that cannot stay up does not spin the machine; one that served a while is
    replaced at once. Unit test of the supervisor's bookkeeping (processes stood in for)."""
    exited: list[int] = []
    sup = supervisor.Supervisor([], 1, "127.0.0.1", 0, grace=1.0, on_exit=exited.append)
    readers: list[int] = []
    clock = [100.0]

    def spawn() -> supervisor.Worker:
        read, write = os.pipe()
        readers.append(read)
        return supervisor.Worker(ExitingProcess(1000 + len(readers)), write, started=clock[0])

    def die_at(t: float) -> int:
        clock[0] = t
        worker = sup.workers[0]
        assert worker is not None
        worker.proc.returncode = 1
        sup.tend(t)
        return worker.proc.pid

    monkeypatch.setattr(sup, "_spawn", spawn)
    try:
        sup.tend(clock[0])  # the empty slot is filled
        first = die_at(101.0)  # young: replaced after the first pause
        assert sup.workers[0] is None
        sup.tend(101.0 + supervisor.FIRST_PAUSE_S)
        assert sup.workers[0] is not None
        second = die_at(102.0)  # young again: the pause doubles
        sup.tend(102.0 + supervisor.FIRST_PAUSE_S)
        assert sup.workers[0] is None
        sup.tend(102.0 + 2 * supervisor.FIRST_PAUSE_S)
        third = die_at(200.0)  # it served a while: replaced at once
        assert sup.workers[0] is not None and sup.pauses == [0.0]
        assert exited == [first, second, third]
        assert [os.read(fd, 100) for fd in readers[:3]] == [b"1\n"] * 3  # live counts told
    finally:
        for w in sup.workers:
            if w is not None:
                w.close()
        for fd in readers:
            os.close(fd)
        sup.sock.close()
