"""ONNX import and export (graphgrad.onnx, gg.from_onnx, gg.to_onnx).

Every supported op is checked on a tiny model built with onnx.helper: forward values equal
onnxruntime's, gradients with respect to every initializer equal central differences taken
through onnxruntime, and import -> export -> import keeps the fingerprint.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphgrad as gg
from graphgrad.engine import LimitError, ValidationError
from graphgrad.onnx import from_onnx, parse_model, to_onnx

RNG = np.random.default_rng(16)
_ELEM = {np.dtype("float32"): TensorProto.FLOAT, np.dtype("float64"): TensorProto.DOUBLE}
_ELEM |= {np.dtype("int64"): TensorProto.INT64, np.dtype("int32"): TensorProto.INT32}


def rand(*shape: int, lo: float = -1.0, hi: float = 1.0) -> np.ndarray:
    return RNG.uniform(lo, hi, size=shape)


@dataclass
class Case:
    """A model of a few nodes: graph inputs with values, initializers, one output."""

    nodes: list[Any]
    inputs: dict[str, np.ndarray]
    inits: dict[str, np.ndarray] = field(default_factory=dict)
    output: str = "y"
    opset: int = 13

    def model(self) -> onnx.ModelProto:
        ins = [
            helper.make_tensor_value_info(k, _ELEM[v.dtype], v.shape)
            for k, v in self.inputs.items()
        ]
        first = next(
            v for v in [*self.inputs.values(), *self.inits.values()] if v.dtype.kind == "f"
        )
        out = helper.make_tensor_value_info(self.output, _ELEM[first.dtype], None)
        inits = [numpy_helper.from_array(v, k) for k, v in self.inits.items()]
        graph = helper.make_graph(self.nodes, "case", ins, [out], initializer=inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        m.ir_version = 8
        return m


def node(op: str, ins: Sequence[str], out: str = "y", **attrs: Any) -> Any:
    return helper.make_node(op, list(ins), [out], name=f"{out}_node", **attrs)


def i64(*v: int) -> np.ndarray:
    return np.array(v, dtype=np.int64)


X23 = {"x": rand(2, 3)}
POS = {"x": rand(2, 3, lo=0.5, hi=2.0)}
CASES: dict[str, Case] = {
    "Gemm": Case(
        [node("Gemm", ["x", "W", "c"], alpha=0.5, beta=2.0, transB=1)],
        X23, {"W": rand(4, 3), "c": rand(4)},
    ),
    "Gemm_transA": Case([node("Gemm", ["x", "W"], transA=1)], X23, {"W": rand(2, 4)}),
    "MatMul": Case([node("MatMul", ["x", "W"])], X23, {"W": rand(3, 2)}),
    "MatMul_batched": Case([node("MatMul", ["x", "W"])], {"x": rand(2, 2, 3)}, {"W": rand(3, 2)}),
    "Add": Case([node("Add", ["x", "b"])], X23, {"b": rand(3)}),
    "Sub": Case([node("Sub", ["b", "x"])], X23, {"b": rand(2, 1)}),
    "Mul": Case([node("Mul", ["x", "w"])], X23, {"w": rand(3)}),
    "Div": Case([node("Div", ["x", "w"])], X23, {"w": rand(3, lo=0.5, hi=2.0)}),
    "Neg": Case([node("Mul", ["x", "w"], "h"), node("Neg", ["h"])], X23, {"w": rand(3)}),
    "Relu": Case([node("Add", ["x", "w"], "h"), node("Relu", ["h"])], X23, {"w": rand(3)}),
    "Tanh": Case([node("Mul", ["x", "w"], "h"), node("Tanh", ["h"])], X23, {"w": rand(3)}),
    "Sigmoid": Case([node("Mul", ["x", "w"], "h"), node("Sigmoid", ["h"])], X23, {"w": rand(3)}),
    "Exp": Case([node("Mul", ["x", "w"], "h"), node("Exp", ["h"])], X23, {"w": rand(3)}),
    "Log": Case([node("Mul", ["x", "w"], "h"), node("Log", ["h"])], POS, {"w": rand(3, lo=0.5)}),
    "Sqrt": Case([node("Mul", ["x", "w"], "h"), node("Sqrt", ["h"])], POS, {"w": rand(3, lo=0.5)}),
    "Pow": Case([node("Pow", ["x", "w"])], POS, {"w": rand(3)}),
    "Pow_int_exponent": Case(
        [node("Mul", ["x", "w"], "h"), node("Pow", ["h", "k"])], X23,
        {"w": rand(3), "k": i64(3)},
    ),
    "Softmax": Case([node("Mul", ["x", "w"], "h"), node("Softmax", ["h"])], X23, {"w": rand(3)}),
    "Softmax_axis0": Case(
        [node("Mul", ["x", "w"], "h"), node("Softmax", ["h"], axis=0)], X23, {"w": rand(3)}
    ),
    "LogSoftmax": Case(
        [node("Mul", ["x", "w"], "h"), node("LogSoftmax", ["h"])], X23, {"w": rand(3)}
    ),
    "Reshape": Case(
        [node("Mul", ["x", "w"], "h"), node("Reshape", ["h", "s"])], {"x": rand(2, 3, 2)},
        {"w": rand(2), "s": i64(0, -1)},
    ),
    "Transpose": Case(
        [node("Mul", ["x", "w"], "h"), node("Transpose", ["h"], perm=[2, 0, 1])],
        {"x": rand(2, 3, 2)}, {"w": rand(2)},
    ),
    "Flatten": Case(
        [node("Mul", ["x", "w"], "h"), node("Flatten", ["h"], axis=-1)], {"x": rand(2, 3, 2)},
        {"w": rand(2)},
    ),
    "Squeeze": Case(
        [node("Mul", ["x", "w"], "h"), node("Squeeze", ["h", "a"])], {"x": rand(2, 1, 3)},
        {"w": rand(3), "a": i64(-2)},
    ),
    "Unsqueeze": Case(
        [node("Mul", ["x", "w"], "h"), node("Unsqueeze", ["h", "a"])], X23,
        {"w": rand(3), "a": i64(0, -1)},
    ),
    "Concat": Case([node("Concat", ["x", "w"], axis=-1)], X23, {"w": rand(2, 2)}),
    "Gather": Case(
        [node("Gather", ["w", "i"]), ], {"i": i64(2, -1, 0)}, {"w": rand(4, 3)}
    ),
    "Gather_axis1": Case(
        [node("Mul", ["x", "w"], "h"), node("Gather", ["h", "i"], axis=1)], X23,
        {"w": rand(3), "i": i64(1, 1, -3, 2)},
    ),
    "ReduceSum": Case(
        [node("Mul", ["x", "w"], "h"), node("ReduceSum", ["h", "a"], keepdims=0)],
        {"x": rand(2, 3, 2)}, {"w": rand(2), "a": i64(0, -1)},
    ),
    "ReduceSum_all": Case(
        [node("Mul", ["x", "w"], "h"), node("ReduceSum", ["h"])], X23, {"w": rand(3)}
    ),
    "ReduceMean": Case(
        [node("Mul", ["x", "w"], "h"), node("ReduceMean", ["h"], axes=[1])], X23, {"w": rand(3)}
    ),
    "ReduceMean_opset18": Case(
        [node("Mul", ["x", "w"], "h"), node("ReduceMean", ["h", "a"], keepdims=0)], X23,
        {"w": rand(3), "a": i64(1)}, opset=18,
    ),
    "ReduceMax": Case(
        [node("Mul", ["x", "w"], "h"), node("ReduceMax", ["h"], axes=[0], keepdims=0)], X23,
        {"w": rand(3)},
    ),
    "Constant": Case(
        [
            helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(rand(3), "k")),
            node("Mul", ["x", "w"], "h"),
            node("Add", ["h", "k"]),
        ],
        X23, {"w": rand(3)},
    ),
    "Constant_float": Case(
        [
            helper.make_node("Constant", [], ["k"], value_float=2.5),
            node("Mul", ["x", "k"], "h"),
            node("Mul", ["h", "w"]),
        ],
        {"x": rand(2, 3).astype(np.float32)}, {"w": rand(3).astype(np.float32)},
    ),
    "Identity": Case([node("Mul", ["x", "w"], "h"), node("Identity", ["h"])], X23, {"w": rand(3)}),
    "Cast": Case(
        [
            node("Cast", ["x"], "x32", to=TensorProto.FLOAT),
            node("Mul", ["x32", "w"], "h"),
            node("Cast", ["h"], to=TensorProto.DOUBLE),
        ],
        X23, {"w": rand(3).astype(np.float32)},
    ),
    "Abs": Case([node("Mul", ["x", "w"], "h"), node("Abs", ["h"])], X23, {"w": rand(3)}),
    "Sin": Case([node("Mul", ["x", "w"], "h"), node("Sin", ["h"])], X23, {"w": rand(3)}),
    "Cos": Case([node("Mul", ["x", "w"], "h"), node("Cos", ["h"])], X23, {"w": rand(3)}),
    "Max": Case([node("Max", ["x", "w"])], X23, {"w": rand(3)}),
    "Min": Case([node("Min", ["w", "x"])], X23, {"w": rand(2, 1)}),
    "Max_three": Case([node("Max", ["x", "w", "v"])], X23, {"w": rand(3), "v": rand(2, 1)}),
    "Min_one": Case([node("Mul", ["x", "w"], "h"), node("Min", ["h"])], X23, {"w": rand(3)}),
    "mlp_float32": Case(
        [
            node("Gemm", ["x", "W1", "b1"], "h", transB=1),
            node("Relu", ["h"], "r"),
            node("Gemm", ["r", "W2", "b2"], transB=1),
        ],
        {"x": rand(2, 3).astype(np.float32)},
        {k: v.astype(np.float32) for k, v in
         {"W1": rand(4, 3), "b1": rand(4), "W2": rand(2, 4), "b2": rand(2)}.items()},
    ),
}  # fmt: skip


def ort_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, feeds)[0])


def central_differences(
    model: onnx.ModelProto, case: Case, cot: np.ndarray, eps: float = 1e-6
) -> dict[str, np.ndarray]:
    """d(sum(output * cot)) / d(initializer), initializer by initializer, through onnxruntime
    (the initializers are fed as inputs of a copy of the model that lists them as inputs)."""
    floats = {k: v for k, v in case.inits.items() if v.dtype.kind == "f"}
    m = onnx.ModelProto()
    m.CopyFrom(model)
    keep = [t for t in m.graph.initializer if t.name not in floats]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    for k, v in floats.items():
        m.graph.input.append(helper.make_tensor_value_info(k, _ELEM[v.dtype], v.shape))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    base = {**case.inputs, **{k: v.astype(np.float64) for k, v in floats.items()}}

    def f(vals: dict[str, np.ndarray]) -> float:
        feeds = {
            **case.inputs,
            **{k: v.astype(floats[k].dtype) for k, v in vals.items() if k in floats},
        }
        return float(np.sum(np.asarray(sess.run(None, feeds)[0], np.float64) * cot))

    grads = {}
    for k, v in floats.items():
        g = np.zeros(v.shape)
        for idx in np.ndindex(v.shape):
            up, down = dict(base), dict(base)
            up[k], down[k] = v.astype(np.float64).copy(), v.astype(np.float64).copy()
            up[k][idx] += eps
            down[k][idx] -= eps
            g[idx] = (f(up) - f(down)) / (2 * eps)
        grads[k] = g
    return grads


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_and_gradients_match_onnxruntime(name: str) -> None:
    case = CASES[name]
    model = case.model()
    expected = ort_run(model, case.inputs)
    imported = from_onnx(model)
    floats = sorted(k for k, v in case.inits.items() if v.dtype.kind == "f")
    assert sorted(imported.params) == floats
    assert imported.inputs == list(case.inputs)
    assert imported.outputs == [case.output]
    single = expected.dtype == np.float32
    cot = RNG.standard_normal(expected.shape)
    s = gg.from_onnx(model)
    res = gg.connect().run(
        s.output,
        {**case.inputs, **s.params},
        wrt=floats,
        grad_outputs={s.output: cot.astype(expected.dtype)},
    )
    assert res.value.dtype == expected.dtype and res.value.shape == expected.shape
    np.testing.assert_allclose(
        res.value, expected, rtol=1e-5 if single else 1e-12, atol=1e-6 if single else 1e-12
    )
    single = single or any(case.inits[k].dtype == np.float32 for k in floats)
    numeric = central_differences(model, case, cot, eps=1e-2 if single else 1e-6)
    for k in floats:
        tol = {"rtol": 2e-2, "atol": 2e-3} if single else {"rtol": 1e-6, "atol": 1e-7}
        np.testing.assert_allclose(res.grads[k], numeric[k], err_msg=k, **tol)


@pytest.mark.parametrize("name", sorted(CASES))
def test_import_export_import_keeps_fingerprint(name: str) -> None:
    case = CASES[name]
    first = from_onnx(case.model())
    exported = to_onnx(first.graph, first.outputs, first.params)  # runs onnx.checker
    again = from_onnx(exported.SerializeToString())
    assert again.graph.fingerprint == first.graph.fingerprint
    assert again.params.keys() == first.params.keys()
    # onnxruntime reads the export and computes what the model computed
    np.testing.assert_allclose(
        ort_run(exported, case.inputs), ort_run(case.model(), case.inputs), rtol=1e-6
    )


def test_sdk_to_onnx_writes_a_valid_model(tmp_path: Any) -> None:
    with gg.Graph():
        x = gg.input("x", shape=(2, 3))
        w = gg.input("w", shape=(3,))
        y = gg.sum(gg.tanh(x * w) ** 2, axis=1)
    w_val, x_val = rand(3), rand(2, 3)
    path = tmp_path / "m.onnx"
    model = gg.to_onnx(y, params={w: w_val}, path=path)
    onnx.checker.check_model(onnx.load(str(path)))
    assert [i.name for i in model.graph.input] == ["x"]
    np.testing.assert_allclose(
        ort_run(model, {"x": x_val}), np.sum(np.tanh(x_val * w_val) ** 2, axis=1)
    )
    back = gg.from_onnx(path)
    np.testing.assert_array_equal(back.params["w"], w_val)


def test_an_op_without_export_names_the_node() -> None:
    with gg.Graph():
        x = gg.input("x", shape=(3,))
        y = gg.mse(x, gg.constant(np.zeros(3)), name="the_loss")
    with pytest.raises(ValidationError, match="the_loss.*'mse' has no ONNX export"):
        gg.to_onnx(y)


def test_dynamic_dims_bound_from_feeds_or_given() -> None:
    m = Case([node("MatMul", ["x", "W"])], {"x": rand(2, 3)}, {"W": rand(3, 2)}).model()
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    with pytest.raises(ValidationError, match="'x'.*dynamic dimension 0 'batch'"):
        from_onnx(m)
    assert from_onnx(m, dims={"batch": 5}).graph.types[0].shape == (5, 3)
    s = gg.from_onnx(m, feeds={"x": np.zeros((7, 3))})
    assert s.graph["x"].shape == (7, 3)
    with pytest.raises(
        ValidationError, match=r"'x' is declared \(batch, 3\), given shape \(7, 4\)"
    ):
        from_onnx(m, shapes={"x": (7, 4)})


def test_an_unsupported_op_names_node_op_type_and_opset() -> None:
    m = Case(
        [node("Mul", ["x", "w"], "h"), node("Erf", ["h"])], X23, {"w": rand(3)}, opset=17
    ).model()
    with pytest.raises(
        ValidationError, match=r"node 'y_node': Erf \(opset 17\): op type 'Erf' is not supported"
    ):
        from_onnx(m)


def test_an_unsupported_attribute_names_itself() -> None:
    m = Case([node("Gemm", ["x", "W"], transB=1, flavour=2)], X23, {"W": rand(3, 3)}).model()
    with pytest.raises(ValidationError, match=r"y_node': Gemm \(opset 13\): attribute 'flavour'"):
        from_onnx(m)
    # opset 18 moved ReduceMean's axes to an input: the attribute is refused there
    m = Case([node("ReduceMean", ["x"], axes=[1])], X23, opset=18).model()
    with pytest.raises(ValidationError, match=r"ReduceMean \(opset 18\): attribute 'axes'"):
        from_onnx(m)


def test_opsets_before_13_and_other_domains_are_refused() -> None:
    with pytest.raises(ValidationError, match="opset 12 is not supported"):
        from_onnx(Case([node("Relu", ["x"])], X23, opset=12).model())
    m = Case([node("Relu", ["x"])], X23).model()
    m.graph.node[0].domain = "com.microsoft"
    with pytest.raises(ValidationError, match="op domain 'com.microsoft'"):
        from_onnx(m)


def test_external_data_is_never_read(tmp_path: Any) -> None:
    m = Case([node("Add", ["x", "b"])], X23, {"b": rand(3)}).model()
    t = m.graph.initializer[0]
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    (tmp_path / "secret").write_bytes(b"\0" * 24)
    t.external_data.add(key="location", value=str(tmp_path / "secret"))
    with pytest.raises(ValidationError, match="initializer 'b' is stored in an external file"):
        from_onnx(m.SerializeToString())


def test_limits_are_checked_before_tensors_are_converted() -> None:
    m = Case([node("Add", ["x", "b"])], X23, {"b": rand(3)}).model()
    m.graph.initializer[0].dims[:] = [10**9]  # declares 8 GB; holds 24 bytes
    with pytest.raises(LimitError, match="'b'.*max_tensor_bytes=1000000") as e:
        from_onnx(m.SerializeToString(), max_tensor_bytes=10**6)
    assert e.value.limit == "max_tensor_bytes"
    with pytest.raises(LimitError, match="max_nodes=0"):
        from_onnx(m, max_nodes=0)
    with pytest.raises(ValidationError, match="not an ONNX ModelProto"):
        parse_model(b"\xff\xff\xff")


def test_malformed_attributes_and_tensors_are_validation_errors() -> None:
    """Attributes of the wrong type and tensors whose bytes do not match their shape are the
    sender's error naming the node and attribute, never an internal error."""
    m = Case([node("Softmax", ["x"], axis="last")], X23).model()
    with pytest.raises(
        ValidationError, match=r"y_node': Softmax \(opset 13\): attribute 'axis' must be an int"
    ):
        from_onnx(m.SerializeToString())
    m = Case([node("Gemm", ["x", "W"], alpha=[1.0, 2.0])], X23, {"W": rand(3, 3)}).model()
    with pytest.raises(ValidationError, match="attribute 'alpha' must be a float"):
        from_onnx(m)
    m = Case([node("Add", ["x", "b"])], X23, {"b": rand(3)}).model()
    m.graph.initializer[0].dims[:] = [4]  # 24 bytes of data for 4 doubles
    with pytest.raises(ValidationError, match="initializer 'b' cannot be read"):
        from_onnx(m.SerializeToString())
    k = numpy_helper.from_array(rand(3), "k")
    k.dims[:] = [-3]
    m = Case(
        [helper.make_node("Constant", [], ["k"], value=k), node("Add", ["x", "k"])], X23
    ).model()
    with pytest.raises(ValidationError, match="attribute 'value' cannot be read"):
        from_onnx(m)


