"""Docs from one source: the op registry. Every op function of the SDK carries its entry's
doc and signature, ListOps/list_ops carry them, and docs/ops.md is generated from it."""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path

import numpy as np
import pytest

import graphgrad as gg
from graphgrad import _builder
from graphgrad.engine.ops import REGISTRY
from graphgrad.engine.ops.docs import NO_GRADIENT, op_infos

from .test_ops import SPECIAL, default_cases, random_inputs

ROOT = Path(__file__).resolve().parent.parent
SDK_FUNCTIONS = sorted(
    name
    for name, fn in vars(_builder).items()
    if inspect.isfunction(fn)
    and fn.__module__ == _builder.__name__
    and not name.startswith("_")
    and name in gg.__all__
)


def test_the_sdk_exports_its_op_functions():
    assert {"take", "where", "clip", "stack", "split", "argmax", "logsumexp"} <= set(SDK_FUNCTIONS)


@pytest.mark.parametrize("name", SDK_FUNCTIONS)
def test_every_sdk_function_has_a_docstring(name):
    doc = inspect.getdoc(getattr(gg, name))
    assert doc and len(doc) > 30, name


@pytest.mark.parametrize(
    "name", [n for n in SDK_FUNCTIONS if n in REGISTRY and n not in ("input", "constant")]
)
def test_an_op_function_documents_its_registry_entry(name):
    op = REGISTRY[name]
    doc = inspect.getdoc(getattr(gg, name))
    assert op.doc and op.doc in doc and op.signature() in doc
    # the SDK function takes the entry's argument names, in order
    params = list(inspect.signature(getattr(gg, name)).parameters)
    assert params[: len(op.inputs)] == list(op.inputs) or op.arity is None


def test_every_op_has_named_arguments_and_a_doc():
    for name, op in REGISTRY.items():
        assert op.doc, name
        if op.arity != 0:
            assert op.inputs and "x0" not in op.signature(), name
    assert REGISTRY["take"].signature() == "take(x, indices, axis: int=0)"
    assert REGISTRY["concat"].signature() == "concat(*xs, axis: int=0)"


@pytest.mark.parametrize("name", sorted(set(REGISTRY) - {"input", "constant"}))
def test_differentiable_is_what_the_rule_gives(name):
    """ListOps' `differentiable` (False for the NO_GRADIENT ops) agrees with the VJP rule."""
    op = REGISTRY[name]
    shapes, attrs = (SPECIAL.get(name) or default_cases(op.arity))[0]
    xs = random_inputs(name, shapes, np.random.default_rng(0))
    y = op.forward(xs, attrs)
    g = np.ones(np.shape(y), np.asarray(y).dtype)
    assert op.vjp is not None
    grads = op.vjp(g, xs, y, attrs, [x.dtype.kind == "f" for x in xs])
    info = {i.name: i for i in op_infos()}[name]
    assert info.differentiable == any(d is not None for d in grads)
    assert info.differentiable == (name not in NO_GRADIENT)


def test_local_list_ops_carries_signatures_and_docs():
    ops = {op.name: op for op in gg.LocalClient().list_ops()}
    assert set(ops) == set(REGISTRY)
    take = ops["take"]
    assert take.signature == "take(x, indices, axis: int=0)" and take.inputs == ("x", "indices")
    assert "scatter_add" in take.doc and take.differentiable
    assert [(a.name, a.kind, a.required) for a in take.attrs] == [("axis", "int", False)]
    assert not ops["argmax"].differentiable and ops["concat"].arity is None
    assert str(take).startswith("take(x, indices, axis: int=0): numpy.take")


def test_docs_ops_md_is_generated_from_the_registry():
    """docs/ops.md is what docs/generate_ops.py writes (run it after changing an op)."""
    spec = importlib.util.spec_from_file_location("generate_ops", ROOT / "docs/generate_ops.py")
    assert spec is not None and spec.loader is not None
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    text = (ROOT / "docs" / "ops.md").read_text()
    assert text == generator.render(), "docs/ops.md is stale: run python docs/generate_ops.py"
    for name, op in REGISTRY.items():
        assert f"## {name}\n\n`{op.signature()}`\n\n{op.doc}\n" in text
