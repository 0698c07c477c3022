"""The job store never loses or poisons data, against real servers on temporary data dirs:
rejected jobs store nothing, corrupt rows fail alone, history is appended in rows of its own,
jobs can be deleted, and running jobs are bounded with the rest queued in submission order."""

from __future__ import annotations

import io
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

import graphgrad as gg
from graphgrad._train_specs import build_specs
from graphgrad.engine import LimitError
from graphgrad.engine.dispatch import Dispatcher
from graphgrad.engine.training_run import TrainingRun, group_specs
from graphgrad.server.job_manager import JobManager
from graphgrad.server.job_service import spec_decoder
from graphgrad.server.runtime import Runtime
from graphgrad.server.store import JobStore
from graphgrad.v1 import jobs_pb2, jobs_pb2_grpc, service_pb2, service_pb2_grpc, tensor_pb2
from graphgrad.wire import encode_graph, encode_job, encode_tensor

from .server_proc import running_server
from .test_jobs import init, mlp, own_data

Request = jobs_pb2.SubmitJobRequest
STARTED = ("pending", "running")
STARTED_STATUSES = (jobs_pb2.JOB_STATUS_PENDING, jobs_pb2.JOB_STATUS_RUNNING)


def job_request(n: int = 2, steps: int = 20) -> Request:
    specs = build_specs(mlp(8), init(n, 8, 0), own_data(n), gg.optim.SGD(lr=0.1), steps, None, 0)
    return encode_job(specs, "local")


def with_tensor(kind: str, name: str, value: np.ndarray) -> Callable[[Request], None]:
    def edit(req: Request) -> None:
        encode_tensor(value, getattr(req.templates[0], kind)[name])

    return edit


def without(kind: str, name: str) -> Callable[[Request], None]:
    return lambda req: getattr(req.templates[0], kind).pop(name) and None


def set_field(**fields: object) -> Callable[[Request], None]:
    def edit(req: Request) -> None:
        for k, v in fields.items():
            if k == "loss":
                req.templates[0].loss = str(v)
            else:
                setattr(req, k, v)

    return edit


# Each of these was stored before being rejected, and then bricked the server (issue 10.1).
REJECTED = {
    "param trailing shape": with_tensor("params", "W1", np.zeros((2, 8, 5))),
    "param dtype": with_tensor("params", "W1", np.zeros((2, 8, 4), np.float32)),
    "param not an input": with_tensor("params", "nope", np.zeros((2, 3))),
    "data not an input": with_tensor("data", "nope", np.zeros((2, 3))),
    "N disagrees across params": with_tensor("params", "b1", np.zeros((3, 8))),
    "missing input": without("data", "t"),
    "non-scalar loss": set_field(loss="W1"),
    "unknown loss": set_field(loss="nope"),
    "data with the wrong leading N": with_tensor("data", "x", np.zeros((3, 32, 4))),
    "data with the wrong rank": with_tensor("data", "x", np.zeros((2, 2, 32, 4))),
    "steps = 2**31-1": set_field(steps=2**31 - 1),
    # Passes the spec's checks, fails when the run is built: stored and resumed at every start.
    "Ray asked of a --no-ray server": set_field(executor=service_pb2.EXECUTOR_RAY),
    "N = 0": lambda req: (
        [
            encode_tensor(np.zeros((0, *v.shape[1:])), req.templates[0].params[k])
            for k, v in init(1, 8, 0).items()
        ]
        and None
    ),
}


def stub_of(server) -> jobs_pb2_grpc.JobServiceStub:
    return jobs_pb2_grpc.JobServiceStub(grpc.insecure_channel(server.address))


def quota_subject(e: grpc.RpcError) -> str:
    status = rpc_status.from_call(e)
    assert status is not None
    detail = error_details_pb2.QuotaFailure()
    assert status.details[0].Unpack(detail)
    return detail.violations[0].subject


