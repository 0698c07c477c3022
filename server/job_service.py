"""The JobService servicer: proto in -> job manager -> proto out, a few lines per RPC."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc

from graphgrad.engine.errors import RequestError
from graphgrad.engine.ir import Graph
from graphgrad.engine.training import (
    SGD,
    Adam,
    Optimizer,
    TrainSpec,
    check_settings,
    job_bytes,
    within,
)
from graphgrad.v1 import jobs_pb2

from . import codec
from .inflight import CallContext
from .jobs import JobManager, JobView
from .runtime import Runtime
from .service import executor_name, register_wire

STATUS = {
    "pending": jobs_pb2.JOB_STATUS_PENDING,
    "running": jobs_pb2.JOB_STATUS_RUNNING,
    "done": jobs_pb2.JOB_STATUS_DONE,
    "cancelled": jobs_pb2.JOB_STATUS_CANCELLED,
    "failed": jobs_pb2.JOB_STATUS_FAILED,
}


def decode_optimizer(o: jobs_pb2.Optimizer) -> Optimizer:
    kind = o.WhichOneof("kind")
    if kind is None:
        raise RequestError(
            "the job names no optimizer: set `optimizer.sgd` or `optimizer.adam`",
            field="optimizer",
        )
    with within(f"optimizer.{kind}"):  # the optimizers check their hyper-parameters
        if kind == "sgd":
            return SGD(lr=o.sgd.lr, momentum=o.sgd.momentum)
        default, a = Adam(), o.adam  # fields not set take Adam's defaults; 0 is a value
        return Adam(
            lr=a.lr,
            beta1=a.beta1 if a.HasField("beta1") else default.beta1,
            beta2=a.beta2 if a.HasField("beta2") else default.beta2,
            eps=a.eps if a.HasField("eps") else default.eps,
        )


# A result message holds one network's whole loss history at least: room for its fields.
RESULT_OVERHEAD_BYTES = 4096


def spec_decoder(runtime: Runtime) -> Callable[[bytes], tuple[list[TrainSpec], str]]:
    """Proto -> engine specs under every live check: the engine checks them
    (TrainSpec.build), the graphs are registered, and the job's size from N x steps is checked
    against max_request_bytes before anything is stored."""

    def decode(blob: bytes) -> tuple[list[TrainSpec], str]:
        return _decode(blob, runtime)

    return decode


def stored_spec_decoder(blob: bytes) -> tuple[list[TrainSpec], str]:
    """A stored spec read back with structure checks only: no limits (a finished job stays
    readable under smaller ones) and no graph-cache registration (reading a job never evicts
    users' graphs)."""
    return _decode(blob, None)


def _decode(blob: bytes, runtime: Runtime | None) -> tuple[list[TrainSpec], str]:
    limits = runtime.limits if runtime is not None else None
    req = jobs_pb2.SubmitJobRequest.FromString(blob)
    if not req.templates:
        raise RequestError("the job has no templates", field="templates")
    executor = executor_name(req.executor, "executor")
    optimizer = decode_optimizer(req.optimizer)
    batch_size = req.batch_size if req.batch_size != 0 else None  # 0: every sample
    check_settings(optimizer, req.steps, batch_size, req.seed)
    if limits is not None:
        check_steps_fit_a_message(req.steps, limits.max_message_bytes)
    tensor_bytes = None if limits is None else limits.max_tensor_bytes
    specs = []
    for k, t in enumerate(req.templates):
        where = f"templates[{k}]"
        if runtime is None:
            graph = Graph(codec.decode_graph(t.graph))
        else:
            graph = register_wire(runtime, t.graph)
        params = codec.decode_tensors(t.params, f"{where}.params", tensor_bytes)
        data = codec.decode_tensors(t.data, f"{where}.data", tensor_bytes)
        with within(where):
            specs.append(
                TrainSpec.build(
                    graph, t.loss, params, data, optimizer, req.steps, batch_size, req.seed
                )
            )
    if limits is not None:
        networks = sum(s.n for s in specs)
        limits.check_request_bytes(
            job_bytes(specs), f"the job of {networks} networks x {req.steps} steps"
        )
    return specs, executor


def check_steps_fit_a_message(steps: int, max_message_bytes: int) -> None:
    """Results are sent a range of networks per message: one network's history must fit."""
    most = (max_message_bytes - RESULT_OVERHEAD_BYTES) // 8
    if steps > most:
        raise RequestError(
            f"steps={steps}: one network's loss history ({steps} x 8 bytes) must fit a result "
            f"message of max_message_bytes={max_message_bytes}: at most {most} steps",
            field="steps",
        )


def encode_view(v: JobView) -> jobs_pb2.JobInfo:
    p = v.progress
    return jobs_pb2.JobInfo(
        id=v.id,
        status=STATUS[v.status],
        steps_done=p.steps_done,
        steps=p.steps,
        networks=p.networks,
        networks_done=p.networks_done,
        loss_median=p.loss_median,
        loss_best=p.loss_best,
        loss_worst=p.loss_worst,
        networks_nonfinite=p.networks_nonfinite,
        error=v.error,
        created=v.created,
    )


class JobServicer:
    def __init__(self, manager: JobManager) -> None:
        self.manager = manager

    def SubmitJob(
        self, request: jobs_pb2.SubmitJobRequest, context: CallContext
    ) -> jobs_pb2.SubmitJobResponse:
        return jobs_pb2.SubmitJobResponse(id=self.manager.submit(request.SerializeToString()))

    async def WatchJob(
        self, request: jobs_pb2.WatchJobRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[jobs_pb2.WatchJobResponse]:
        # On the event loop: an idle watcher holds no thread; a client that goes away
        # cancels it.
        async for view in self.manager.watch(request.id):
            yield jobs_pb2.WatchJobResponse(job=encode_view(view))

    def GetJob(
        self, request: jobs_pb2.GetJobRequest, context: CallContext
    ) -> jobs_pb2.GetJobResponse:
        return jobs_pb2.GetJobResponse(job=encode_view(self.manager.job(request.id).view()))

    def GetJobResults(
        self, request: jobs_pb2.GetJobResultsRequest, context: CallContext
    ) -> Iterator[jobs_pb2.GetJobResultsResponse]:
        for template, kind, name, first, value in self.manager.results(request.id):
            part = jobs_pb2.GetJobResultsResponse(
                template=template, kind=kind, name=name, first=first
            )
            codec.encode_tensor(value, part.value)
            yield part

    def CancelJob(
        self, request: jobs_pb2.CancelJobRequest, context: CallContext
    ) -> jobs_pb2.CancelJobResponse:
        return jobs_pb2.CancelJobResponse(job=encode_view(self.manager.cancel(request.id)))

    def DeleteJob(
        self, request: jobs_pb2.DeleteJobRequest, context: CallContext
    ) -> jobs_pb2.DeleteJobResponse:
        self.manager.delete(request.id)
        return jobs_pb2.DeleteJobResponse()

    def ListJobs(
        self, request: jobs_pb2.ListJobsRequest, context: CallContext
    ) -> jobs_pb2.ListJobsResponse:
        return jobs_pb2.ListJobsResponse(jobs=[encode_view(v) for v in self.manager.list()])
