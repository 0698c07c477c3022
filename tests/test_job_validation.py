"""A training job is checked completely at submit, as a stranger client would send it: every
mistake is INVALID_ARGUMENT naming its field (or RESOURCE_EXHAUSTED naming the limit, for a
job too big for N x steps), nothing is stored, and the server keeps serving, also after a
restart. The in-process client raises the same errors."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

import graphgrad as gg
from graphgrad.v1 import graph_pb2, jobs_pb2, jobs_pb2_grpc, tensor_pb2

from .server_proc import running_server

N, S, B = 3, 16, 8
MIB = 1 << 20
F64, F32 = tensor_pb2.DTYPE_FLOAT64, tensor_pb2.DTYPE_FLOAT32


def inp(name: str, shape: tuple[int, ...]) -> graph_pb2.Node:
    return graph_pb2.Node(name=name, op="input", shape=graph_pb2.Shape(dims=shape), dtype=F64)


def op(name: str, kind: str, *inputs: str) -> graph_pb2.Node:
    return graph_pb2.Node(name=name, op=kind, inputs=inputs)


# loss = sum((x @ w + c - t)^2) over a minibatch of B samples
GRAPH = graph_pb2.Graph(
    nodes=[
        inp("x", (B, 4)),
        inp("t", (B,)),
        inp("w", (4,)),
        inp("c", (1,)),
        op("p", "matmul", "x", "w"),
        op("q", "add", "p", "c"),
        op("d", "sub", "q", "t"),
        op("sq", "mul", "d", "d"),
        op("loss", "sum", "sq"),
    ]
)


def tensor(shape: tuple[int, ...], dtype: int = F64, fill: float = 0.5) -> tensor_pb2.Tensor:
    np_dtype = np.float64 if dtype == F64 else np.float32
    return tensor_pb2.Tensor(
        dtype=dtype, shape=shape, data=np.full(shape, fill, np_dtype).tobytes()
    )


def valid() -> jobs_pb2.SubmitJobRequest:
    req = jobs_pb2.SubmitJobRequest(steps=3, batch_size=B, seed=1)
    req.optimizer.sgd.lr = 0.1
    t = req.templates.add(loss="loss")
    t.graph.CopyFrom(GRAPH)
    t.params["w"].CopyFrom(tensor((N, 4)))
    t.params["c"].CopyFrom(tensor((N, 1)))
    t.data["x"].CopyFrom(tensor((S, 4)))
    t.data["t"].CopyFrom(tensor((S,)))
    return req


Edit = Callable[[jobs_pb2.SubmitJobRequest], object]


def param(name: str, value: tensor_pb2.Tensor, k: int = 0) -> Edit:
    return lambda r: r.templates[k].params[name].CopyFrom(value)


def data(name: str, value: tensor_pb2.Tensor | None) -> Edit:
    def edit(r: jobs_pb2.SubmitJobRequest) -> None:
        if value is None:
            del r.templates[0].data[name]
        else:
            r.templates[0].data[name].CopyFrom(value)

    return edit


def both(*edits: Edit) -> Edit:
    return lambda r: [e(r) for e in edits]


def second_template(r: jobs_pb2.SubmitJobRequest) -> None:
    r.templates.add().CopyFrom(r.templates[0])
    # templates may train different numbers of networks, but not disagree within one
    r.templates[1].data["x"].CopyFrom(tensor((N + 1, S, 4)))


def setattrs(path: str, value: object) -> Edit:
    def edit(r: jobs_pb2.SubmitJobRequest) -> None:
        *parents, leaf = path.split(".")
        target: object = r
        for p in parents:
            target = getattr(target, p)
        setattr(target, leaf, value)

    return edit


P = "templates[0]."
INVALID: dict[str, tuple[Edit, str]] = {
    "param-trailing-shape": (param("w", tensor((N, 5))), P + "params['w']"),
    "param-dtype": (param("w", tensor((N, 4), F32)), P + "params['w']"),
    "param-scalar": (param("c", tensor(())), P + "params['c']"),
    "param-not-a-node": (param("zz", tensor((N, 1))), P + "params['zz']"),
    "param-not-an-input": (param("sq", tensor((N, B))), P + "params['sq']"),
    "param-nan": (param("c", tensor((N, 1), fill=np.nan)), P + "params['c']"),
    "params-disagree-on-n": (param("w", tensor((N + 1, 4))), P + "params['w']"),
    "templates-disagree": (second_template, "templates[1].data['x']"),
    "n-zero": (both(param("w", tensor((0, 4))), param("c", tensor((0, 1)))), P + "params["),
    "data-not-a-node": (data("nope", tensor((S,))), P + "data['nope']"),
    "data-not-an-input": (data("loss", tensor((S,))), P + "data['loss']"),
    "missing-input": (data("t", None), P + "data['t']"),
    "data-wrong-leading-n": (data("x", tensor((N + 1, S, 4))), P + "data['x']"),
    "data-wrong-rank": (data("x", tensor((S,))), P + "data['x']"),
    "data-float32": (data("x", tensor((S, 4), F32)), P + "data['x']"),
    "data-empty": (both(data("x", tensor((0, 4))), data("t", tensor((0,)))), P + "data['t']"),
    "batch-larger-than-data": (
        both(data("x", tensor((4, 4))), data("t", tensor((4,)))),
        P + "data['t']",  # the first in name order
    ),
    "batch-negative": (setattrs("batch_size", -1), "batch_size"),
    "no-batch-and-data-not-the-template's": (setattrs("batch_size", 0), P + "data['t']"),
    "negative-seed": (setattrs("seed", -1), "seed"),
    "loss-unknown": (lambda r: setattr(r.templates[0], "loss", "nope"), P + "loss"),
    "loss-not-scalar": (lambda r: setattr(r.templates[0], "loss", "q"), P + "loss"),
    "steps-zero": (setattrs("steps", 0), "steps"),
    "steps-int32-max": (setattrs("steps", 2**31 - 1), "steps"),
    "lr-nan": (setattrs("optimizer.sgd.lr", float("nan")), "optimizer.sgd.lr"),
    "lr-inf": (setattrs("optimizer.sgd.lr", float("inf")), "optimizer.sgd.lr"),
    "lr-negative": (setattrs("optimizer.sgd.lr", -0.1), "optimizer.sgd.lr"),
    "momentum-nan": (setattrs("optimizer.sgd.momentum", float("nan")), "optimizer.sgd.momentum"),
    "adam-beta1-one": (setattrs("optimizer.adam.beta1", 1.0), "optimizer.adam.beta1"),
    "adam-beta2-one": (setattrs("optimizer.adam.beta2", 1.0), "optimizer.adam.beta2"),
    "adam-eps-negative": (setattrs("optimizer.adam.eps", -1e-8), "optimizer.adam.eps"),
    "adam-lr-nan": (setattrs("optimizer.adam.lr", float("nan")), "optimizer.adam.lr"),
    "no-optimizer": (lambda r: r.ClearField("optimizer"), "optimizer"),
    "unknown-executor": (setattrs("executor", 7), "executor"),
    "no-templates": (lambda r: r.ClearField("templates"), "templates"),
}

TOO_BIG: dict[str, Edit] = {
    # --max-request-bytes is 64 MiB below: the history alone is 3 x 10^7 x 8 bytes
    "steps": setattrs("steps", 10_000_000),
    # tiny tensors, many networks: 2 x 10^6 networks x 100 steps of history
    "networks": both(
        setattrs("steps", 100),
        param("w", tensor((2_000_000, 4))),
        param("c", tensor((2_000_000, 1))),
    ),
}


def bad_request_field(e: grpc.RpcError) -> str:
    for d in rpc_status.from_call(e).details:
        if d.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            msg = error_details_pb2.BadRequest()
            d.Unpack(msg)
            return msg.field_violations[0].field
    raise AssertionError(f"no BadRequest in {e}")


def quota_subject(e: grpc.RpcError) -> str:
    for d in rpc_status.from_call(e).details:
        if d.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            msg = error_details_pb2.QuotaFailure()
            d.Unpack(msg)
            return msg.violations[0].subject
    raise AssertionError(f"no QuotaFailure in {e}")


def adam(r: jobs_pb2.SubmitJobRequest) -> None:
    r.optimizer.adam.lr = 1e-3


def test_every_bad_job_is_refused_at_submit_and_nothing_is_stored(tmp_path):
    args = ("--data-dir", str(tmp_path), "--max-request-bytes", str(64 * MIB))
    refused = []
    with running_server(*args) as server, grpc.insecure_channel(server.address) as channel:
        stub = jobs_pb2_grpc.JobServiceStub(channel)
        for case, (edit, field) in sorted(INVALID.items()):
            req = valid()
            if case.startswith("adam"):
                adam(req)
            edit(req)
            with pytest.raises(grpc.RpcError) as e:
                stub.SubmitJob(req, timeout=60)
            code = e.value.code()
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (case, code, e.value.details())
            got = bad_request_field(e.value)
            assert got.startswith(field), (case, got, e.value.details())
            refused.append(case)
        for case, edit in TOO_BIG.items():
            req = valid()
            edit(req)
            with pytest.raises(grpc.RpcError) as e:
                stub.SubmitJob(req, timeout=60)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (case, e.value.details())
            assert quota_subject(e.value) == "max_request_bytes"
            assert "networks" in e.value.details() and "steps" in e.value.details()
        assert list(stub.ListJobs(jobs_pb2.ListJobsRequest(), timeout=30).jobs) == []
        ok = stub.SubmitJob(valid(), timeout=60).id  # and a good job is still accepted
    assert len(refused) == len(INVALID)
    with running_server(*args) as again, grpc.insecure_channel(again.address) as channel:
        jobs = jobs_pb2_grpc.JobServiceStub(channel).ListJobs(jobs_pb2.ListJobsRequest()).jobs
        assert [j.id for j in jobs] == [ok]


def mlp_template():
    with gg.Graph():
        x = gg.input("x", shape=(B, 4))
        t = gg.input("t", shape=(B,))
        w = gg.input("w", shape=(4,))
        c = gg.input("c", shape=(1,))
        d = x @ w + c - t
        loss = gg.sum(d * d, name="loss")
    return loss


def sdk_args(**changes):
    kw = dict(
        params={"w": np.full((N, 4), 0.5), "c": np.zeros((N, 1))},
        data={"x": np.full((S, 4), 0.5), "t": np.zeros(S)},
        optimizer=gg.optim.SGD(lr=0.1),
        steps=3,
        batch_size=B,
        seed=1,
    )
    for key, value in changes.items():
        kw[key] = {**kw[key], **value} if isinstance(value, dict) else value
    return kw


SDK_INVALID = {
    "param-trailing-shape": (sdk_args(params={"w": np.zeros((N, 5))}), P + "params['w']"),
    "param-dtype": (sdk_args(params={"w": np.zeros((N, 4), np.float32)}), P + "params['w']"),
    "param-not-a-node": (sdk_args(params={"zz": np.zeros((N, 1))}), P + "params['zz']"),
    "params-disagree-on-n": (sdk_args(params={"w": np.zeros((N + 1, 4))}), P + "params['w']"),
    "data-float32": (sdk_args(data={"x": np.zeros((S, 4), np.float32)}), P + "data['x']"),
    "data-wrong-leading-n": (sdk_args(data={"x": np.zeros((N + 1, S, 4))}), P + "data['x']"),
    "batch-larger-than-data": (
        sdk_args(data={"x": np.zeros((4, 4)), "t": np.zeros(4)}),
        P + "data['t']",
    ),
    "negative-seed": (sdk_args(seed=-1), "seed"),
    "steps-int32-max": (sdk_args(steps=2**31 - 1), "steps"),
}


@pytest.mark.parametrize("case", sorted(SDK_INVALID))
def test_the_in_process_client_raises_the_same_errors(case):
    kw, field = SDK_INVALID[case]
    with pytest.raises(gg.RequestError) as e:
        gg.connect().train(mlp_template(), **kw)
    assert e.value.field == field


def test_optimizers_refuse_bad_hyper_parameters_in_the_sdk():
    with pytest.raises(gg.RequestError, match="lr") as e:
        gg.optim.SGD(lr=float("nan"))
    assert e.value.field == "lr"
    with pytest.raises(gg.RequestError, match="beta2") as e:
        gg.optim.Adam(beta2=1.0)
    assert e.value.field == "beta2"


@pytest.mark.parametrize("address", [None, "127.0.0.1:9"], ids=["in-process", "remote"])
def test_both_clients_refuse_an_unknown_executor_before_sending_anything(address):
    client = gg.connect() if address is None else gg.connect(address)  # nothing listens on 9
    with pytest.raises(gg.RequestError) as e:
        client.train(mlp_template(), **sdk_args(), executor="gpu")
    assert e.value.field == "executor"