@pytest.mark.parametrize("name", ["Gemm", "Reshape", "Constant", "Gather_axis1"])
def test_corrupted_model_bytes_are_graph_errors_or_valid(name: str) -> None:
    """Bytes of a model with a few bytes changed: the import succeeds or raises a GraphError
    (what a server answers INVALID_ARGUMENT or RESOURCE_EXHAUSTED), never anything else."""
    rng = np.random.default_rng(len(name))
    data = CASES[name].model().SerializeToString()
    for _ in range(100):
        mutated = bytearray(data)
        for _ in range(rng.integers(1, 4)):
            mutated[rng.integers(len(mutated))] = rng.integers(256)
        with contextlib.suppress(gg.GraphError):
            from_onnx(bytes(mutated), max_nodes=1000, max_tensor_bytes=10**6)


def test_a_shape_or_axes_operand_of_floats_is_refused_not_truncated() -> None:
    """ONNX shapes and axes are int64 tensors; 2.5 must not quietly become 2."""
    x = {"x": rand(2, 3)}
    m = Case([node("Reshape", ["x", "s"])], x, {"s": np.array([2.5, 3.0])}).model()
    with pytest.raises(ValidationError, match=r"y_node': Reshape .*shape 's' must be int64.*float"):
        from_onnx(m)
    m = Case([node("ReduceSum", ["x", "a"])], x, {"a": np.array([1.0])}).model()
    with pytest.raises(ValidationError, match=r"ReduceSum .*axes 'a' must be int64"):
        from_onnx(m)


