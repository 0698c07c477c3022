"""Integer dtypes (int32, int64) for what is not differentiated, and dtypes and shapes given
the ways numpy users write them (np.float32, np.dtype(...), shape=3)."""

from __future__ import annotations

import numpy as np
import pytest

import graphgrad as gg
from graphgrad import wire
from graphgrad.engine import Graph, Node, tensors


@pytest.mark.parametrize("dtype", [np.float32, np.dtype("float32"), "float32", np.float64])
def test_a_dtype_may_be_a_numpy_type_or_dtype(dtype):
    with gg.Graph():
        x = gg.input("x", 3, dtype)
        c = gg.constant([1, 2, 3], dtype=dtype)
        y = x.astype(dtype) + c
    assert x.shape == (3,) and x.dtype == np.dtype(dtype).name == y.dtype


def test_bad_dtypes_and_shapes_name_the_input():
    with gg.Graph():
        with pytest.raises(ValueError, match=r"input 'x': dtype must be one of .*got 'float16'"):
            gg.input("x", 3, "float16")
        with pytest.raises(ValueError, match="input 'y': dtype must be one of"):
            gg.input("y", 3, np.bool_)
        with pytest.raises(ValueError, match=r"input 'z': shape \(2, -1\) has a negative size"):
            gg.input("z", (2, -1))
        with pytest.raises(ValueError, match="input 'w': shape must be an int or a sequence"):
            gg.input("w", 2.5)


def test_integer_inputs_and_constants_keep_their_dtype():
    with gg.Graph():
        i = gg.input("i", (2, 2), np.int32)
        k = gg.constant(np.array([1, 2], np.int64))
        f = gg.constant(3)  # Python numbers are float64
        j = i[:, 1] > 0
    assert (i.dtype, k.dtype, f.dtype, j.dtype) == ("int32", "int64", "float64", "int32")
    res = gg.LocalClient().run([i, j], {"i": [[1, -2], [3, 4]]})
    assert res.values["i"].dtype == np.int32
    np.testing.assert_array_equal(res.values[j.name], [0, 1])


def test_an_op_that_needs_floats_names_the_node_and_the_argument():
    with gg.Graph():
        labels = gg.input("labels", 4, np.int64)
        with pytest.raises(gg.ValidationError) as e:
            gg.exp(labels, name="e")
        assert e.value.node == "e"
        assert "input 0 (x) is int64, but this op takes float32 or float64" in str(e.value)
        with pytest.raises(gg.ValidationError, match=r"input 1 \(b\) is int64"):
            gg.add(gg.input("x", 4), labels)
        with pytest.raises(gg.ValidationError, match="indices must be int32 or int64, got float64"):
            gg.take(gg.input("y", 4), gg.input("z", 2))
        logits = gg.input("logits", (4, 3))
        with pytest.raises(gg.ValidationError, match=r"must have shape \(4,\)"):
            gg.softmax_cross_entropy(logits, gg.input("bad", 3, "int64"))


def test_the_engine_refuses_an_int_where_a_float_is_needed():
    nodes = [Node("i", "input", shape=(2,), dtype="int64"), Node("y", "tanh", ("i",))]
    with pytest.raises(gg.ValidationError) as e:
        Graph(nodes)
    assert e.value.node == "y" and "input 0 (x) is int64" in str(e.value)


def test_a_gradient_with_respect_to_an_integer_input_is_a_request_error():
    with gg.Graph():
        x = gg.input("x", (4, 3))
        labels = gg.input("labels", 4, np.int64)
        loss = gg.softmax_cross_entropy(x, labels).mean()
    feeds = {"x": np.zeros((4, 3)), "labels": np.zeros(4, np.int64)}
    with pytest.raises(gg.RequestError) as e:
        gg.LocalClient().run(loss, feeds, wrt=["x", "labels"])
    assert e.value.field == "wrt"
    assert "wrt 'labels' is int64: gradients are taken with respect to float32 or float64" in str(
        e.value
    )


def test_an_integer_feed_must_match_the_declared_dtype():
    with gg.Graph():
        i = gg.input("i", 2, np.int64)
        y = i.astype("float64")
    with pytest.raises(gg.FeedError, match="int64"):
        gg.LocalClient().run(y, {"i": np.array([1.0, 2.0])})


@pytest.mark.parametrize("dtype", ["int32", "int64"])
def test_integer_tensors_round_trip_on_the_wire(dtype):
    a = np.array([[-(2**31), 7], [0, 2**31 - 1]], dtype)
    t = wire.encode_tensor(a)
    back = wire.decode_tensor(t, "feeds['a']")
    assert back.dtype == a.dtype and np.array_equal(back, a)
    wire.encode_tensor(back, t)
    np.testing.assert_array_equal(wire.decode_tensor(t), a)
    assert tensors.encode(a)[0] == dtype


def test_a_dtype_attribute_round_trips_on_the_wire():
    with gg.Graph() as g:
        x = gg.input("x", 3)
        gg.astype(x, np.int32, name="y")
    nodes = wire.decode_graph(wire.encode_graph(g.freeze()))
    assert Graph(nodes).fingerprint == g.freeze().fingerprint
    assert dict(nodes[-1].attrs) == {"dtype": "int32"}


def test_training_takes_integer_labels_as_data():
    """A batched training job (batching, then gradient graphs) with int64 class labels."""
    rng = np.random.default_rng(0)
    x_data = rng.standard_normal((32, 4))
    y_data = (x_data[:, 0] > 0).astype(np.int64)
    with gg.Graph():
        x = gg.input("x", (8, 4))
        labels = gg.input("y", 8, np.int64)
        w = gg.input("W", (4, 2))
        loss = gg.softmax_cross_entropy(x @ w, labels).mean()
    job = gg.LocalClient().train(
        loss,
        {"W": np.zeros((2, 4, 2))},
        {"x": x_data, "y": y_data},
        gg.optim.SGD(lr=0.5),
        steps=30,
        batch_size=8,
    )
    history = job.wait(progress=False).history
    assert history.shape[0] == 2
    np.testing.assert_allclose(history[:, 0], np.log(2))  # zero weights: uniform guesses
    assert (history[:, -5:].mean(axis=1) < 0.5 * np.log(2)).all()


def test_a_feed_of_the_other_byte_order_is_refused_saying_so():
    """'>f8' is float64 by name; the error must not read 'expects float64, got float64'."""
    with gg.Graph():
        w = gg.input("w", shape=(3,))
        y = gg.sum(w * w)
    with pytest.raises(gg.FeedError, match=r"got \(3,\) >f8 \(big-endian: convert with"):
        gg.LocalClient().run(y, {"w": np.arange(3.0).astype(">f8")})


def test_a_shape_no_tensor_may_have_is_refused_as_the_input_is_declared():
    """Said at gg.input, naming it, not later at the first run or save (where 2**64 does not
    even fit the wire's int64)."""
    with gg.Graph():
        with pytest.raises(ValueError, match=r"input 'h': shape .*multiply to more than"):
            gg.input("h", shape=(2**64,))
        with pytest.raises(ValueError, match=r"input 'r': shape .*rank 40 is over"):
            gg.input("r", shape=(1,) * 40)
