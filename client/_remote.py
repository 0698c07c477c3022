"""The remote client: the same `run` API as the in-process one, over gRPC."""

from __future__ import annotations

import html
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from graphgrad import wire
from graphgrad._aio import AsyncClient
from graphgrad._builder import Tensor
from graphgrad._plan_view import PlanView
from graphgrad._prepared import Prepared, RunShapes, RunSpec, Seeds
from graphgrad._remote_job import RemoteJob
from graphgrad._request import NodeRef, build_request
from graphgrad._result import Result
from graphgrad._train_specs import ArrayMap, build_specs
from graphgrad.engine import (
    ERROR_DOMAIN,
    LRU,
    SGD,
    ExecutorKind,
    Graph,
    GraphError,
    JobView,
    OpInfo,
    Optimizer,
    RunRequest,
    cluster_from,
    feed_spec,
    rebuild_error,
)
from graphgrad.v1 import jobs_pb2, jobs_pb2_grpc, service_pb2, service_pb2_grpc

MAX_MESSAGE_BYTES = 512 << 20
SERVICE_NAME = service_pb2.DESCRIPTOR.services_by_name["GraphService"].full_name
PREPARED_RUNS = 256  # request skeletons kept per connection (a few hundred bytes each)


class RemoteError(GraphError):
    """A server error: `code` is the gRPC status code, `violations` the fields it names."""

    def __init__(
        self, code: grpc.StatusCode, message: str, violations: Sequence[tuple[str, str]] = ()
    ) -> None:
        self.code = code
        self.message = message
        self.violations = list(violations)
        # Not super(): rebuilt errors are also FeedError, ExecutionError... (rebuild_error),
        # whose constructors take other arguments.
        Exception.__init__(self, f"{code.name}: {message}")


def _remote_error(e: grpc.RpcError, address: str | None = None) -> RemoteError:
    violations: list[tuple[str, str]] = []
    kind, where = "", {}
    status = rpc_status.from_call(e)  # type: ignore[arg-type]
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            if info.domain == ERROR_DOMAIN:
                kind, where = info.reason, dict(info.metadata)
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            br = error_details_pb2.BadRequest()
            detail.Unpack(br)
            violations += [(v.field, v.description) for v in br.field_violations]
        elif detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            qf = error_details_pb2.QuotaFailure()
            detail.Unpack(qf)
            violations += [(v.subject, v.description) for v in qf.violations]
    message = e.details() or ""
    if e.code() == grpc.StatusCode.UNAVAILABLE and address is not None:
        from graphgrad._connect import unavailable_message  # _connect imports this module

        message = unavailable_message(address, message)
    error = rebuild_error(kind, where, RemoteError, e.code(), message, violations)
    assert isinstance(error, RemoteError)
    return error


def _credentials(tls: bool | str | bytes | Path) -> grpc.ChannelCredentials:
    if tls is True:
        return grpc.ssl_channel_credentials()
    root = tls if isinstance(tls, bytes) else Path(str(tls)).read_bytes()
    return grpc.ssl_channel_credentials(root_certificates=root)


