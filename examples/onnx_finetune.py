"""Fine-tune an ONNX model with remote gradients.

A small MLP (4 -> 16 -> 3) is exported from PyTorch to ONNX where torch is installed (where
it is not, the example says so and builds the same MLP with onnx.helper). A cross-entropy
loss is appended to the ONNX graph, the model's bytes are registered with a graphgrad server
(RegisterGraph's `onnx_model`), and the weights are trained by plain gradient descent on
gradients the server returns by initializer name. The client below uses only the generated
gRPC stubs and numpy, as a client in any language would.

python examples/onnx_finetune.py            # starts a `graphgrad serve` of its own
python examples/onnx_finetune.py HOST:PORT  # against a running server
"""

from __future__ import annotations

import io
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graphgrad.v1 import service_pb2, service_pb2_grpc, tensor_pb2

IN, HIDDEN, CLASSES, BATCH = 4, 16, 3, 96


def torch_mlp() -> onnx.ModelProto | None:
    """The MLP exported from PyTorch, or None where torch is not installed."""
    try:
        import torch
    except ImportError:
        return None
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(IN, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, CLASSES)
    )
    buf = io.BytesIO()
    torch.onnx.export(
        net,
        (torch.zeros(BATCH, IN),),
        buf,
        input_names=["x"],
        output_names=["logits"],
        opset_version=17,
        dynamo=False,
    )
    return onnx.load_from_string(buf.getvalue())


def helper_mlp() -> onnx.ModelProto:
    """The same MLP as torch exports it (Gemm with transposed weights), built with onnx.helper."""
    rng = np.random.default_rng(0)
    weights = {
        "0.weight": rng.uniform(-0.5, 0.5, (HIDDEN, IN)),
        "0.bias": rng.uniform(-0.5, 0.5, HIDDEN),
        "2.weight": rng.uniform(-0.25, 0.25, (CLASSES, HIDDEN)),
        "2.bias": rng.uniform(-0.25, 0.25, CLASSES),
    }
    nodes = [
        helper.make_node("Gemm", ["x", "0.weight", "0.bias"], ["h"], transB=1),
        helper.make_node("Tanh", ["h"], ["t"]),
        helper.make_node("Gemm", ["t", "2.weight", "2.bias"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [BATCH, IN])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [BATCH, CLASSES])],
        initializer=[numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def with_loss(model: onnx.ModelProto, logits: str) -> onnx.ModelProto:
    """The model with a mean cross-entropy `loss` against a one-hot input `target` appended."""
    g = model.graph
    g.input.append(helper.make_tensor_value_info("target", TensorProto.FLOAT, [BATCH, CLASSES]))
    g.node.extend(
        [
            helper.make_node("LogSoftmax", [logits], ["logp"], axis=1),
            helper.make_node("Mul", ["logp", "target"], ["picked"]),
            helper.make_node("ReduceSum", ["picked"], ["total"], keepdims=0),
            helper.make_node("Constant", [], ["scale"], value_float=-1.0 / BATCH),
            helper.make_node("Mul", ["total", "scale"], ["loss"]),
        ]
    )
    del g.output[:]
    g.output.append(helper.make_tensor_value_info("loss", TensorProto.FLOAT, []))
    onnx.checker.check_model(model)
    return model


def tensor(a: np.ndarray) -> tensor_pb2.Tensor:  # little-endian, row-major, no padding
    a = np.ascontiguousarray(a, dtype="<f4")
    return tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=a.shape, data=a.tobytes())


def array(t: tensor_pb2.Tensor) -> np.ndarray:
    return np.frombuffer(t.data, "<f4").reshape(tuple(t.shape))


@contextmanager
def server(address: str | None) -> Iterator[str]:
    if address:
        yield address
        return
    with tempfile.TemporaryDirectory() as data_dir:
        cmd = [sys.executable, "-m", "graphgrad.server", "--host", "127.0.0.1", "--port", "0"]
        proc = subprocess.Popen(
            [*cmd, "--no-ray", "--data-dir", data_dir], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None
        match = re.search(r"serving on grpcs?://(\S+)", proc.stdout.readline())
        try:
            if match is None:
                raise RuntimeError("graphgrad serve did not start")
            yield match.group(1)
        finally:
            proc.terminate()
            proc.wait(30)


def main(address: str | None = None, steps: int = 200, lr: float = 0.5) -> list[float]:
    """Train; returns the loss of every step."""
    model = torch_mlp()
    if model is None:
        print("torch is not installed: skipping the PyTorch export; building the same MLP")
        print("with onnx.helper instead")
        model = helper_mlp()
    logits = model.graph.output[0].name
    params = {t.name: numpy_helper.to_array(t).copy() for t in model.graph.initializer}
    data = with_loss(model, logits).SerializeToString()

    # three blobs in 4-d, one per class
    rng = np.random.default_rng(1)
    labels = rng.integers(0, CLASSES, BATCH)
    centers = rng.normal(0, 2, (CLASSES, IN))
    x = (centers[labels] + rng.normal(0, 0.5, (BATCH, IN))).astype(np.float32)
    target = np.eye(CLASSES, dtype=np.float32)[labels]

    with server(address) as addr, grpc.insecure_channel(addr) as channel:
        stub = service_pb2_grpc.GraphServiceStub(channel)
        fp = stub.RegisterGraph(service_pb2.RegisterGraphRequest(onnx_model=data)).fingerprint
        print(f"registered the ONNX model: fingerprint {fp[:12]}..., params {sorted(params)}")
        losses = []
        for step in range(steps + 1):
            feeds = {"x": tensor(x), "target": tensor(target)}
            feeds.update({k: tensor(v) for k, v in params.items()})
            resp = stub.Run(
                service_pb2.RunRequest(
                    fingerprint=fp, feeds=feeds, outputs=["loss"], wrt=sorted(params)
                )
            )
            losses.append(float(array(resp.values["loss"])))
            if step % 50 == 0:
                print(f"step {step:4d}  loss {losses[-1]:.4f}")
            for k in params:
                params[k] -= lr * array(resp.grads[k])
    return losses


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
