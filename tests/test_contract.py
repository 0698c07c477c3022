"""The .proto files stand alone: generated code is fresh, and a client built only from the
.proto files (stubs generated here, in a scratch directory, no SDK) computes a gradient."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .server_proc import running_server

ROOT = Path(__file__).resolve().parents[1]


def test_generated_code_is_fresh():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "proto" / "generate.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


STRANGER = """
import sys
import grpc
import numpy as np
from contract import graph_pb2, service_pb2, service_pb2_grpc, tensor_pb2

assert "graphgrad" not in sys.modules

def tensor(values):  # the documented encoding: little-endian, row-major, no padding
    a = np.asarray(values, dtype="<f8")
    return tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT64, shape=a.shape, data=a.tobytes())

def node(name, op, *inputs, shape=None):
    n = graph_pb2.Node(name=name, op=op, inputs=inputs)
    if shape is not None:
        n.shape.dims[:] = shape
        n.dtype = tensor_pb2.DTYPE_FLOAT64
    return n

# The lecture's second example: z = x^2, y = x / z, so dy/dx = -1/x^2 along two paths.
graph = graph_pb2.Graph(nodes=[node("x", "input", shape=[]), node("z", "mul", "x", "x"),
                               node("y", "div", "x", "z")])
with grpc.insecure_channel(sys.argv[1]) as channel:
    stub = service_pb2_grpc.GraphServiceStub(channel)
    fp = stub.RegisterGraph(service_pb2.RegisterGraphRequest(graph=graph)).fingerprint
    resp = stub.Run(service_pb2.RunRequest(fingerprint=fp, feeds={"x": tensor(3.0)},
                                           outputs=["y"], wrt=["x"]))
g = resp.grads["x"]
assert list(g.shape) == [] and g.dtype == tensor_pb2.DTYPE_FLOAT64
y = float(np.frombuffer(resp.values["y"].data, "<f8")[0])
print(repr(y), repr(float(np.frombuffer(g.data, "<f8")[0])))
"""


def test_a_client_from_the_proto_alone_computes_a_gradient(tmp_path):
    """Compile the .proto files into a package named `contract`, as a stranger would, and use
    it from a process that never imports graphgrad."""
    src = tmp_path / "src" / "contract"
    src.mkdir(parents=True)
    for proto in (ROOT / "proto" / "graphgrad" / "v1").glob("*.proto"):
        text = proto.read_text().replace('import "graphgrad/v1/', 'import "contract/')
        (src / proto.name).write_text(text)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{tmp_path / 'src'}",
            f"--python_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            *[f"contract/{p.name}" for p in src.glob("*.proto")],
        ],
        check=True,
    )
    (tmp_path / "contract" / "__init__.py").touch()
    (tmp_path / "stranger.py").write_text(STRANGER)
    with running_server() as server:
        proc = subprocess.run(
            [sys.executable, "stranger.py", server.address],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert proc.returncode == 0, proc.stderr
    y, dydx = (float(v) for v in proc.stdout.split())
    assert y == pytest.approx(1 / 3, rel=1e-15)
    assert dydx == pytest.approx(-1 / 9, rel=1e-15)
