"""An imported ONNX model: forward latency in process beside onnxruntime, and the remote
gradient latency beside the remote forward.

The model, built with onnx.helper (float32, opset 17): a two-layer MLP with a cross-entropy
loss, x (32, 64) -> Gemm 128 -> Relu -> Gemm 10 -> LogSoftmax -> mean of -log p[target].
1. In process: graphgrad's forward (gg.from_onnx, then LocalClient.run of the loss) beside
   onnxruntime's InferenceSession.run on the same bytes (ratio graphgrad / onnxruntime).
2. Remote: a real `graphgrad serve`; the model is registered as ONNX bytes from a raw gRPC
   stub; Run by fingerprint with wrt = the four initializers beside the same Run without wrt
   (ratio gradient / forward).

    python bench/onnx.py [--calls 1000]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# This file is named onnx.py: its folder (sys.path[0] for a script) leaves the front of the
# path so that `import onnx` finds the package, and comes back at the end for _common.
sys.path.pop(0)
sys.path.append(str(Path(__file__).resolve().parent))

import grpc
import numpy as np
import onnxruntime as ort
from _common import graphgrad_server, interleaved_medians, us
from onnx import TensorProto, helper, numpy_helper

import graphgrad as gg
from graphgrad.v1 import service_pb2, service_pb2_grpc, tensor_pb2

BATCH, IN, HIDDEN, OUT = 32, 64, 128, 10


def mlp_model() -> tuple[bytes, dict[str, np.ndarray], dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    params = {
        "W1": rng.normal(0, 0.1, (HIDDEN, IN)),
        "b1": np.zeros(HIDDEN),
        "W2": rng.normal(0, 0.1, (OUT, HIDDEN)),
        "b2": np.zeros(OUT),
    }
    params = {k: v.astype(np.float32) for k, v in params.items()}
    feeds = {
        "x": rng.normal(size=(BATCH, IN)).astype(np.float32),
        "target": np.eye(OUT, dtype=np.float32)[rng.integers(0, OUT, BATCH)],
    }
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], transB=1),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Gemm", ["r", "W2", "b2"], ["logits"], transB=1),
        helper.make_node("LogSoftmax", ["logits"], ["logp"], axis=1),
        helper.make_node("Mul", ["logp", "target"], ["picked"]),
        helper.make_node("ReduceSum", ["picked"], ["total"], keepdims=0),
        helper.make_node("Constant", [], ["scale"], value_float=-1.0 / BATCH),
        helper.make_node("Mul", ["total", "scale"], ["loss"]),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", IN]),
            helper.make_tensor_value_info("target", TensorProto.FLOAT, ["batch", OUT]),
        ],
        [helper.make_tensor_value_info("loss", TensorProto.FLOAT, [])],
        initializer=[numpy_helper.from_array(v, k) for k, v in params.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model.SerializeToString(), params, feeds


def tensor(a: np.ndarray) -> tensor_pb2.Tensor:
    a = np.ascontiguousarray(a, dtype="<f4")
    return tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=a.shape, data=a.tobytes())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=1000)
    args = parser.parse_args()
    data, params, feeds = mlp_model()

    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    imported = gg.from_onnx(data, feeds=feeds)
    local = gg.connect()
    all_feeds = {**feeds, **imported.params}
    ours = local.run(imported.output, all_feeds).value
    theirs = sess.run(["loss"], feeds)[0]
    assert np.allclose(ours, theirs, rtol=1e-4), (ours, theirs)
    t = interleaved_medians(
        {
            "graphgrad": lambda: local.run(imported.output, all_feeds),
            "onnxruntime": lambda: sess.run(["loss"], feeds),
        },
        args.calls,
    )
    print(f"forward in process, MLP {IN}-{HIDDEN}-{OUT} batch {BATCH} float32 (medians):")
    print(f"  graphgrad    {us(t['graphgrad'])}")
    print(f"  onnxruntime  {us(t['onnxruntime'])}")
    print(f"  ratio graphgrad / onnxruntime: {t['graphgrad'] / t['onnxruntime']:.2f}")

    with graphgrad_server("--no-ray") as address, grpc.insecure_channel(address) as channel:
        stub = service_pb2_grpc.GraphServiceStub(channel)
        reg = stub.RegisterGraph(
            service_pb2.RegisterGraphRequest(onnx_model=data, onnx_dims={"batch": BATCH})
        )
        wire_feeds = {k: tensor(v) for k, v in {**feeds, **params}.items()}

        def run(wrt: list[str]) -> service_pb2.RunResponse:
            return stub.Run(
                service_pb2.RunRequest(
                    fingerprint=reg.fingerprint, feeds=wire_feeds, outputs=["loss"], wrt=wrt
                )
            )

        assert sorted(run(sorted(params)).grads) == sorted(params)
        r = interleaved_medians(
            {"gradient": lambda: run(sorted(params)), "forward": lambda: run([])}, args.calls
        )
    print("remote over loopback gRPC, registered as ONNX bytes (medians):")
    print(f"  forward               {us(r['forward'])}")
    print(f"  gradient (4 params)   {us(r['gradient'])}")
    print(f"  ratio gradient / forward: {r['gradient'] / r['forward']:.2f}")


if __name__ == "__main__":
    main()
