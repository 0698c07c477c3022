"""The JobService servicer: proto in -> engine Session (its jobs) -> proto out, a few lines
per RPC."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc

from graphgrad import wire
from graphgrad.engine import ExecutorKind, RequestError, Session, TrainSpec, job_bytes
from graphgrad.server.inflight import CallContext
from graphgrad.server.runtime import Runtime
from graphgrad.v1 import jobs_pb2

# A result message holds one network's whole loss history at least: room for its fields.
RESULT_OVERHEAD_BYTES = 4096


def spec_decoder(runtime: Runtime) -> Callable[[bytes], tuple[list[TrainSpec], ExecutorKind]]:
    """Proto -> engine specs under every live check: the engine checks them
    (TrainSpec.build), the graphs are registered, and the job's size from N x steps is checked
    against max_request_bytes before anything is stored."""

    def decode(blob: bytes) -> tuple[list[TrainSpec], ExecutorKind]:
        return _decode(blob, runtime)

    return decode


def stored_spec_decoder(blob: bytes) -> tuple[list[TrainSpec], ExecutorKind]:
    """A stored spec read back with structure checks only: no limits (a finished job stays
    readable under smaller ones) and no graph-cache registration (reading a job never evicts
    users' graphs)."""
    return _decode(blob, None)


def _decode(blob: bytes, runtime: Runtime | None) -> tuple[list[TrainSpec], ExecutorKind]:
    req = jobs_pb2.SubmitJobRequest.FromString(blob)
    if runtime is None:
        return wire.decode_job(req)
    limits = runtime.limits
    specs, executor = wire.decode_job(
        req,
        limits.max_tensor_bytes,
        runtime.register,
        limits.check_node_count,
        check_steps=lambda steps: check_steps_fit_a_message(steps, limits.max_message_bytes),
    )
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


class JobServicer:
    def __init__(self, session: Session) -> None:
        self.session = session  # its jobs: the server's manager, attached

    def SubmitJob(
        self, request: jobs_pb2.SubmitJobRequest, context: CallContext
    ) -> jobs_pb2.SubmitJobResponse:
        return jobs_pb2.SubmitJobResponse(id=self.session.submit(request.SerializeToString()))

    async def WatchJob(
        self, request: jobs_pb2.WatchJobRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[jobs_pb2.WatchJobResponse]:
        # On the event loop: an idle watcher holds no thread; a client that goes away
        # cancels it.
        async for view in self.session.watch_async(request.id):
            yield jobs_pb2.WatchJobResponse(job=wire.encode_job_info(view))

    def GetJob(
        self, request: jobs_pb2.GetJobRequest, context: CallContext
    ) -> jobs_pb2.GetJobResponse:
        return jobs_pb2.GetJobResponse(
            job=wire.encode_job_info(self.session.job(request.id).view())
        )

    def GetJobResults(
        self, request: jobs_pb2.GetJobResultsRequest, context: CallContext
    ) -> Iterator[jobs_pb2.GetJobResultsResponse]:
        for part in self.session.results(request.id):
            yield wire.encode_result_part(part)

    def CancelJob(
        self, request: jobs_pb2.CancelJobRequest, context: CallContext
    ) -> jobs_pb2.CancelJobResponse:
        return jobs_pb2.CancelJobResponse(job=wire.encode_job_info(self.session.cancel(request.id)))

    def DeleteJob(
        self, request: jobs_pb2.DeleteJobRequest, context: CallContext
    ) -> jobs_pb2.DeleteJobResponse:
        self.session.delete(request.id)
        return jobs_pb2.DeleteJobResponse()

    def ListJobs(
        self, request: jobs_pb2.ListJobsRequest, context: CallContext
    ) -> jobs_pb2.ListJobsResponse:
        return jobs_pb2.ListJobsResponse(
            jobs=[wire.encode_job_info(v) for v in self.session.jobs()]
        )