def test_two_initializers_of_one_name_are_refused() -> None:
    m = Case([node("Add", ["x", "b"])], {"x": rand(2, 3)}, {"b": rand(3)}).model()
    m.graph.initializer.append(numpy_helper.from_array(rand(2, 3), "b"))
    with pytest.raises(ValidationError, match="initializer 'b' is named twice"):
        from_onnx(m)


def test_a_given_shape_that_is_not_ints_names_the_input() -> None:
    m = Case([node("Relu", ["x"])], {"x": rand(2, 3)}).model()
    with pytest.raises(ValidationError, match=r"'x'.*shape \('a', 3\) is not a sequence of ints"):
        from_onnx(m, shapes={"x": ("a", 3)})


@pytest.mark.parametrize("op", ["sum", "mean", "max"])
@pytest.mark.parametrize("keepdims", [False, True])
def test_a_reduction_over_no_axes_exports_as_what_it_computes(op: str, keepdims: bool) -> None:
    """axis=() reduces nothing (numpy); ONNX's empty axes mean every axis unless told."""
    x_val = rand(2, 3)
    with gg.Graph():
        x = gg.input("x", shape=(2, 3))
        y = getattr(gg, op)(x, axis=(), keepdims=keepdims)
    want = gg.LocalClient().run(y, {"x": x_val}).value
    np.testing.assert_array_equal(want, x_val)
    np.testing.assert_array_equal(ort_run(gg.to_onnx(y), {"x": x_val}), want)


def test_a_file_that_is_not_a_model_is_a_validation_error_naming_it(tmp_path: Any) -> None:
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"\xff\xff\xff")
    with pytest.raises(ValidationError, match=r"broken.onnx: not an ONNX ModelProto"):
        gg.from_onnx(path)


@pytest.mark.parametrize("producer", ["Relu", "Constant"])
def test_a_node_output_named_like_an_initializer_is_refused(producer: str) -> None:
    """ONNX values are assigned once; an output shadowing an initializer was taken silently
    (the initializer, a weight, vanished from the params)."""
    made = (
        node("Relu", ["x"], "w")
        if producer == "Relu"
        else helper.make_node("Constant", [], ["w"], value_float=1.0)
    )
    m = Case([made, node("Add", ["x", "w"])], X23, {"w": rand(3)}).model()
    with pytest.raises(ValidationError, match=r"a second value named 'w'"):
        from_onnx(m)


def test_a_constant_named_like_a_graph_input_is_refused() -> None:
    m = Case(
        [helper.make_node("Constant", [], ["x"], value_float=1.0), node("Relu", ["x"])], X23
    ).model()
    with pytest.raises(ValidationError, match=r"a second value named 'x'"):
        from_onnx(m)
