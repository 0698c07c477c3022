"""graphgrad.wire: every encode_*/decode_* pair round-trips (property tests), and what
cannot be decoded is an error naming its field."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import graphgrad as gg
from graphgrad import wire
from graphgrad._train_specs import build_specs
from graphgrad.engine import (
    NO_PROGRESS,
    SGD,
    Adam,
    ExecutorKind,
    Graph,
    JobStatus,
    JobView,
    Progress,
    RequestError,
    ResultPart,
    RunOptions,
    RunRequest,
    RunResult,
    RunStats,
    Session,
    TaskStat,
    cluster_from,
)
from graphgrad.engine.ops.docs import op_infos
from graphgrad.engine.planner import CutInfo, Explanation, PartitionInfo
from graphgrad.engine.prepared import FeedSpec
from graphgrad.v1 import jobs_pb2, service_pb2

EXAMPLES = settings(max_examples=25)
names = st.text("abcdefgh_", min_size=1, max_size=6)
floats = st.floats(allow_nan=False, width=64)
shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)
arrays = st.one_of(
    hnp.arrays(
        st.sampled_from([np.float32, np.float64]), shapes, elements=st.floats(-1e3, 1e3, width=32)
    ),
    hnp.arrays(st.sampled_from([np.int32, np.int64]), shapes),
)
array_maps = st.dictionaries(names, arrays, max_size=3)


def same_arrays(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), k


@EXAMPLES
@given(arrays)
def test_tensor_round_trips_bit_for_bit(a):
    b = wire.decode_tensor(wire.encode_tensor(a))
    same_arrays({"a": a}, {"a": b})


UNARY = [gg.tanh, gg.exp, gg.sigmoid, gg.relu, gg.sin, gg.neg]


@st.composite
def graphs(draw):
    """A random graph built with the SDK: inputs, unary and binary ops, constants, sums with
    axis and keepdims, reshapes: every kind of attribute."""
    n = draw(st.integers(1, 4))
    with gg.Graph() as g:
        dtype = draw(st.sampled_from(["float32", "float64"]))
        values = [
            gg.input(f"x{k}", shape=(n,), dtype=dtype) for k in range(draw(st.integers(1, 3)))
        ]
        for _ in range(draw(st.integers(0, 6))):
            kind = draw(st.integers(0, 4))
            a = draw(st.sampled_from(values))
            if kind == 0:
                values.append(draw(st.sampled_from(UNARY))(a))
            elif kind == 1:
                values.append(a + draw(st.sampled_from(values)))
            elif kind == 2:
                values.append(a * np.arange(n, dtype=dtype))  # a constant node
            elif kind == 3:
                row = gg.reshape(a, (1, n))
                values.append(gg.reshape(gg.sum(row, axis=0, keepdims=draw(st.booleans())), (n,)))
            else:
                values.append(a ** draw(st.sampled_from([2, 0.5])))
        gg.sum(values[-1], name="out")
    return g.freeze()


@EXAMPLES
@given(graphs())
def test_graph_round_trips_to_the_same_fingerprint(graph):
    msg = wire.encode_graph(graph)
    back = Graph(wire.decode_graph(msg))
    assert back.fingerprint == graph.fingerprint
    assert [(n.name, n.op, n.inputs) for n in back.nodes] == [
        (n.name, n.op, n.inputs) for n in graph.nodes
    ]
    assert 1 <= msg.opset_version <= wire.OPSET_VERSION


def test_encoded_graphs_are_cached_by_fingerprint_and_bounded():
    with gg.Graph() as g:
        gg.tanh(gg.input("x", shape=(2,)), name="y")
    graph = g.freeze()
    assert wire.encode_graph(graph) is wire.encode_graph(graph)
    stats = wire.ENCODED_GRAPHS.stats()
    assert 0 < stats.entries <= stats.max_entries and stats.bytes <= stats.max_bytes


@EXAMPLES
@given(
    st.lists(names, max_size=3),
    array_maps,
    st.lists(names, max_size=3),
    st.none() | array_maps,
    st.sampled_from(ExecutorKind),
    st.booleans(),
)
def test_run_request_round_trips(outputs, feeds, wrt, seeds, executor, check):
    request = RunRequest(tuple(outputs), feeds, tuple(wrt), seeds or None)
    options = RunOptions(executor, check)
    back, back_options = wire.decode_run_request(wire.encode_run_request(request, options))
    assert (back.outputs, back.wrt) == (request.outputs, request.wrt)
    same_arrays(back.feeds, feeds)
    same_arrays(back.grad_outputs or {}, seeds or {})
    assert back_options == options and type(back_options.executor) is ExecutorKind


clusters = st.none() | st.builds(
    lambda n, c, b: cluster_from(nodes=n, cpus_per_node=c, network_bytes_per_s=b),
    st.integers(1, 8),
    st.integers(1, 16),
    st.floats(1e6, 1e11),
)


@EXAMPLES
@given(
    st.lists(names, max_size=3),
    st.lists(names, max_size=3),
    st.sampled_from(ExecutorKind),
    clusters,
)
def test_explain_request_round_trips(outputs, wrt, executor, cluster):
    request = RunRequest(tuple(outputs), {}, tuple(wrt))
    msg = wire.encode_explain_request(request, executor, cluster)
    back, kind, back_cluster = wire.decode_explain_request(msg)
    assert (back.outputs, back.wrt, kind, back_cluster) == (
        request.outputs,
        request.wrt,
        executor,
        cluster,
    )


def test_prediction_round_trips():
    with gg.Graph() as g:
        x = gg.input("x", shape=(64, 64))
        loss = gg.sum(gg.tanh(x @ x) + gg.exp(x), name="L")
    request = RunRequest(("L",), {}, ("x",))
    cluster = cluster_from(nodes=2, cpus_per_node=4)
    assert cluster is not None and loss is not None
    prediction = Session().predict(g.freeze(), request, cluster)
    msg = service_pb2.ExplainResponse()
    wire.encode_prediction(prediction, msg.prediction)
    assert wire.decode_prediction(msg.prediction) == prediction


task_stats = st.builds(
    TaskStat,
    st.integers(0, 100),
    st.sampled_from(["forward", "backward"]),
    floats,
    floats,
    names,
    st.integers(0, 2**40),
    st.integers(0, 2**40),
)


def stats_of(tasks: st.SearchStrategy, *more: st.SearchStrategy) -> st.SearchStrategy:
    """RunStats with `tasks`, and `more` of its fields after them (batch size, worker)."""
    return st.builds(
        RunStats,
        st.sampled_from(["local", "ray"]),
        floats,
        st.integers(0, 100),
        st.integers(0, 2**40),
        tasks,
        *more,
    )


run_stats = stats_of(st.lists(task_stats, max_size=3).map(tuple))


@EXAMPLES
@given(array_maps, array_maps, run_stats)
def test_result_round_trips(values, grads, stats):
    back = wire.decode_result(wire.encode_result(RunResult(values, grads, stats), "fp"))
    same_arrays(back.values, values)
    same_arrays(back.grads, grads)
    assert back.stats == stats


# Arrays not as the wire carries them: a strided view, a subclass (each then encoded the
# general way).
odd_arrays = st.one_of(
    arrays.filter(lambda a: a.ndim > 0 and a.shape[0] > 1).map(lambda a: a[::2]),
    arrays.map(lambda a: a.view(type("Sub", (np.ndarray,), {}))),
)
one_task_stats = stats_of(
    st.lists(task_stats, min_size=1, max_size=1).map(tuple), st.integers(0, 64), names
)


def as_message(res: RunResult, fingerprint: str, worker: str) -> service_pb2.RunResponse:
    out = wire.encode_result(res, fingerprint)
    out.stats.worker = worker or out.stats.worker
    return out


@settings(max_examples=60)
@given(
    array_maps,
    st.dictionaries(names, st.one_of(arrays, odd_arrays), max_size=3),
    st.one_of(run_stats, one_task_stats),
    st.sampled_from(["", "host:12"]),
)
def test_run_response_bytes_are_the_message_serialized(values, grads, stats, worker):
    """A response written as bytes (fields joined, stats packed into a kept layout) parses to
    the message encode_result builds, whatever its arrays and stats; twice: a layout or a
    tensor prefix kept from the first call serves the second."""
    res = RunResult(values, grads, stats)
    for _ in range(2):
        got = service_pb2.RunResponse.FromString(wire.encode_result_bytes(res, "fp", worker))
        assert got == as_message(res, "fp", worker)
        back = wire.decode_result(got)
        same_arrays(back.values, values)
        assert back.stats.worker == (worker or stats.worker)


def test_run_response_bytes_with_other_times_in_a_kept_layout():
    """A layout kept for one run's stats serves another of the same kind with its own times
    (zero times are not packed: proto3 does not write them)."""
    task = TaskStat(0, "forward+backward", 1700000000.25, 1700000000.5, "inline")
    first = RunStats("local", 0.25, 1, tasks=(task,))
    wire.encode_result_bytes(RunResult({}, {}, first), "fp", "w:1")
    for wall, start, end in [(1e-5, 3.0, 4.0), (0.0, 3.0, 4.0), (2.0, -1.0, 0.0), (7.0, 5.0, 6.0)]:
        t = TaskStat(0, "forward+backward", start, end, "inline")
        res = RunResult({}, {"x": np.arange(3.0)}, RunStats("local", wall, 1, tasks=(t,)))
        got = service_pb2.RunResponse.FromString(wire.encode_result_bytes(res, "fp", "w:1"))
        assert got == as_message(res, "fp", "w:1")


def test_decode_exact_checks_each_signature_with_its_own_bound():
    """What decode_exact works out once per signature holds for that signature and that
    largest tensor only: the same specs under a smaller bound, or specs of a dtype the wire
    does not carry as it is, decode to None."""
    specs = (FeedSpec("x", (2, 3), np.dtype(np.float64), 48),)
    msg = service_pb2.RunRequest()
    wire.encode_tensors({"x": np.arange(6.0).reshape(2, 3)}, msg.feeds)
    got = wire.decode_exact(msg.feeds, specs, 48)
    assert got is not None and got["x"].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert wire.decode_exact(msg.feeds, specs, 47) is None
    assert wire.decode_exact(msg.feeds, specs, 48) is not None
    other = (FeedSpec("x", (3, 2), np.dtype(np.float64), 48),)
    assert wire.decode_exact(msg.feeds, other, None) is None  # the same bytes, another shape
    big_endian = (FeedSpec("x", (2, 3), np.dtype(">f8"), 48),)
    assert wire.decode_exact(msg.feeds, big_endian, None) is None


def test_what_decode_exact_keeps_per_signature_is_bounded_by_feeds():
    """Signatures of graphs with thousands of inputs, each run once: the expectations kept
    stay under a bound in feeds (the prepared runs and graphs they came from may be gone)."""
    msg = service_pb2.RunRequest()
    wire.encode_tensors({f"x{k}": np.arange(2.0) for k in range(5_000)}, msg.feeds)
    for _ in range(40):
        specs = tuple(FeedSpec(f"x{k}", (2,), np.dtype(np.float64), 16) for k in range(5_000))
        assert wire.decode_exact(msg.feeds, specs, None) is not None
        assert sum(len(held[0]) for held in wire._EXPECTED.values()) <= wire._MOST_FEEDS_KEPT


explanations = st.builds(
    Explanation,
    st.sampled_from(["local", "ray"]),
    st.lists(
        st.builds(PartitionInfo, st.integers(0, 9), st.lists(names).map(tuple), floats, floats),
        max_size=3,
    ).map(tuple),
    st.lists(
        st.builds(CutInfo, st.integers(-1, 9), st.integers(0, 9), names, st.integers(0, 2**40)),
        max_size=3,
    ).map(tuple),
    names,
)


@EXAMPLES
@given(explanations)
def test_explanation_round_trips(explanation):
    assert wire.decode_explanation(wire.encode_explanation(explanation)) == explanation


def test_ops_round_trip():
    ops = op_infos()
    assert wire.decode_ops(wire.encode_ops(ops)) == ops


optimizers = st.one_of(
    st.builds(SGD, st.floats(1e-4, 1.0), st.floats(0.0, 0.99)),
    st.builds(Adam, st.floats(1e-4, 1.0), st.floats(0.0, 0.99), st.floats(0.0, 0.999)),
)


@EXAMPLES
@given(
    optimizers,
    st.integers(1, 50),
    st.none() | st.integers(1, 4),
    st.integers(0, 2**40),
    st.sampled_from(ExecutorKind),
    st.integers(1, 3),
)
def test_job_round_trips(optimizer, steps, batch_size, seed, executor, n):
    with gg.Graph():
        w, x = gg.input("w", shape=(2,)), gg.input("x", shape=(batch_size or 4, 2))
        loss = gg.sum((x @ w) ** 2, name="loss")
    rng = np.random.default_rng(seed % 7)
    shared = rng.normal(size=(4, 2))
    data = {"x": shared if seed % 2 else np.stack([shared] * n)}  # shared, or per network
    params = {"w": rng.normal(size=(n, 2))}
    specs = build_specs(loss, params, data, optimizer, steps, batch_size, seed)
    back, kind = wire.decode_job(wire.encode_job(specs, executor))
    assert kind == executor
    for a, b in zip(back, specs, strict=True):
        assert a.template.fingerprint == b.template.fingerprint
        assert (a.loss, a.optimizer, a.steps, a.batch_size, a.seed, a.per_network) == (
            b.loss,
            b.optimizer,
            b.steps,
            b.batch_size,
            b.seed,
            b.per_network,
        )
        same_arrays(a.params, b.params)
        same_arrays(a.data, b.data)


progress = st.builds(
    Progress,
    st.integers(0, 2**30),
    st.integers(0, 2**30),
    st.integers(0, 2**40),
    st.integers(0, 2**40),
    floats,
    floats,
    floats,
)


@EXAMPLES
@given(names, st.sampled_from(JobStatus), progress, st.text(max_size=20), floats, names)
def test_job_info_round_trips(job_id, status, p, error, created, worker):
    view = JobView(job_id, status, p, error, created, worker)
    back = wire.decode_job_info(wire.encode_job_info(view))
    assert back == view and type(back.status) is JobStatus


@EXAMPLES
@given(st.integers(0, 5), st.sampled_from(["params", "history"]), names, st.integers(0, 99), arrays)
def test_result_part_round_trips(template, kind, name, first, value):
    back = wire.decode_result_part(
        wire.encode_result_part(ResultPart(template, kind, name, first, value))
    )
    assert (back.template, back.kind, back.name, back.first) == (template, kind, name, first)
    same_arrays({"v": back.value}, {"v": value})


def test_unknown_enum_values_are_errors_naming_the_field():
    info = wire.encode_job_info(JobView("j", JobStatus.DONE, NO_PROGRESS, "", 0.0))
    info.status = 9  # type: ignore[assignment]
    with pytest.raises(wire.FieldError, match="status must be one of .*got enum value 9") as e:
        wire.decode_job_info(info)
    assert e.value.field == "status"
    info.status = jobs_pb2.JOB_STATUS_UNSPECIFIED
    with pytest.raises(wire.FieldError):
        wire.decode_job_info(info)
    msg = service_pb2.ExplainRequest(options=service_pb2.RunOptions(executor=7))  # type: ignore[arg-type]
    with pytest.raises(RequestError) as r:
        wire.decode_explain_request(msg)
    assert r.value.field == "options.executor"
    # An executor left unset is AUTO: the protobuf default means "let the server choose".
    assert wire.decode_explain_request(service_pb2.ExplainRequest())[1:] == (
        ExecutorKind.AUTO,
        None,
    )
    tensor = wire.encode_tensor(np.zeros(2))
    tensor.dtype = 5  # type: ignore[assignment]
    with pytest.raises(wire.FieldError) as f:
        wire.decode_tensor(tensor, "feeds['x']")
    assert f.value.field == "feeds['x'].dtype"
