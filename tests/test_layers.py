"""The layer contract of ../shared/DESIGN.md, checked over the import graph of the source:
client -> engine (its public surface) and wire; server -> engine and wire; wire -> engine and
v1; engine -> numpy (and ray, lazily, in its Ray runners only). `import graphgrad.engine`
loads no gRPC and no protobuf. Absolute imports everywhere."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Where each part of the `graphgrad` namespace lives (pyproject's package-dir).
PACKAGES = {"client": "graphgrad", "engine": "graphgrad.engine", "server": "graphgrad.server"}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT)
    parts = [PACKAGES[rel.parts[0]], *rel.parts[1:-1]]
    if rel.stem != "__init__":
        parts.append(rel.stem)
    return ".".join(parts)


def sources() -> dict[str, Path]:
    return {module_name(p): p for top in PACKAGES for p in sorted((ROOT / top).rglob("*.py"))}


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """(module imported, line, at module level) of every import in the file; a relative
    import is reported as '.' (absolute imports everywhere)."""
    tree = ast.parse(path.read_text(), str(path))
    nested: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            nested.update(id(n) for n in ast.walk(node) if n is not node)
    out = []
    for node in ast.walk(tree):
        top = id(node) not in nested
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno, top) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                out.append((".", node.lineno, top))
            else:
                # `from pkg import name` may import a submodule: count both.
                out.append((node.module or "", node.lineno, top))
                out += [(f"{node.module}.{a.name}", node.lineno, top) for a in node.names]
    return out


# The engine's Ray runners: graph execution and training on Ray (the only importers of ray).
RAY_RUNNERS = ("graphgrad.engine.ray_executor", "graphgrad.engine.ray_training")
# Measurements of Ray itself (`graphgrad calibrate`), inside the function that measures.
RAY_PROBES = ("graphgrad.engine.calibration",)


# Converters between the engine and a wire format: graphgrad.wire (protobuf) and
# graphgrad.onnx (ONNX ModelProto).
WIRE = ("graphgrad.wire", "graphgrad.onnx")


def layer(module: str) -> str:
    if module in WIRE:
        return "wire"
    for name in ("engine", "server", "v1"):
        if module == f"graphgrad.{name}" or module.startswith(f"graphgrad.{name}."):
            return name
    return "sdk"


MODULES = sources()
EXTRA: set[str] = set()  # modules the checker's own test adds


def is_ours(module: str) -> bool:
    return module == "graphgrad" or module.startswith("graphgrad.")


def known(module: str) -> bool:
    """A module of ours that exists (a `from pkg import name` of a plain name is not one)."""
    generated = module == "graphgrad.v1" or module.startswith("graphgrad.v1.")
    return module in MODULES or module in EXTRA or generated


def violations(modules: dict[str, Path], root: Path = ROOT) -> list[str]:
    found = []
    for module, path in modules.items():
        src = layer(module)
        where = f"{path.relative_to(root)}"
        for target, line, top in imports(path):
            at = f"{where}:{line}: {module} imports {target}"
            if target == ".":
                found.append(f"{where}:{line}: a relative import (absolute imports everywhere)")
                continue
            head = target.split(".")[0]
            if src == "engine":
                if head in ("grpc", "google", "grpc_status", "grpc_health", "grpc_reflection"):
                    found.append(f"{at}: the engine loads no gRPC and no protobuf")
                probe = module in RAY_PROBES and not top
                if head == "ray" and module not in RAY_RUNNERS and not probe:
                    found.append(f"{at}: ray is imported by the Ray runners only")
                if target in RAY_RUNNERS and top and module not in RAY_RUNNERS:
                    found.append(f"{at}: the Ray runners are imported lazily, inside a function")
            if src != "engine" and head == "ray":
                found.append(f"{at}: only the engine's Ray runner imports ray")
            if not is_ours(target) or not known(target):
                continue
            dst = layer(target)
            allowed = {
                "engine": {"engine"},
                "wire": {"engine", "v1"},
                "sdk": {"sdk", "engine", "wire", "v1"},
                "server": {"server", "engine", "wire", "v1"},
            }[src]
            if dst not in allowed and target != "graphgrad":
                found.append(f"{at}: {src} may not import {dst}")
            if src == "sdk" and dst == "engine" and target != "graphgrad.engine":
                found.append(f"{at}: the SDK uses the engine's public surface (graphgrad.engine)")
    return found


def test_the_layer_contract_holds():
    assert violations(MODULES) == []


def test_the_contract_finds_what_breaks_it(tmp_path, monkeypatch):
    """The checker itself: a file that breaks each rule is reported."""
    bad = {
        "engine/bad.py": "import grpc\nfrom graphgrad.server import app\nimport ray\n",
        "client/_bad.py": "from graphgrad.engine.dispatch import Dispatcher\nfrom . import x\n",
        "server/bad.py": "from graphgrad import _builder\n",
    }
    for rel, text in bad.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    modules = {module_name(tmp_path / rel): tmp_path / rel for rel in bad}
    monkeypatch.setattr(sys.modules[__name__], "EXTRA", set(modules))
    found = "\n".join(violations(modules, tmp_path))
    for expected in (
        "no gRPC",
        "engine may not import server",
        "ray is imported by the Ray runners only",
        "public surface",
        "a relative import",
        "server may not import sdk",
    ):
        assert expected in found, (expected, found)


@pytest.mark.parametrize(
    ("code", "forbidden"),
    [
        ("import graphgrad.engine", ("grpc", "google.protobuf", "ray")),
        ("import graphgrad as gg; gg.connect()", ("grpc", "google.protobuf", "ray")),
    ],
)
def test_imports_load_only_what_they_need(code, forbidden):
    """In a fresh interpreter: the engine (every Ray worker imports it) and the in-process
    SDK load neither gRPC nor protobuf (nor Ray before it is used)."""
    probe = f"{code}; import json, sys; print(json.dumps(list(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    loaded = json.loads(out.splitlines()[-1])
    for name in forbidden:
        assert not [m for m in loaded if m == name or m.startswith(f"{name}.")], name
