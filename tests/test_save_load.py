"""gg.save / gg.load: the round trip keeps the fingerprint and the results; every kind of bad
file is refused with an error naming the file and the part that is wrong, nothing unpickled."""

from __future__ import annotations

import io
import json
import struct
import zipfile

import numpy as np
import pytest

import graphgrad as gg
from graphgrad.v1 import graph_pb2


@pytest.fixture
def model():
    with gg.Graph() as g:
        x = gg.input("x", shape=(3,))
        W = gg.input("W", shape=(2, 3))
        y = gg.tanh(W @ x + np.array([0.5, -1.0]), name="y")
        L = gg.sum(y**2, name="L")
        dW = gg.grad(L, W)
    W0 = np.arange(6.0).reshape(2, 3) / 10
    return g, [L, dW], {"W": W0}


def test_round_trip_keeps_the_fingerprint_and_the_results(model, tmp_path):
    g, outs, params = model
    path = gg.save(tmp_path / "model.gg", outs, params={g["W"]: params["W"]})
    loaded = gg.load(path)
    assert loaded.fingerprint == g.freeze().fingerprint
    assert [o.name for o in loaded.outputs] == [o.name for o in outs]
    np.testing.assert_array_equal(loaded.params["W"], params["W"])
    x = np.array([1.0, -2.0, 0.5])
    client = gg.connect()
    want = client.run(outs, {"x": x, **params})
    got = client.run(loaded.outputs, {"x": x, **loaded.params})
    for o in outs:
        np.testing.assert_array_equal(got.values[o.name], want.values[o.name])
    # the loaded graph is an ordinary builder graph: build on it and differentiate again
    with loaded.graph:
        d2 = gg.grad(gg.sum(loaded.outputs[1]), loaded.graph["x"])
    assert client.run(d2, {"x": x, **loaded.params}).value.shape == (3,)


def test_the_parts_are_the_documented_format(model, tmp_path):
    g, outs, params = model
    path = gg.save(tmp_path / "m", outs[0], params=params)
    with zipfile.ZipFile(path) as z:
        manifest = json.loads(z.read("graphgrad.json"))
        msg = graph_pb2.Graph.FromString(z.read("graph.pb"))
        npz = np.load(io.BytesIO(z.read("params.npz")), allow_pickle=False)
        assert set(npz.files) == {"W"}
    assert manifest == {
        "format": "graphgrad.saved",
        "version": 1,
        "outputs": ["L"],
        "fingerprint": g.freeze().fingerprint,
    }
    assert {n.name for n in msg.nodes} == {n.name for n in g.nodes}


def test_save_refuses_params_that_are_not_inputs_of_that_shape(model, tmp_path):
    _, outs, _ = model
    with pytest.raises(ValueError, match="'y', which is not an input"):
        gg.save(tmp_path / "m", outs, params={"y": np.zeros(2)})
    with pytest.raises(ValueError, match="param 'W' has shape \\(3,\\)"):
        gg.save(tmp_path / "m", outs, params={"W": np.zeros(3)})
    assert not list(tmp_path.iterdir())  # nothing written


def rewrite(path, **members):
    """The saved file with some members replaced (bytes) or dropped (None)."""
    with zipfile.ZipFile(path) as z:
        parts = {n: z.read(n) for n in z.namelist()}
    for name, data in members.items():
        name = name.replace("_", ".")
        if data is None:
            parts.pop(name)
        else:
            parts[name] = data
    with zipfile.ZipFile(path, "w") as z:
        for name, data in parts.items():
            z.writestr(name, data)


def npz_bytes(**arrays):
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def altered_graph(path):
    with zipfile.ZipFile(path) as z:
        msg = graph_pb2.Graph.FromString(z.read("graph.pb"))
    for n in msg.nodes:
        if n.op == "tanh":
            n.op = "sigmoid"  # still a valid graph, not the one saved
    return msg.SerializeToString()


