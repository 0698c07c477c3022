"""The in-process SDK: building graphs, feeds, gradients, errors."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import graphgrad as gg

from .gradcheck import numerical_vjp


def test_operators_with_scalars_and_arrays_and_broadcasting():
    c = np.array([1.0, 2.0, 3.0])
    with gg.Graph():
        x = gg.input("x", shape=(2, 3))
        y = ((2.0 - x) * c + x / 4 - (-x) ** 2) @ np.ones(3) + 1
        z = gg.sum(c / (1.0 + gg.exp(x)))
    xv = np.arange(6.0).reshape(2, 3) / 10
    res = gg.connect().run([y, z], {x: xv})
    np.testing.assert_allclose(res.values[y.name], ((2 - xv) * c + xv / 4 - xv**2) @ np.ones(3) + 1)
    np.testing.assert_allclose(res.values[z.name], np.sum(c / (1 + np.exp(xv))))


def test_scalars_take_the_dtype_of_the_node():
    with gg.Graph():
        x = gg.input("x", shape=(3,), dtype="float32")
        y = gg.sum(2 * x + 1)
    res = gg.connect().run(y, {"x": np.ones(3, np.float32)}, wrt=[x])
    assert res.value.dtype == np.float32 and res.grads["x"].dtype == np.float32
    np.testing.assert_array_equal(res.grads["x"], np.full(3, 2, np.float32))


def test_float64_array_with_float32_node_is_reported_not_cast():
    with gg.Graph():
        x = gg.input("x", shape=(3,), dtype="float32")
        with pytest.raises(gg.ValidationError, match="dtype mismatch: float32 and float64"):
            _ = x * np.ones(3)


def test_bool_of_a_node_raises():
    with gg.Graph():
        x = gg.input("x")
        with pytest.raises(TypeError, match="truth value of graph node 'x'"):
            if x:
                pass
        with pytest.raises(TypeError, match="truth value"):
            bool(x)


def test_names_are_unique_and_settable():
    with gg.Graph() as g:
        x = gg.input("x")
        y = gg.tanh(x, name="hidden")
        a, b = gg.exp(x), gg.exp(x)
        assert y.name == "hidden" and a.name != b.name
        with pytest.raises(ValueError, match="already has a node named 'hidden'"):
            gg.sin(x, name="hidden")
    assert g["hidden"].op == "tanh"


def test_shape_errors_are_raised_where_the_node_is_built():
    with gg.Graph():
        W = gg.input("W", shape=(128, 64))
        x = gg.input("x", shape=(63,))
        with pytest.raises(
            gg.ValidationError, match=r"inner dimensions differ: \(128, 64\) @ \(63,\)"
        ):
            _ = W @ x


def test_nodes_outside_a_graph_need_one():
    with pytest.raises(RuntimeError, match="no active graph"):
        gg.input("x")


def test_feed_errors_name_the_input():
    with gg.Graph():
        x = gg.input("x", shape=(64,))
        t = gg.input("t", shape=(64,))
        y = gg.sum(x * t)
    client = gg.connect()
    with pytest.raises(
        gg.FeedError, match=r"graph input 'x' expects shape \(64,\) float64, got \(63,\)"
    ):
        client.run(y, {"x": np.zeros(63), "t": np.zeros(64)})
    with pytest.raises(gg.FeedError, match="expects shape .* float64, got .* float32"):
        client.run(y, {"x": np.zeros(64, np.float32), "t": np.zeros(64)})
    with pytest.raises(gg.FeedError, match="feed 'z' is not an input"):
        client.run(y, {"x": np.zeros(64), "t": np.zeros(64), "z": np.zeros(1)})
    with pytest.raises(gg.FeedError, match="missing feed for graph input.*'t'"):
        client.run(y, {"x": np.zeros(64)})
    # Lists and numbers take the declared dtype.
    assert client.run(y, {"x": [1.0] * 64, "t": [2] * 64}).value == 128.0


def test_gradients_with_respect_to_intermediates_and_unreachable_inputs():
    with gg.Graph():
        x = gg.input("x", shape=(3,))
        unused = gg.input("unused", shape=(2, 2))
        h = gg.sin(x, name="h")
        y = gg.sum(h * h)
    xv = np.array([0.1, 0.2, 0.3])
    res = gg.connect().run(y, {"x": xv}, wrt=[x, h, unused])
    np.testing.assert_allclose(res.grads["h"], 2 * np.sin(xv))
    np.testing.assert_allclose(res.grads["x"], 2 * np.sin(xv) * np.cos(xv))
    np.testing.assert_array_equal(res.grads["unused"], np.zeros((2, 2)))  # needs no feed


def test_non_scalar_output_needs_grad_outputs():
    with gg.Graph():
        x = gg.input("x", shape=(3,))
        y = gg.tanh(x)
    client = gg.connect()
    with pytest.raises(gg.RequestError, match="non-scalar output need grad_outputs"):
        client.run(y, {"x": np.zeros(3)}, wrt=[x])
    xv, u = np.array([0.1, -0.5, 2.0]), np.array([1.0, 2.0, 3.0])
    res = client.run(y, {"x": xv}, wrt=[x], grad_outputs={y: u})
    np.testing.assert_allclose(res.grads["x"], u * (1 - np.tanh(xv) ** 2))


def test_first_output_is_differentiated_others_are_auxiliary():
    with gg.Graph():
        x = gg.input("x", shape=(3,))
        h = gg.tanh(x)
        loss = gg.sum(h * 3.0)
    xv = np.array([0.1, 0.2, 0.3])
    res = gg.connect().run([loss, h], {"x": xv}, wrt=["x"])
    np.testing.assert_allclose(res.grads["x"], 3 * (1 - np.tanh(xv) ** 2))
    np.testing.assert_allclose(res.values[h.name], np.tanh(xv))
    with pytest.raises(ValueError, match="has 2 outputs"):
        _ = res.value


def rnn_loss(xs: np.ndarray):
    """An Elman RNN unrolled over however many steps the sequence has: a graph built on the fly."""
    with gg.Graph() as g:
        Wx = gg.input("Wx", shape=(4, 2))
        Wh = gg.input("Wh", shape=(4, 4))
        h = gg.constant(np.zeros(4))
        for t, x_t in enumerate(xs):
            h = gg.tanh(Wx @ x_t + Wh @ h, name=f"h{t}")
        loss = gg.sum(h**2, name="loss")
    return g, loss


@pytest.mark.parametrize("length", [1, 3, 17])
def test_recurrent_cell_unrolled_to_the_input_length(length):
    rng = np.random.default_rng(length)
    xs = rng.standard_normal((length, 2))
    Wx, Wh = rng.standard_normal((4, 2)) * 0.5, rng.standard_normal((4, 4)) * 0.5
    g, loss = rnn_loss(xs)
    assert len([n for n in g.nodes if n.op == "tanh"]) == length
    res = gg.connect().run(loss, {"Wx": Wx, "Wh": Wh}, wrt=["Wx", "Wh"])

    def f(ws):
        h = np.zeros(4)
        for x_t in xs:
            h = np.tanh(ws[0] @ x_t + ws[1] @ h)
        return np.sum(h**2)

    num = numerical_vjp(f, [Wx, Wh], np.array(1.0))
    np.testing.assert_allclose(res.value, f([Wx, Wh]), rtol=1e-12)
    np.testing.assert_allclose(res.grads["Wx"], num[0], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(res.grads["Wh"], num[1], rtol=1e-6, atol=1e-9)


def test_values_are_dropped_once_no_longer_needed():
    n, depth = 250_000, 40  # 2 MB per value; keeping all would be 80 MB
    with gg.Graph():
        x = gg.input("x", shape=(n,))
        h = x
        for _ in range(depth):
            h = gg.sin(h)
        y = gg.sum(h)
    client = gg.connect()
    xv = np.linspace(0, 1, n)
    tracemalloc.start()
    client.run(y, {"x": xv})
    forward_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.reset_peak()
    client.run(y, {"x": xv}, wrt=[x])
    backward_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert forward_peak < 5 * xv.nbytes  # a couple of live values, not forty
    assert backward_peak < (depth + 6) * xv.nbytes  # activations saved once, then freed


# -- connecting: the address forms a server prints, and what an unreachable one says --------


@pytest.fixture(scope="module")
def server():
    from .server_proc import running_server

    with running_server() as s:
        yield s


def small_graph():
    with gg.Graph():
        x = gg.input("x", shape=(2,))
        y = gg.sum(x**2)
    return x, y


def test_connect_accepts_the_grpc_url_the_server_prints(server):
    x, y = small_graph()
    with gg.connect(f"grpc://{server.address}") as client:
        assert client.address == server.address
        res = client.run(y, {x: [1.0, 2.0]}, wrt=[x])
    np.testing.assert_array_equal(res.grads["x"], [2.0, 4.0])


def test_connect_refuses_other_schemes_and_paths():
    with pytest.raises(ValueError, match="scheme 'http'"):
        gg.connect("http://127.0.0.1:50051")
    with pytest.raises(ValueError, match="scheme and host:port only"):
        gg.connect("grpc://127.0.0.1:50051/graphs")


def test_grpcs_url_turns_tls_on_so_a_plaintext_server_is_not_understood(server):
    with (
        gg.connect(f"grpcs://{server.address}", timeout=10) as client,
        pytest.raises(gg.RemoteError) as e,
    ):
        client.list_ops()
    assert e.value.code.name == "UNAVAILABLE"  # the TLS handshake fails
    assert f"a server is listening at {server.address}" in str(e.value)


def closed_port():
    """A loopback port bound by this process but not listening: connections are refused."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    return s


