"""The GraphService servicer: proto in -> domain -> runtime -> proto out, a few lines per RPC."""

from __future__ import annotations

from collections.abc import Mapping
from importlib import metadata

from graphgrad.engine import Cancellation, Graph, RequestError, RunRequest, calibration, simulator
from graphgrad.engine.executor import check_finite
from graphgrad.v1 import graph_pb2, service_pb2

from . import codec
from .inflight import CallContext
from .runtime import Runtime

EXECUTORS = {
    service_pb2.EXECUTOR_UNSPECIFIED: "auto",
    service_pb2.EXECUTOR_AUTO: "auto",
    service_pb2.EXECUTOR_LOCAL: "local",
    service_pb2.EXECUTOR_RAY: "ray",
}


def executor_name(value: service_pb2.Executor.ValueType, field: str) -> str:
    """The engine's name for the Executor enum `value` of the request's `field`; an unknown
    value is the client's error. Every request with an executor decodes it here."""
    try:
        return EXECUTORS[value]
    except KeyError:
        known = ", ".join(service_pb2.Executor.Name(k) for k in EXECUTORS)
        raise RequestError(
            f"{field} must be one of {known}, got enum value {value}", field=field
        ) from None


def cancellation(context: CallContext) -> Cancellation:
    """Stops the work when the client's deadline passes or the call is cancelled."""
    cancel = Cancellation.within(context.time_remaining())
    context.add_callback(cancel.cancel)
    return cancel


def register_wire(runtime: Runtime, graph: graph_pb2.Graph) -> Graph:
    """Validate and keep a graph from the wire; the node count is checked before decoding."""
    runtime.limits.check_node_count(len(graph.nodes))
    return runtime.register(codec.decode_graph(graph, runtime.limits.max_tensor_bytes))


def register_onnx(
    runtime: Runtime, data: bytes, dims: Mapping[str, int], shapes: Mapping[str, tuple[int, ...]]
) -> Graph:
    """Validate and keep an ONNX model from the wire (graphgrad.onnx converts it): the node
    count and every stored tensor's size are checked before any tensor is converted."""
    from graphgrad import onnx as onnx_models  # the wire layer; needs the `onnx` package

    limits = runtime.limits
    model = onnx_models.parse_model(data)
    imported = onnx_models.from_onnx(
        model, dims, shapes, max_nodes=limits.max_nodes, max_tensor_bytes=limits.max_tensor_bytes
    )
    limits.check_node_count(len(imported.graph))
    return runtime.register(imported.graph.nodes)


class GraphServicer:
    def __init__(self, runtime: Runtime, limits: Mapping[str, int] | None = None) -> None:
        """`limits`: every limit of the server by name, for GetServerInfo (default: the
        runtime's request limits)."""
        self.runtime = runtime
        self.limits = dict(limits if limits is not None else runtime.limits.as_dict())

    def _graph(self, request: service_pb2.RunRequest | service_pb2.ExplainRequest) -> Graph:
        which = request.WhichOneof("graph_ref")
        if which == "graph":
            return register_wire(self.runtime, request.graph)
        if which == "fingerprint":
            return self.runtime.graph(request.fingerprint)
        if which == "onnx_model" and isinstance(request, service_pb2.RunRequest):
            shapes = {k: tuple(v.shape) for k, v in request.feeds.items()}
            return register_onnx(self.runtime, request.onnx_model, request.onnx_dims, shapes)
        raise RequestError(
            "the request names no graph: set `graph` or `fingerprint`", field="graph_ref"
        )

    def RegisterGraph(
        self, request: service_pb2.RegisterGraphRequest, context: CallContext
    ) -> service_pb2.RegisterGraphResponse:
        if request.onnx_model:
            if request.HasField("graph"):
                raise RequestError("set `graph` or `onnx_model`, not both", field="onnx_model")
            graph = register_onnx(self.runtime, request.onnx_model, request.onnx_dims, {})
        else:
            graph = register_wire(self.runtime, request.graph)
        return service_pb2.RegisterGraphResponse(
            fingerprint=graph.fingerprint, num_nodes=len(graph)
        )

    def Run(self, request: service_pb2.RunRequest, context: CallContext) -> service_pb2.RunResponse:
        graph = self._graph(request)
        limit = self.runtime.limits.max_tensor_bytes
        feeds = codec.decode_tensors(request.feeds, "feeds", limit)
        seeds = codec.decode_tensors(request.grad_outputs, "grad_outputs", limit)
        run = RunRequest(tuple(request.outputs), feeds, tuple(request.wrt), seeds or None)
        executor = executor_name(request.options.executor, "options.executor")
        result = self.runtime.run(graph, run, executor, cancellation(context))
        if request.options.check_numerics:
            check_finite(result, feeds)
        return codec.encode_result(result, graph.fingerprint)

    def Explain(
        self, request: service_pb2.ExplainRequest, context: CallContext
    ) -> service_pb2.ExplainResponse:
        graph = self._graph(request)
        executor = executor_name(request.options.executor, "options.executor")
        run = RunRequest(tuple(request.outputs), {}, tuple(request.wrt))
        cancel = cancellation(context)
        explanation = self.runtime.explain(graph, run, executor, cancel)
        out = codec.encode_explanation(explanation)
        c = request.cluster
        shape = simulator.cluster_from(
            nodes=c.nodes or None,
            cpus_per_node=c.cpus_per_node or None,
            network_bytes_per_s=c.network_bytes_per_s or None,
        )
        if shape is not None:
            prediction = simulator.predict(graph, run, shape, calibration.in_force(), cancel)
            codec.encode_prediction(prediction, out.prediction)
        return out

    def ListOps(
        self, request: service_pb2.ListOpsRequest, context: CallContext
    ) -> service_pb2.ListOpsResponse:
        return codec.op_infos()

    def GetServerInfo(
        self, request: service_pb2.GetServerInfoRequest, context: CallContext
    ) -> service_pb2.GetServerInfoResponse:
        out = service_pb2.GetServerInfoResponse(
            version=metadata.version("graphgrad"), opset_version=codec.OPSET_VERSION
        )
        out.limits.update(self.limits)
        cal = calibration.in_force()
        out.calibration = cal.source
        out.calibration_figures.update(calibration.figures(cal))
        for name, stats in self.runtime.caches().items():
            info = out.caches[name]
            info.entries, info.bytes = stats.entries, stats.bytes
            info.max_entries, info.max_bytes = stats.max_entries, stats.max_bytes
        if self.runtime.dispatcher.ray_ready():
            address, resources = self.runtime.dispatcher.ray.info()
            out.ray_address = address
            out.ray_resources.update(resources)
        return out
