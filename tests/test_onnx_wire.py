"""ONNX models over the wire: RegisterGraph and Run take a ModelProto's bytes, against a real
`graphgrad serve`, from a raw gRPC stub (the generated graphgrad.v1 code, no SDK)."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from graphgrad.v1 import graph_pb2, service_pb2, service_pb2_grpc, tensor_pb2

from .server_proc import running_server
from .test_onnx import Case, central_differences, node, ort_run, rand


def tensor(a: np.ndarray) -> tensor_pb2.Tensor:
    a = np.ascontiguousarray(a, dtype="<f8")
    return tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT64, shape=a.shape, data=a.tobytes())


def array(t: tensor_pb2.Tensor) -> np.ndarray:
    assert t.dtype == tensor_pb2.DTYPE_FLOAT64
    return np.frombuffer(t.data, "<f8").reshape(tuple(t.shape))


MLP = Case(
    [
        node("Gemm", ["x", "W1", "b1"], "h", transB=1),
        node("Tanh", ["h"], "t"),
        node("MatMul", ["t", "W2"], "z"),
        node("ReduceSum", ["z"], "loss", keepdims=0),
    ],
    {"x": rand(2, 3)},
    {"W1": rand(4, 3), "b1": rand(4), "W2": rand(4, 2)},
    output="loss",
)


def dynamic_mlp() -> bytes:
    m = MLP.model()
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    return m.SerializeToString()


@pytest.fixture(scope="module")
def address() -> Iterator[str]:
    with running_server() as server:
        yield server.address


@pytest.fixture(scope="module")
def stub(address: str) -> Iterator[service_pb2_grpc.GraphServiceStub]:
    with grpc.insecure_channel(address) as channel:
        yield service_pb2_grpc.GraphServiceStub(channel)


def check_gradients(resp: service_pb2.RunResponse) -> None:
    model = MLP.model()
    assert array(resp.values["loss"]) == pytest.approx(float(ort_run(model, MLP.inputs)), 1e-12)
    numeric = central_differences(model, MLP, np.ones(()))
    assert sorted(resp.grads) == sorted(MLP.inits)
    for k, g in numeric.items():
        np.testing.assert_allclose(array(resp.grads[k]), g, rtol=1e-6, atol=1e-8, err_msg=k)


def feeds() -> dict[str, tensor_pb2.Tensor]:
    return {k: tensor(v) for k, v in {**MLP.inputs, **MLP.inits}.items()}


def test_registered_onnx_bytes_give_gradients_by_initializer_name(stub) -> None:
    reg = stub.RegisterGraph(
        service_pb2.RegisterGraphRequest(onnx_model=dynamic_mlp(), onnx_dims={"batch": 2})
    )
    assert len(reg.fingerprint) == 64
    resp = stub.Run(
        service_pb2.RunRequest(
            fingerprint=reg.fingerprint, feeds=feeds(), outputs=["loss"], wrt=sorted(MLP.inits)
        )
    )
    check_gradients(resp)


def test_run_takes_inline_onnx_bytes_dims_from_the_feeds(stub) -> None:
    resp = stub.Run(
        service_pb2.RunRequest(
            onnx_model=dynamic_mlp(), feeds=feeds(), outputs=["loss"], wrt=sorted(MLP.inits)
        )
    )
    check_gradients(resp)
    again = stub.RegisterGraph(
        service_pb2.RegisterGraphRequest(onnx_model=dynamic_mlp(), onnx_dims={"batch": 2})
    )
    assert again.fingerprint == resp.fingerprint


def test_a_huge_initializer_is_resource_exhausted(stub) -> None:
    m = MLP.model()
    m.graph.initializer[0].dims[:] = [10**9, 3]  # declares 24 GB, holds 96 bytes
    with pytest.raises(grpc.RpcError) as e:
        stub.RegisterGraph(service_pb2.RegisterGraphRequest(onnx_model=m.SerializeToString()))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "'W1'" in e.value.details() and "max_tensor_bytes" in e.value.details()


def test_bad_models_are_invalid_arguments_naming_what(stub) -> None:
    bad = Case([node("Mul", ["x", "w"], "h"), node("Erf", ["h"])], {"x": rand(3)}, {"w": rand(3)})
    cases = {
        bad.model().SerializeToString(): "Erf (opset 13): op type 'Erf' is not supported",
        dynamic_mlp(): "dynamic dimension 0 'batch'",
        b"\x0a\xff": "not an ONNX ModelProto",
    }
    for data, message in cases.items():
        with pytest.raises(grpc.RpcError) as e:
            stub.RegisterGraph(service_pb2.RegisterGraphRequest(onnx_model=data))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in e.value.details()
    both = service_pb2.RegisterGraphRequest(onnx_model=dynamic_mlp(), graph=graph_pb2.Graph())
    with pytest.raises(grpc.RpcError) as e:
        stub.RegisterGraph(both)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not both" in e.value.details()


def test_the_finetuning_example_lowers_the_loss(address: str, capsys) -> None:
    path = Path(__file__).resolve().parents[1] / "examples" / "onnx_finetune.py"
    spec = importlib.util.spec_from_file_location("onnx_finetune", path)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    losses = example.main(address, steps=10)
    assert len(losses) == 11 and losses[-1] < 0.5 * losses[0]
    assert "registered the ONNX model" in capsys.readouterr().out


def test_without_the_onnx_package_the_status_is_failed_precondition(monkeypatch) -> None:
    """Unit test of the server's error layer: the converter's error when `onnx` cannot be
    imported becomes FAILED_PRECONDITION saying so."""
    from graphgrad.onnx import OnnxUnavailableError, from_onnx
    from graphgrad.server.errors import to_status

    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` raises ImportError
    with pytest.raises(OnnxUnavailableError) as e:
        from_onnx(b"")
    status = to_status(e.value)
    assert status.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "cannot read ONNX models" in status.details and "graphgrad[onnx]" in status.details