def test_a_refused_connection_says_no_server_runs_there():
    sock = closed_port()
    address = f"127.0.0.1:{sock.getsockname()[1]}"
    x, y = small_graph()
    try:
        with (
            gg.connect(f"grpc://{address}", timeout=10) as client,
            pytest.raises(gg.RemoteError) as e,
        ):
            client.run(y, {x: [1.0, 2.0]})
    finally:
        sock.close()
    assert e.value.code.name == "UNAVAILABLE"
    assert f"no server is running at {address}" in str(e.value)
    assert "graphgrad serve --port" in str(e.value)


def test_an_unreachable_but_listening_address_says_a_server_listens():
    import socket

    from graphgrad._connect import unavailable_message

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        address = f"127.0.0.1:{s.getsockname()[1]}"
        message = unavailable_message(address, "handshake failed")
    assert message.startswith(f"a server is listening at {address}")
    assert "handshake failed" in message


def test_remote_results_are_read_only_views_and_copy_makes_them_writable(server):
    x, y = small_graph()
    with gg.connect(server.address) as client:
        res = client.run(y, {x: [1.0, 2.0]}, wrt=[x])
    assert not res.grads["x"].flags.writeable
    own = res.copy()
    own.grads["x"] -= 0.5 * own.grads["x"]
    own.values[y.name][...] = 0.0
    np.testing.assert_array_equal(own.grads["x"], [1.0, 2.0])
    np.testing.assert_array_equal(res.grads["x"], [2.0, 4.0])  # the original is untouched
    assert res.value == 5.0