class RemoteClient(AsyncClient):
    """A connection to a graphgrad server. Graphs are uploaded once, then run by fingerprint."""

    def __init__(
        self,
        address: str,
        *,
        token: str | None = None,
        tls: bool | str | bytes | Path = False,
        timeout: float | None = None,
    ) -> None:
        self.address = address
        self.timeout = timeout
        options = [
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ]
        self._channel = (
            grpc.secure_channel(address, _credentials(tls), options)
            if tls
            else grpc.insecure_channel(address, options)
        )
        self._stub = service_pb2_grpc.GraphServiceStub(self._channel)
        self._jobs_stub = jobs_pb2_grpc.JobServiceStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._registered: set[str] = set()
        # Calls whose request goes serialized: a prepared run's skeleton and feeds.
        self._raw = {
            "Run": self._channel.unary_unary(
                f"/{SERVICE_NAME}/Run",
                request_serializer=None,  # the request's bytes as they are
                response_deserializer=service_pb2.RunResponse.FromString,
            )
        }
        self._prepared: LRU[Hashable, _RunCall] = LRU(PREPARED_RUNS)
        self._run_shapes = RunShapes()

    def __repr__(self) -> str:
        return f"<graphgrad.RemoteClient {self.address}>"

    def _repr_html_(self) -> str:
        try:
            info = self.server_info()
        except GraphError as e:
            return f"<div><b>graphgrad</b> {html.escape(self.address)}: unreachable ({e})</div>"
        ray = ", ".join(f"{k}: {v:g}" for k, v in sorted(info.ray_resources.items()))
        return (
            f"<div><b>graphgrad</b> server {html.escape(self.address)}, version "
            f"{html.escape(info.version)}, opset {info.opset_version}<br/>Ray: "
            f"{html.escape(ray or 'not running')}</div>"
        )

    def _call(self, method: str, request: Any, timeout: float | None, stub: str = "graphs") -> Any:
        target = self._jobs_stub if stub == "jobs" else self._stub
        try:
            return getattr(target, method)(
                request,
                timeout=self.timeout if timeout is None else timeout,
                metadata=self._metadata,
            )
        except grpc.RpcError as e:
            raise _remote_error(e, self.address) from None

    @staticmethod
    def _stream(responses: Any) -> Any:
        """Iterate a server stream, with its errors as RemoteError."""
        try:
            yield from responses
        except grpc.RpcError as e:
            raise _remote_error(e) from None

    def job_call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        """One unary JobService call (what RemoteJob handles use), errors as RemoteError."""
        return self._call(method, request, timeout, stub="jobs")

    def job_stream(self, method: str, request: Any, timeout: float | None = None) -> Any:
        """The messages of one JobService server stream, errors as RemoteError."""
        return self._stream(self._call(method, request, timeout, stub="jobs"))

    def train(
        self,
        loss: Tensor | Sequence[Tensor],
        params: ArrayMap | Sequence[ArrayMap],
        data: ArrayMap | Sequence[ArrayMap] | None = None,
        optimizer: Optimizer | None = None,
        steps: int = 200,
        batch_size: int | None = None,
        seed: int = 0,
        *,
        executor: str = "auto",
    ) -> RemoteJob:
        """As LocalClient.train, on the server: the job is stored there and survives
        restarts; the returned handle follows it."""
        kind = ExecutorKind.parse(executor, field="executor")
        specs = build_specs(loss, params, data, optimizer or SGD(lr=0.1), steps, batch_size, seed)
        job_id = self.job_call("SubmitJob", wire.encode_job(specs, kind)).id
        return RemoteJob(self, job_id, len(specs))

    def jobs(self) -> list[JobView]:
        """Every job the server holds."""
        return [
            wire.decode_job_info(info)
            for info in self.job_call("ListJobs", jobs_pb2.ListJobsRequest()).jobs
        ]

    def register(self, graph: Graph, timeout: float | None = None) -> str:
        """Upload an engine graph to the server; returns its fingerprint (runs name it)."""
        msg = service_pb2.RegisterGraphRequest(graph=wire.encode_graph(graph))
        resp = self._call("RegisterGraph", msg, timeout)
        self._registered.add(resp.fingerprint)
        return str(resp.fingerprint)

    def _call_on_graph(
        self, method: str, msg: Any, graph: Graph, timeout: float | None, raw: bool = False
    ) -> Any:
        """Call with the graph named by fingerprint, registering it first on this connection,
        and again if the server forgot it (restart, cache eviction). `raw`: `msg` is the
        request's bytes, naming the fingerprint already (a prepared run's)."""
        if graph.fingerprint not in self._registered:
            self.register(graph, timeout)
        if not raw:
            msg.fingerprint = graph.fingerprint
        call = self._call_raw if raw else self._call
        try:
            return call(method, msg, timeout)
        except RemoteError as e:
            if e.code != grpc.StatusCode.NOT_FOUND:
                raise
            self._registered.discard(graph.fingerprint)
            self.register(graph, timeout)
            return call(method, msg, timeout)

    def _call_raw(self, method: str, payload: bytes, timeout: float | None) -> Any:
        """A GraphService call whose request is already serialized."""
        try:
            return self._raw[method](
                payload,
                timeout=self.timeout if timeout is None else timeout,
                metadata=self._metadata,
            )
        except grpc.RpcError as e:
            raise _remote_error(e, self.address) from None

    def _prepared_run(self, spec: RunSpec, seeds: Seeds) -> Prepared:
        key = (spec.graph.fingerprint, spec.outputs, spec.wrt, spec.seeded, spec.options)
        call = self._prepared.get_or_make(key, lambda: _RunCall(self, spec))
        return Prepared(spec, seeds, call)

    def explain(
        self,
        outputs: NodeRef | Sequence[NodeRef],
        wrt: NodeRef | Sequence[NodeRef] | None = (),
        *,
        executor: str = "auto",
        timeout: float | None = None,
        cpus: int | None = None,
        nodes: int | None = None,
        cpus_per_node: int | None = None,
        network_bytes_per_s: float | None = None,
    ) -> PlanView:
        """How the server would run `run(outputs, wrt=wrt)`: partitions, costs, cuts; given
        `cpus` or `nodes` and `cpus_per_node`, the server's prediction on that cluster."""
        cluster = cluster_from(cpus, nodes, cpus_per_node, network_bytes_per_s, "explain")
        _, graph, request = build_request(outputs, None, wrt, None)
        msg = wire.encode_explain_request(request, ExecutorKind.parse(executor), cluster)
        resp = self._call_on_graph("Explain", msg, graph, timeout)
        prediction = (
            wire.decode_prediction(resp.prediction) if resp.HasField("prediction") else None
        )
        return PlanView(wire.decode_explanation(resp), graph, prediction=prediction)

    def list_ops(self) -> list[OpInfo]:
        """The server's ops: name, signature with named arguments, doc, attributes."""
        return wire.decode_ops(self._call("ListOps", service_pb2.ListOpsRequest(), None))

    def server_info(self) -> service_pb2.GetServerInfoResponse:
        return self._call("GetServerInfo", service_pb2.GetServerInfoRequest(), None)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> RemoteClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _RunCall:
    """A prepared run's wire form. The request's skeleton (fingerprint, outputs, wrt, options)
    is serialized once; a call serializes only its feeds (and seeds) and appends them, since
    protobuf reads concatenated messages as one. The answer's values and gradients are
    decoded against the outputs' and wrt's declared types (views on the response's bytes)."""

    def __init__(self, client: RemoteClient, spec: RunSpec) -> None:
        graph = spec.graph
        self.client, self.graph = client, graph
        skeleton = wire.encode_run_request(
            RunRequest(spec.outputs, {}, spec.wrt), spec.options, graph.fingerprint
        )
        self.head = skeleton.SerializeToString()
        index = graph.index
        self.values = tuple(feed_spec(graph, index[n]) for n in spec.outputs if n in index)
        self.grads = tuple(feed_spec(graph, index[n]) for n in spec.wrt if n in index)

    def __call__(self, feeds: dict[str, np.ndarray], seeds: Seeds, timeout: float | None) -> Result:
        body = service_pb2.RunRequest()
        wire.encode_tensors(feeds, body.feeds)
        if seeds is not None:
            wire.encode_tensors(seeds, body.grad_outputs)
        payload = self.head + body.SerializeToString()
        resp = self.client._call_on_graph("Run", payload, self.graph, timeout, raw=True)
        res = wire.decode_result(resp, self.values, self.grads)
        return Result(res.values, res.grads, res.stats)