def patch_member(path, member, how):
    """Damage the zip's own records of `member`: 'deflate' spoils its compressed stream,
    'method' names a compression method zipfile lacks, 'encrypted' sets the encryption flag."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(member)
    if how == "deflate":
        at = info.header_offset
        name_len, extra_len = struct.unpack("<HH", data[at + 26 : at + 30])
        start = at + 30 + name_len + extra_len
        data[start : start + 4] = b"\xff" * 4  # deflate block type 3: invalid
    else:  # its central directory entry (signature, then the name at offset 46)
        at = data.index(b"PK\x01\x02")
        while bytes(data[at + 46 : at + 46 + len(member)]) != member.encode():
            at = data.index(b"PK\x01\x02", at + 4)
        if how == "method":
            data[at + 10 : at + 12] = struct.pack("<H", 99)
        else:
            data[at + 8] |= 1
    path.write_bytes(bytes(data))


BAD_FILES = {
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "trunc"),
    "not a zip": (lambda p: p.write_text("hello"), "not a saved graph"),
    "member missing": (lambda p: rewrite(p, params_npz=None), "params.npz missing"),
    "manifest not JSON": (lambda p: rewrite(p, graphgrad_json=b"{"), "graphgrad.json is not JSON"),
    "other format": (
        lambda p: rewrite(p, graphgrad_json=b'{"format": "x"}'),
        "does not say format 'graphgrad.saved'",
    ),
    "newer version": (
        lambda p: rewrite(
            p,
            graphgrad_json=json.dumps(
                {"format": "graphgrad.saved", "version": 2, "outputs": ["L"], "fingerprint": ""}
            ).encode(),
        ),
        "format version 2",
    ),
    "graph garbage": (
        lambda p: rewrite(p, graph_pb=b"\xff\xff\xff"),
        "graph.pb is not a graphgrad.v1.Graph",
    ),
    "graph changed": (
        lambda p: rewrite(p, graph_pb=altered_graph(p)),
        "does not match the fingerprint",
    ),
    "corrupt deflate stream": (
        lambda p: patch_member(p, "graph.pb", "deflate"),
        "not a saved graph, or truncated or corrupt",
    ),
    "unknown compression": (
        lambda p: patch_member(p, "params.npz", "method"),
        "not a saved graph, or truncated or corrupt",
    ),
    "encrypted member": (
        lambda p: patch_member(p, "graphgrad.json", "encrypted"),
        "not a saved graph, or truncated or corrupt",
    ),
    "pickled params": (
        lambda p: rewrite(p, params_npz=npz_bytes(W=np.array([{"a": 1}], dtype=object))),
        "params.npz is not a numeric .npz .*allow_pickle",
    ),
    "params of another shape": (
        lambda p: rewrite(p, params_npz=npz_bytes(W=np.zeros(3))),
        "param 'W' has shape \\(3,\\)",
    ),
}


@pytest.mark.parametrize("damage", list(BAD_FILES))
def test_a_bad_file_is_refused_naming_the_file_and_the_fault(model, tmp_path, damage):
    _, outs, params = model
    path = gg.save(tmp_path / "model.gg", outs, params=params)
    spoil, message = BAD_FILES[damage]
    spoil(path)
    with pytest.raises(gg.SavedGraphError, match=message) as e:
        gg.load(path)
    assert str(e.value).startswith(str(path))
    assert e.value.path == str(path)


def test_a_missing_file_names_it(tmp_path):
    with pytest.raises(gg.SavedGraphError, match="nope.gg: cannot read the file"):
        gg.load(tmp_path / "nope.gg")


def test_integer_inputs_and_constants_round_trip(tmp_path):
    with gg.Graph() as g:
        logits = gg.input("logits", shape=(3, 4))
        labels = gg.input("labels", shape=(3,), dtype="int64")
        picked = gg.constant(np.array([2, 0], dtype=np.int32))
        L = gg.mean(gg.softmax_cross_entropy(logits, labels)) + gg.sum(gg.astype(picked, "float64"))
    loaded = gg.load(gg.save(tmp_path / "int.gg", L, params={"labels": np.array([0, 3, 1])}))
    assert loaded.fingerprint == g.freeze().fingerprint
    assert loaded.params["labels"].dtype == np.int64
    feeds = {"logits": np.arange(12.0).reshape(3, 4) / 7}
    client = gg.connect()
    want = client.run(L, {**feeds, "labels": np.array([0, 3, 1])}).value
    assert client.run(loaded.output, {**feeds, **loaded.params}).value == want


def npz_declaring(name, shape, dtype="<f8"):
    """An .npz whose member declares `shape` but holds only a few bytes of data."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": dtype, "fortran_order": False, "shape": shape}
    )
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(f"{name}.npy", header.getvalue() + bytes(48))
    return buf.getvalue()


def test_a_param_declaring_a_huge_shape_is_refused_before_it_is_allocated(model, tmp_path):
    _, outs, params = model
    path = gg.save(tmp_path / "model.gg", outs, params=params)
    rewrite(path, params_npz=npz_declaring("W", (2**40,)))  # 8 TiB declared, 48 bytes held
    with pytest.raises(gg.SavedGraphError, match=r"param 'W' has shape \(1099511627776,\)"):
        gg.load(path)


def test_a_member_that_inflates_past_the_bound_is_refused_unread(model, tmp_path):
    _, outs, params = model
    path = gg.save(tmp_path / "model.gg", outs, params=params)
    with zipfile.ZipFile(path) as z:
        manifest = z.read("graphgrad.json")
    # Valid JSON padded to 2 MiB of spaces: a few KiB deflated, a zip bomb in miniature.
    padded = manifest + b" " * (2 << 20)
    with zipfile.ZipFile(path) as z:
        parts = {n: z.read(n) for n in z.namelist()}
    parts["graphgrad.json"] = padded
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in parts.items():
            z.writestr(name, data)
    assert path.stat().st_size < 64 << 10
    with pytest.raises(gg.SavedGraphError, match="graphgrad.json holds 2097.* bytes"):
        gg.load(path)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in {**parts, "graphgrad.json": manifest}.items():
            z.writestr(name, data)
    gg.load(path)  # the same file unpadded loads
    with pytest.raises(gg.SavedGraphError, match="over max_bytes=100"):
        gg.load(path, max_bytes=100)


@pytest.mark.parametrize("name", ["allow_pickle", "file"])
def test_a_param_named_like_a_savez_argument_is_saved(tmp_path, name):
    """np.savez(file, allow_pickle=..., **arrays) took these names as its own arguments."""
    with gg.Graph():
        x = gg.input(name, shape=(3,))
        y = gg.sum(x * x)
    value = np.arange(3.0)
    loaded = gg.load(gg.save(tmp_path / "m.gg", y, params={name: value}))
    assert list(loaded.params) == [name]
    np.testing.assert_array_equal(loaded.params[name], value)
