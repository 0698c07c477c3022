"""`gg.save` / `gg.load`: a graph and its parameters in one file, without pickle.

The file is a zip archive of three members:
- `graphgrad.json`: `{"format": "graphgrad.saved", "version": 1, "outputs": [...],
  "fingerprint": "<sha256 hex>"}`: the output node names and the graph's fingerprint;
- `graph.pb`: the graph as a serialized `graphgrad.v1.Graph` protobuf message (the message
  `RegisterGraph` takes), readable from any language with the `.proto` files;
- `params.npz`: numpy's `.npz` of parameter values keyed by input name, read back with
  `allow_pickle=False` (numeric arrays only).
Loading checks every part (a corrupt or truncated file is a `SavedGraphError` naming the file
and what is wrong) and that the graph read back has the fingerprint recorded. It is bounded
before anything is inflated: each member's uncompressed size (from the zip's directory;
zipfile stops reading at it) against `max_bytes`, the manifest against `MAX_MANIFEST_BYTES`,
and each parameter's header (shape, dtype) against the graph's input before its data is read.
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError

from graphgrad import engine
from graphgrad._builder import Graph, Tensor
from graphgrad._transforms import builder_graph
from graphgrad.engine import GraphError
from graphgrad.v1 import graph_pb2
from graphgrad.wire import decode_graph, encode_graph

FORMAT = "graphgrad.saved"
VERSION = 1
MANIFEST, GRAPH, PARAMS = "graphgrad.json", "graph.pb", "params.npz"
MAX_BYTES = 2 << 30  # default bound on the inflated graph and params, together
MAX_MANIFEST_BYTES = 1 << 20  # a manifest is a few hundred bytes
# What zipfile and zlib raise for damaged bytes: a bad archive, a spoilt deflate stream, a
# compression method or zip feature it lacks, a member flagged encrypted (RuntimeError).
_CORRUPT = (
    zipfile.BadZipFile,
    zlib.error,
    EOFError,
    ValueError,
    NotImplementedError,
    RuntimeError,
)


class SavedGraphError(GraphError):
    """A saved-graph file that cannot be read: `path` names it."""

    def __init__(self, path: str | os.PathLike[str], message: str) -> None:
        self.path = str(path)
        super().__init__(f"{path}: {message}")


@dataclass(frozen=True)
class Saved:
    """A loaded graph: its builder graph, output nodes and parameter values (feeds)."""

    graph: Graph
    outputs: list[Tensor]
    params: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def output(self) -> Tensor:
        """The single output node."""
        if len(self.outputs) != 1:
            raise ValueError(f"this graph has {len(self.outputs)} outputs; use .outputs")
        return self.outputs[0]

    @property
    def fingerprint(self) -> str:
        return self.graph.freeze().fingerprint


def _check_params(graph: engine.Graph, params: Mapping[str, np.ndarray], where: str) -> None:
    for name, value in params.items():
        i = graph.index.get(name)
        if i is None or graph.nodes[i].op != "input":
            raise ValueError(f"{where}: params names '{name}', which is not an input of the graph")
        t = graph.types[i]
        if not t.matches(value):
            raise ValueError(
                f"{where}: param '{name}' has shape {value.shape} {value.dtype}, "
                f"the input is {t.shape} {t.dtype}"
            )


def graph_and_params(
    outputs: Tensor | Sequence[Tensor], params: Mapping[str | Tensor, Any] | None, caller: str
) -> tuple[Graph, list[Tensor], dict[str, np.ndarray]]:
    """The one builder graph `outputs` belong to, the outputs as a list, and `params` keyed by
    input name: what `gg.save` and `gg.to_onnx` take (`caller` names which in errors)."""
    outs = [outputs] if isinstance(outputs, Tensor) else list(outputs)
    if not outs or not all(isinstance(o, Tensor) for o in outs):
        raise TypeError(f"{caller}: outputs must be a graph node or a list of them")
    builder = outs[0].graph
    if any(o.graph is not builder for o in outs):
        raise ValueError(f"{caller}: the outputs belong to different graphs")
    arrays = {
        (k.name if isinstance(k, Tensor) else str(k)): np.asarray(v)
        for k, v in (params or {}).items()
    }
    return builder, outs, arrays


def save(
    path: str | os.PathLike[str],
    outputs: Tensor | Sequence[Tensor],
    params: Mapping[str | Tensor, Any] | None = None,
) -> Path:
    """Write the graph of `outputs` (all its nodes), the output names and `params` (values of
    inputs, keyed by input node or name) to `path`, in the format this module describes.
    The file is written whole or not at all. Returns the path."""
    builder, outs, arrays = graph_and_params(outputs, params, "gg.save")
    graph = builder.freeze()
    _check_params(graph, arrays, "gg.save")
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "outputs": [o.name for o in outs],
        "fingerprint": graph.fingerprint,
    }
    npz = io.BytesIO()
    with zipfile.ZipFile(npz, "w") as members:  # np.savez's layout, without its keyword
        for key, arr in arrays.items():  # arguments (a param named 'allow_pickle' or 'file')
            with members.open(f"{key}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, arr, allow_pickle=False)
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent or ".")
    try:
        with os.fdopen(fd, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr(MANIFEST, json.dumps(manifest, indent=1))
            z.writestr(GRAPH, encode_graph(graph).SerializeToString())
            z.writestr(PARAMS, npz.getvalue())
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise
    return target


def load(path: str | os.PathLike[str], *, max_bytes: int = MAX_BYTES) -> Saved:
    """Read a file written by `gg.save`: `.graph`, `.outputs` (nodes), `.params` (arrays).
    Nothing in it is unpickled or executed; a file that is not whole and well formed, or
    whose graph and params would inflate past `max_bytes`, raises `SavedGraphError` naming it
    and the part that is wrong."""
    try:
        with zipfile.ZipFile(path) as z:
            members = set(z.namelist())
            missing = [m for m in (MANIFEST, GRAPH, PARAMS) if m not in members]
            if missing:
                raise SavedGraphError(path, f"not a saved graph: {', '.join(missing)} missing")
            _check_sizes(path, z, max_bytes)
            manifest = _read_manifest(path, z.read(MANIFEST))
            graph = _read_graph(path, z.read(GRAPH))
            params = _read_params(path, z.read(PARAMS), graph, max_bytes)
    except SavedGraphError:
        raise
    except OSError as e:
        raise SavedGraphError(path, f"cannot read the file ({e.strerror or e})") from e
    except _CORRUPT as e:
        raise SavedGraphError(path, f"not a saved graph, or truncated or corrupt ({e})") from e
    if graph.fingerprint != manifest["fingerprint"]:
        raise SavedGraphError(
            path, f"{GRAPH} does not match the fingerprint {GRAPH} was saved with (changed?)"
        )
    unknown = [o for o in manifest["outputs"] if o not in graph.index]
    if unknown:
        raise SavedGraphError(path, f"outputs {unknown} are not nodes of the graph")
    try:
        _check_params(graph, params, PARAMS)
    except ValueError as e:
        raise SavedGraphError(path, str(e)) from e
    builder = builder_graph(graph, Path(path).stem)
    return Saved(builder, [builder[o] for o in manifest["outputs"]], params)


def _check_sizes(path: str | os.PathLike[str], z: zipfile.ZipFile, max_bytes: int) -> None:
    """Each member's uncompressed size, as the zip's directory declares it, within its bound
    before any is inflated (a few KiB of deflated zeros can declare gigabytes)."""
    sizes = {m: z.getinfo(m).file_size for m in (MANIFEST, GRAPH, PARAMS)}
    if sizes[MANIFEST] > MAX_MANIFEST_BYTES:
        raise SavedGraphError(
            path,
            f"{MANIFEST} holds {sizes[MANIFEST]} bytes uncompressed, over the "
            f"{MAX_MANIFEST_BYTES} a manifest may hold",
        )
    total = sizes[GRAPH] + sizes[PARAMS]
    if total > max_bytes:
        raise SavedGraphError(
            path,
            f"{GRAPH} and {PARAMS} hold {total} bytes uncompressed, over max_bytes={max_bytes} "
            "(gg.load(path, max_bytes=...) raises the bound)",
        )


def _read_manifest(path: str | os.PathLike[str], data: bytes) -> dict[str, Any]:
    try:
        manifest = json.loads(data)
    except ValueError as e:
        raise SavedGraphError(path, f"{MANIFEST} is not JSON ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SavedGraphError(path, f"{MANIFEST} does not say format '{FORMAT}'")
    if manifest.get("version") != VERSION:
        raise SavedGraphError(
            path, f"format version {manifest.get('version')!r} (this graphgrad reads {VERSION})"
        )
    outs, fp = manifest.get("outputs"), manifest.get("fingerprint")
    if not (isinstance(outs, list) and outs and all(isinstance(o, str) for o in outs)):
        raise SavedGraphError(path, f"{MANIFEST}: 'outputs' must be a list of node names")
    if not isinstance(fp, str):
        raise SavedGraphError(path, f"{MANIFEST}: 'fingerprint' must be a string")
    return manifest


def _read_graph(path: str | os.PathLike[str], data: bytes) -> engine.Graph:
    msg = graph_pb2.Graph()
    try:
        msg.ParseFromString(data)
    except DecodeError as e:
        raise SavedGraphError(path, f"{GRAPH} is not a graphgrad.v1.Graph message ({e})") from e
    try:
        return engine.Graph(decode_graph(msg))
    except (GraphError, ValueError) as e:
        raise SavedGraphError(path, f"{GRAPH} is not a valid graph: {e}") from e


def _read_params(
    path: str | os.PathLike[str], data: bytes, graph: engine.Graph, max_bytes: int
) -> dict[str, np.ndarray]:
    try:
        npz = np.load(io.BytesIO(data), allow_pickle=False)
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise ValueError("a single array, not an archive of named ones")
        with npz, zipfile.ZipFile(io.BytesIO(data)) as members:
            _check_param_headers(path, members, graph, max_bytes)
            return {k: npz[k] for k in npz.files}
    except (OSError, *_CORRUPT) as e:
        raise SavedGraphError(path, f"{PARAMS} is not a numeric .npz ({e})") from e


def _check_param_headers(
    path: str | os.PathLike[str], npz: zipfile.ZipFile, graph: engine.Graph, max_bytes: int
) -> None:
    """Each array's header (shape, dtype) against its graph input before numpy allocates the
    shape it declares (an 8 TiB shape fits in a 100-byte member)."""
    total = 0
    for info in npz.infolist():
        name = info.filename.removesuffix(".npy")
        with npz.open(info) as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        if dtype.hasobject:
            raise ValueError(f"'{name}' holds objects, not read with allow_pickle=False")
        total += math.prod(shape) * dtype.itemsize
        i = graph.index.get(name)
        if i is not None and graph.nodes[i].op == "input":
            t = graph.types[i]
            if tuple(shape) != t.shape or dtype.name != t.dtype:
                raise SavedGraphError(
                    path,
                    f"{PARAMS}: param '{name}' has shape {tuple(shape)} {dtype}, "
                    f"the input is {t.shape} {t.dtype}",
                )
        if total > max_bytes:
            raise SavedGraphError(
                path, f"{PARAMS} declares {total} bytes of arrays, over max_bytes={max_bytes}"
            )
