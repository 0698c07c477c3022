"""The job service over gRPC against real servers: submit, watch, results, list, cancel,
and a server SIGKILLed mid-job that resumes from its checkpoint after a restart."""

from __future__ import annotations

import signal

import grpc
import pytest

import graphgrad as gg
from graphgrad.v1 import jobs_pb2, jobs_pb2_grpc

from .server_proc import running_server
from .test_jobs import init, mlp, own_data


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server("--data-dir", str(tmp_path_factory.mktemp("data"))) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with gg.connect(server.address) as c:
        yield c


def test_submit_watch_and_results_equal_the_in_process_job(client):
    loss, params, data = mlp(8, samples=8), init(20, 8, 0), own_data(20)
    job = client.train(
        loss, params, data, gg.optim.Adam(lr=0.02), steps=60, batch_size=8, seed=5, executor="local"
    )
    job.wait(progress=False)
    assert job.status == "done" and job.progress.networks_done == 20
    local = gg.connect().train(
        loss, params, data, gg.optim.Adam(lr=0.02), steps=60, batch_size=8, seed=5, executor="local"
    )
    local.wait(progress=False)
    assert job.history.tobytes() == local.history.tobytes()
    for k in params:
        assert job.params[k].tobytes() == local.params[k].tobytes()
    assert any(info.id == job.id for info in client.jobs())


@pytest.mark.parametrize(
    "adam",
    [gg.optim.Adam(lr=0.05, beta1=0.0), gg.optim.Adam(lr=0.05, beta2=0.0, eps=1e-3)],
    ids=["beta1=0", "beta2=0"],
)
def test_zero_adam_hyper_parameters_reach_the_server(client, adam):
    """A zero beta is a choice, not "unset": the server trains with it, not with the default."""
    loss, params, data = mlp(8), init(3, 8, 0), own_data(3)
    job = client.train(loss, params, data, adam, steps=10, seed=1, executor="local")
    job.wait(progress=False)
    local = gg.connect().train(loss, params, data, adam, steps=10, seed=1, executor="local")
    local.wait(progress=False)
    assert job.history.tobytes() == local.history.tobytes()


def test_mixed_templates_over_grpc(client):
    narrow, wide = mlp(8), mlp(16)
    shared = {k: v[0] for k, v in own_data(1).items()}
    job = client.train([narrow, wide], [init(3, 8, 1), init(2, 16, 2)], shared, steps=5)
    job.wait(progress=False)
    assert [p["W1"].shape for p in job.params] == [(3, 8, 4), (2, 16, 4)]
    assert job.history.shape == (5, 5)


def test_cancel_and_unknown_and_bad_jobs(server, client):
    job = client.train(mlp(8), init(4, 8, 0), own_data(4), steps=10_000_000)
    job.cancel()
    job.wait(progress=False, timeout=120)
    assert job.status == "cancelled"
    with grpc.insecure_channel(server.address) as channel:
        stub = jobs_pb2_grpc.JobServiceStub(channel)
        with pytest.raises(grpc.RpcError) as e:
            stub.GetJob(jobs_pb2.GetJobRequest(id="nope"))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as e:
            stub.SubmitJob(jobs_pb2.SubmitJobRequest(steps=10))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "no templates" in e.value.details()
    assert job.params["W1"].shape == (4, 8, 4)  # a cancelled job keeps what it trained
    running = client.train(mlp(8), init(4, 8, 0), own_data(4), steps=10_000_000)
    with pytest.raises(gg.RemoteError, match="is (pending|running)"):
        _ = running.params  # results come when it is done or cancelled
    running.delete()


def test_sigkilled_server_resumes_the_job_with_the_same_results(tmp_path):
    loss, params, data = mlp(16), init(64, 16, 3), own_data(64)
    steps = 3000
    args = ("--data-dir", str(tmp_path), "--job-lease-s", "1")  # the dead server's lease lapses
    with running_server(*args) as first, gg.connect(first.address) as c:
        done_job = c.train(loss, params, data, steps=30)
        done_job.wait(progress=False)
        job = c.train(loss, params, data, gg.optim.SGD(lr=0.05, momentum=0.9), steps=steps)
        stream = c.job_stream("WatchJob", jobs_pb2.WatchJobRequest(id=job.id), 120)
        for event in stream:  # until a checkpoint past step 100 is reported
            if event.job.steps_done >= 100:
                break
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(30)
        killed_at = event.job.steps_done
    assert killed_at < steps
    with running_server(*args) as second, gg.connect(second.address) as c:
        resumed = gg.RemoteJob(c, job.id, 1)
        # Progress is read from what is durable: a restart never takes back a reported step.
        assert resumed.progress.steps_done >= killed_at
        resumed.wait(progress=False, timeout=600)
        assert resumed.status == "done"
        survivor = gg.RemoteJob(c, done_job.id, 1)  # finished before the kill: still there
        assert survivor.history.shape == (64, 30)
        reference = gg.connect().train(
            loss, params, data, gg.optim.SGD(lr=0.05, momentum=0.9), steps=steps, executor="local"
        )
        reference.wait(progress=False)
        assert resumed.history.tobytes() == reference.history.tobytes()
        assert resumed.params["W1"].tobytes() == reference.params["W1"].tobytes()


def test_a_job_whose_loss_becomes_nan_says_so_over_grpc(client):
    from .test_display import diverging

    job = client.train(*diverging(n=4, bad=2), steps=5).wait(progress=False)
    assert job.status == "done" and job.progress.networks_nonfinite == 2  # read from the store
    assert "loss NaN or infinite in 2 of 4 networks" in repr(job)
    assert "loss NaN or infinite in 2 of 4 networks" in job._repr_html_()
