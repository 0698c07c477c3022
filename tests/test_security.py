"""TLS with a real self-signed certificate, and bearer-token auth; health stays open."""

from __future__ import annotations

import os
import subprocess
import sys

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import graphgrad as gg
from graphgrad.v1 import service_pb2, service_pb2_grpc

from .server_proc import running_server

TOKEN = "s3cret-token-for-tests"


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-keyout",
            str(d / "key.pem"),
            "-out",
            str(d / "cert.pem"),
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
    )
    return d / "cert.pem", d / "key.pem"


@pytest.fixture(scope="module")
def server(certs, tmp_path_factory):
    token_file = tmp_path_factory.mktemp("auth") / "token"
    token_file.write_text(TOKEN + "\n")
    cert, key = certs
    with running_server(
        "--tls-cert", str(cert), "--tls-key", str(key), "--token-file", str(token_file)
    ) as s:
        yield s


def graph():
    with gg.Graph():
        x = gg.input("x", shape=(2,))
        y = gg.sum(gg.sin(x))
    return x, y


def test_tls_and_token_give_a_gradient(server, certs):
    _, y = graph()
    with gg.connect(server.address, token=TOKEN, tls=certs[0]) as client:
        res = client.run(y, {"x": np.array([0.0, 1.0])}, wrt=["x"])
    np.testing.assert_allclose(res.grads["x"], np.cos([0.0, 1.0]))


@pytest.mark.parametrize("token", [None, "wrong-token"])
def test_missing_or_wrong_token_is_unauthenticated(server, certs, token):
    _, y = graph()
    with gg.connect(server.address, token=token, tls=certs[0]) as client:
        with pytest.raises(gg.RemoteError) as e:
            client.run(y, {"x": np.zeros(2)})
        assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert "bearer token" in e.value.message
        with pytest.raises(gg.RemoteError) as e:
            client.list_ops()
        assert e.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_health_is_open_without_a_token(server, certs):
    creds = grpc.ssl_channel_credentials(root_certificates=certs[0].read_bytes())
    with grpc.secure_channel(server.address, creds) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as e:
            service_pb2_grpc.GraphServiceStub(channel).ListOps(service_pb2.ListOpsRequest())
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_plaintext_client_cannot_talk_to_a_tls_server(server):
    with gg.connect(server.address, token=TOKEN, timeout=5) as client:
        with pytest.raises(gg.RemoteError) as e:
            client.list_ops()
        assert e.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_token_from_the_environment(certs):
    cert, key = certs
    with running_server(
        "--tls-cert", str(cert), "--tls-key", str(key), env={"GRAPHGRAD_TOKEN": "from-env"}
    ) as s:
        _, y = graph()
        with gg.connect(s.address, token="from-env", tls=cert.read_bytes()) as client:
            assert client.run(y, {"x": np.zeros(2)}).value == 0.0
        with gg.connect(s.address, token=TOKEN, tls=cert) as client, pytest.raises(gg.RemoteError):
            client.run(y, {"x": np.zeros(2)})


@pytest.mark.parametrize(
    "token_file, env",
    [
        ("\n", {}),  # a token file holding only a newline
        (" \t\n\n", {}),
        ("two words\n", {}),  # can never match an authorization header
        (None, {"GRAPHGRAD_TOKEN": ""}),  # set, but blank
        (None, {"GRAPHGRAD_TOKEN": "  "}),
        ("missing", {}),  # a token file that cannot be read
    ],
)
def test_auth_fails_closed(tmp_path, token_file, env):
    """A token asked for that cannot work stops the start: one line on stderr, non-zero exit,
    and "serving on" never printed (before, the server started with authentication off)."""
    args = ["--data-dir", str(tmp_path / "data")]
    if token_file is not None:
        path = tmp_path / "token"
        if token_file != "missing":
            path.write_text(token_file)
        args += ["--token-file", str(path)]
    environ = {k: v for k, v in os.environ.items() if k != "GRAPHGRAD_TOKEN"}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "graphgrad.server", "--port", "0", "--no-ray", *args],
            capture_output=True,
            text=True,
            env={**environ, **env},
            timeout=60,
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the server started: {e.stdout!r}")
    assert done.returncode != 0
    assert "serving on" not in done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "token" in lines[0], done.stderr