def test_rejected_jobs_store_nothing_and_the_server_restarts_clean(tmp_path):
    args = ("--data-dir", str(tmp_path), "--max-request-bytes", str(256 << 20))
    with running_server(*args) as server:
        stub = stub_of(server)
        for case, edit in REJECTED.items():
            req = job_request()
            edit(req)
            with pytest.raises(grpc.RpcError) as e:
                stub.SubmitJob(req, timeout=60)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (case, e.value.details())
        huge = job_request()
        huge.steps = 50_000_000  # its history alone would take 2 x 5e7 x 8 bytes
        with pytest.raises(grpc.RpcError) as e:
            stub.SubmitJob(huge, timeout=60)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert quota_subject(e.value) == "max_request_bytes"
        assert list(stub.ListJobs(jobs_pb2.ListJobsRequest(), timeout=60).jobs) == []
    with sqlite3.connect(tmp_path / "jobs.sqlite3") as db:
        assert db.execute("SELECT count(*) FROM jobs").fetchone() == (0,)
    with running_server(*args) as again, gg.connect(again.address) as c:
        assert c.jobs() == []
        job = c.train(mlp(8), init(2, 8, 0), own_data(2), steps=5)
        assert job.wait(progress=False).status == "done"


def test_a_checkpoint_too_big_for_the_store_is_refused_before_anything_is_stored(tmp_path):
    dispatcher = Dispatcher(ray_enabled=False)
    store = JobStore(tmp_path / "jobs.sqlite3", max_blob_bytes=30_000)
    decode = spec_decoder(Runtime.create(None, dispatcher))
    manager = JobManager(store, dispatcher, decode)  # type: ignore[arg-type]

    def adam_request(n: int) -> bytes:  # shared data: the spec grows slower than Adam's state
        shared = {k: v[0] for k, v in own_data(1).items()}
        adam = gg.optim.Adam()
        specs = build_specs(mlp(8), init(n, 8, 0), shared, adam, 5, None, 0)
        return encode_job(specs, "local").SerializeToString()

    assert len(adam_request(40)) < 30_000
    manager.submit(adam_request(2))
    with pytest.raises(LimitError) as e:
        manager.submit(adam_request(40))
    assert e.value.limit == "max_blob_bytes" and "checkpoint" in str(e.value)
    assert len(store.summaries()) == 1


def test_a_write_that_fails_mid_job_fails_the_job_durably(tmp_path):
    with gg.Graph():  # one weight per network: history segments outgrow the checkpoint
        w, x = gg.input("w", shape=(1,)), gg.input("x", shape=(4,))
        loss = gg.sum((w * x) ** 2, name="loss")
    sgd = gg.optim.SGD(lr=0.01)
    specs = build_specs(loss, {"w": np.ones((100, 1))}, {"x": np.ones(4)}, sgd, 60, None, 0)
    spec = encode_job(specs, "local").SerializeToString()
    dispatcher = Dispatcher(ray_enabled=False)
    store = JobStore(tmp_path / "jobs.sqlite3", max_blob_bytes=8_000)  # a segment: 20 kB
    decode = spec_decoder(Runtime.create(None, dispatcher))
    job_id = JobManager(store, dispatcher, decode).submit(spec)  # type: ignore[arg-type]
    while (summary := store.summary(job_id)) is not None and summary.status in STARTED:
        time.sleep(0.05)  # until its thread has written its end
    assert summary is not None and summary.status == "failed", summary
    assert "too big" in summary.error
    again = JobManager(store, dispatcher, decode)  # type: ignore[arg-type]
    again.resume_all()  # a failed job is not run again
    assert again.job(job_id).view().status == "failed"
    again.close()


def npz(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def test_corrupt_rows_fail_alone_and_everything_else_keeps_serving(tmp_path):
    args = ("--data-dir", str(tmp_path))
    params, data = init(3, 8, 1), own_data(3)
    with running_server(*args) as first, gg.connect(first.address) as c:
        job = c.train(mlp(8), params, data, steps=15)
        job.wait(progress=False)
        good_history, good_w1 = job.history, job.params["W1"]
    db = sqlite3.connect(tmp_path / "jobs.sqlite3")
    spec, blob = db.execute("SELECT spec, checkpoint FROM jobs WHERE id = ?", (job.id,)).fetchone()
    with np.load(io.BytesIO(blob)) as z:
        arrays = dict(z)
    lacking = {k: v for k, v in arrays.items() if k != "0/p/W1"}
    holding_object = {**arrays, "0/p/W1": np.array([None, {"a": 1}], dtype=object)}
    rows = {  # id: (status, spec, checkpoint): each one thing wrong
        "running-intact": ("running", spec, blob),
        "running-garbage": ("running", spec, b"not an npz at all"),
        "running-lacks-keys": ("running", spec, npz(lacking)),
        "running-wrong-layout": ("running", spec, npz({**arrays, "layout": np.array([2, 9])})),
        "running-object-array": ("running", spec, npz(holding_object)),
        "running-bad-spec": ("running", b"\xff\xfe not a protobuf", blob),
        "done-bad-blob": ("done", spec, b"\x00" * 64),
        "done-unknown-status": ("weird", spec, blob),
    }
    history = db.execute(
        "SELECT chunk, first, networks, steps, losses FROM history WHERE job_id = ?", (job.id,)
    ).fetchall()
    with db:
        for i, (status, s, b) in rows.items():
            db.execute(
                "INSERT INTO jobs (id, spec, status, created, checkpoint) VALUES (?, ?, ?, 1, ?)",
                (i, s, status, b),
            )
            db.executemany(
                "INSERT INTO history VALUES (?, ?, ?, ?, ?, ?)", [(i, *h) for h in history]
            )
    db.close()
    with running_server(*args) as second, gg.connect(second.address) as c:
        stub = stub_of(second)
        for i in rows:  # an unfinished row is read when its job starts: until it ends
            follow(stub, i, lambda j: j.status not in STARTED_STATUSES)
        listed = {info.id: info for info in c.jobs()}
        assert set(listed) == {job.id, *rows}
        for i in rows:
            if i == "running-intact":
                continue
            info = stub.GetJob(jobs_pb2.GetJobRequest(id=i), timeout=60).job
            assert info.status == jobs_pb2.JOB_STATUS_FAILED, i
            assert "cannot be" in info.error, (i, info.error)
            assert listed[i].status == "failed", i
            with pytest.raises(gg.RemoteError) as e:
                _ = gg.RemoteJob(c, i, 1).params
            assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT, i
        intact = gg.RemoteJob(c, "running-intact", 1).wait(progress=False, timeout=120)
        assert intact.status == "done"
        for handle in (intact, gg.RemoteJob(c, job.id, 1)):
            assert handle.history.tobytes() == good_history.tobytes()
            assert handle.params["W1"].tobytes() == good_w1.tobytes()


def test_a_finished_job_reads_back_under_smaller_limits_and_keeps_users_graphs(tmp_path):
    with running_server("--data-dir", str(tmp_path)) as first, gg.connect(first.address) as c:
        job = c.train(mlp(8), init(3, 8, 0), own_data(3), steps=15)
        job.wait(progress=False)
        good_history, good_w1 = job.history, job.params["W1"]
    smaller = ("--max-request-bytes", "1024", "--graph-cache-size", "1")
    with running_server("--data-dir", str(tmp_path), *smaller) as second:
        with gg.Graph():  # a user's graph: the only one the cache keeps
            y = gg.mul(gg.input("x", shape=(3,)), 2.0, name="y")
        graphs = service_pb2_grpc.GraphServiceStub(grpc.insecure_channel(second.address))
        request = service_pb2.RegisterGraphRequest(graph=encode_graph(y.graph.freeze()))
        fp = graphs.RegisterGraph(request, timeout=60).fingerprint
        with gg.connect(second.address) as c:
            assert [(j.id, j.status) for j in c.jobs()] == [(job.id, "done")]
            again = gg.RemoteJob(c, job.id, 1)
            assert again.history.tobytes() == good_history.tobytes()
            assert again.params["W1"].tobytes() == good_w1.tobytes()
        x = np.array([1.0, 2.0, 3.0])
        run = service_pb2.RunRequest(fingerprint=fp, feeds={"x": tensor_of(x)}, outputs=["y"])
        value = graphs.Run(run, timeout=60).values["y"]
        np.testing.assert_array_equal(np.frombuffer(value.data, "<f8"), 2 * x)


def tensor_of(a: np.ndarray) -> tensor_pb2.Tensor:
    t = tensor_pb2.Tensor()
    encode_tensor(a, t)
    return t


def test_a_store_that_is_not_sqlite_is_one_fatal_line(tmp_path):
    (tmp_path / "jobs.sqlite3").write_bytes(b"this is not a database, " * 100)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "graphgrad.server",
            "--port",
            "0",
            "--no-ray",
            "--data-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "serving on" not in proc.stdout
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "job store" in lines[0] and "jobs.sqlite3" in lines[0]


def legacy_store(path: Path, rows: list[tuple[str, str, Request, bytes, int]]) -> None:
    """A store as servers before history rows wrote it: (id, status, spec, checkpoint, step)."""
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE jobs (id TEXT PRIMARY KEY, spec BLOB NOT NULL, status TEXT NOT NULL, "
            "error TEXT NOT NULL DEFAULT '', created REAL NOT NULL, checkpoint BLOB, "
            "steps_done INTEGER NOT NULL DEFAULT 0)"
        )
        db.executemany(
            "INSERT INTO jobs VALUES (?, ?, ?, '', 1, ?, ?)",
            [(i, req.SerializeToString(), status, blob, k) for i, status, req, blob, k in rows],
        )


def test_a_store_of_the_old_schema_is_migrated_and_its_job_resumes(tmp_path):
    loss, params, data, steps, k = mlp(8), init(3, 8, 2), own_data(3), 40, 15
    optimizer = gg.optim.SGD(lr=0.1, momentum=0.5)
    specs = build_specs(loss, params, data, optimizer, k, None, 0)
    part = TrainingRun(group_specs(specs)[0])
    part.run()  # the first k steps, as the old server checkpointed them
    with np.load(io.BytesIO(part.checkpoint())) as z:
        old = {key: v for key, v in z.items() if not key.endswith("/last")}
    done = {**old, "0/history": part.history()}  # a finished job of k steps
    old["0/history"] = np.full((3, steps), np.nan)
    old["0/history"][:, :k] = part.history()
    short = encode_job(specs, "local")
    specs = build_specs(loss, params, data, optimizer, steps, None, 0)
    full = encode_job(specs, "local")
    rows = [("legacy", "running", full, npz(old), k), ("legacy-done", "done", short, npz(done), k)]
    legacy_store(tmp_path / "jobs.sqlite3", rows)
    with running_server("--data-dir", str(tmp_path)) as server, gg.connect(server.address) as c:
        finished = gg.RemoteJob(c, "legacy-done", 1)
        assert finished.status == "done", c.jobs()
        assert finished.progress.steps_done == k
        assert finished.history.tobytes() == part.history().tobytes()
        job = gg.RemoteJob(c, "legacy", 1).wait(progress=False, timeout=120)
        reference = gg.connect().train(loss, params, data, optimizer, steps=steps)
        reference.wait(progress=False)
        assert job.history.tobytes() == reference.history.tobytes()
        assert job.params["W1"].tobytes() == reference.params["W1"].tobytes()


def test_checkpoints_hold_no_history_and_history_rows_add_up(tmp_path):
    def checkpoint_bytes(steps: int) -> int:
        specs = build_specs(mlp(8), init(4, 8, 0), own_data(4), gg.optim.Adam(), steps, None, 0)
        return len(TrainingRun(group_specs(specs)[0]).checkpoint())

    assert checkpoint_bytes(10) == checkpoint_bytes(1_000_000)  # bounded writes per checkpoint
    with running_server("--data-dir", str(tmp_path)) as server, gg.connect(server.address) as c:
        job = c.train(mlp(8), init(4, 8, 0), own_data(4), steps=300).wait(progress=False)
    with sqlite3.connect(tmp_path / "jobs.sqlite3") as db:
        stored = db.execute(
            "SELECT sum(networks * steps), sum(length(losses)) FROM history WHERE job_id = ?",
            (job.id,),
        ).fetchone()
        (blob,) = db.execute("SELECT length(checkpoint) FROM jobs").fetchone()
    assert stored == (4 * 300, 8 * 4 * 300)
    assert blob < 8 * 4 * 300  # parameters only: smaller than the history


def follow(stub: jobs_pb2_grpc.JobServiceStub, job_id: str, until: Callable[..., bool]):
    for event in stub.WatchJob(jobs_pb2.WatchJobRequest(id=job_id), timeout=300):
        if until(event.job):
            return event.job
    return stub.GetJob(jobs_pb2.GetJobRequest(id=job_id), timeout=60).job


def test_delete_and_cancelled_partial_results(tmp_path):
    long = job_request(n=2, steps=100_000)
    with running_server("--data-dir", str(tmp_path)) as server, gg.connect(server.address) as c:
        stub = stub_of(server)
        running = stub.SubmitJob(long, timeout=60).id
        follow(stub, running, lambda j: j.steps_done > 0)
        stub.DeleteJob(jobs_pb2.DeleteJobRequest(id=running), timeout=120)
        for call, req in (
            (stub.GetJob, jobs_pb2.GetJobRequest(id=running)),
            (stub.DeleteJob, jobs_pb2.DeleteJobRequest(id=running)),
        ):
            with pytest.raises(grpc.RpcError) as e:
                call(req, timeout=60)
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
        done = c.train(mlp(8), init(2, 8, 0), own_data(2), steps=5).wait(progress=False)
        done.delete()
        with pytest.raises(gg.RemoteError, match="no job"):
            _ = done.status
        assert c.jobs() == []

        cancelled = gg.RemoteJob(c, stub.SubmitJob(long, timeout=60).id, 1)
        follow(stub, cancelled.id, lambda j: j.steps_done > 0)
        cancelled.cancel()
        info = follow(stub, cancelled.id, lambda j: j.status == jobs_pb2.JOB_STATUS_CANCELLED)
        k = info.steps_done
        assert 0 < k < 100_000
        history = cancelled.history
        assert history.shape == (2, 100_000)
        assert np.isfinite(history[:, :k]).all() and np.isnan(history[:, k:]).all()
        specs = build_specs(mlp(8), init(2, 8, 0), own_data(2), gg.optim.SGD(lr=0.1), k, None, 0)
        reference = TrainingRun(group_specs(specs)[0])
        reference.run()  # the same first k steps
        assert history[:, :k].tobytes() == reference.history().tobytes()
        assert cancelled.params["W1"].tobytes() == reference.params()[0]["W1"].tobytes()
    with sqlite3.connect(tmp_path / "jobs.sqlite3") as db:
        ids = {i for (i,) in db.execute("SELECT DISTINCT job_id FROM history")}
        assert ids == {cancelled.id}  # the deleted jobs left nothing behind


def test_in_process_delete():
    job = gg.connect().train(mlp(8), init(2, 8, 0), own_data(2), steps=1_000_000)
    job.delete()
    assert job.done
    with pytest.raises(gg.RequestError, match="was deleted"):
        _ = job.params


def test_running_jobs_are_bounded_and_the_rest_queue_in_order(tmp_path):
    args = ("--data-dir", str(tmp_path), "--max-running-jobs", "1", "--max-queued-jobs", "2")
    long = job_request(n=2, steps=1_000_000)
    with running_server(*args) as server:
        stub = stub_of(server)
        ids = [stub.SubmitJob(long, timeout=60).id for _ in range(3)]
        with pytest.raises(grpc.RpcError) as e:
            stub.SubmitJob(long, timeout=60)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert quota_subject(e.value) == "max_queued_jobs"
        follow(stub, ids[0], lambda j: j.steps_done > 0)
        states = [stub.GetJob(jobs_pb2.GetJobRequest(id=i), timeout=60).job.status for i in ids]
        assert states == [jobs_pb2.JOB_STATUS_RUNNING] + [jobs_pb2.JOB_STATUS_PENDING] * 2
    with running_server(*args) as again:  # resumed in submission order
        stub = stub_of(again)
        follow(stub, ids[0], lambda j: j.steps_done > 0)
        stub.CancelJob(jobs_pb2.CancelJobRequest(id=ids[0]), timeout=60)
        follow(stub, ids[1], lambda j: j.status == jobs_pb2.JOB_STATUS_RUNNING)
        status = stub.GetJob(jobs_pb2.GetJobRequest(id=ids[2]), timeout=60).job.status
        assert status == jobs_pb2.JOB_STATUS_PENDING
        for i in ids[1:]:
            stub.DeleteJob(jobs_pb2.DeleteJobRequest(id=i), timeout=120)
