"""The agent's side of the worker channel: a ``grpc.aio`` WorkerService on a Unix socket.

The servicer only records facts on the agent (heartbeat times, reports) and streams each
worker's command queue to it; decisions stay in :mod:`oobleck.agent.daemon`. The socket file
is made private to the agent's user (mode 0600). Protobuf stops here, on the workers' side:
requests become plain reports, and each queued :class:`~oobleck.agent.workers.WorkerOrder` a
``WorkerCommand`` message as it is sent.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import grpc

from oobleck.agent.readiness import ReadyReport
from oobleck.agent.workers import StepReport, WorkerOrder
from oobleck.common.worker_link import MAX_MESSAGE_BYTES, RECONFIGURE, START  # plans for large clusters travel here
from oobleck.protos.v1 import worker_pb2, worker_pb2_grpc

if TYPE_CHECKING:
    from oobleck.agent.daemon import Agent

log = logging.getLogger(__name__)


def order_message(order: WorkerOrder) -> worker_pb2.WorkerCommand:
    """The ``WorkerCommand`` message of ``order``."""
    if order.kind == START:
        start = worker_pb2.WorkerStart(plan=order.plan, job_spec_yaml=order.job_spec_yaml, node_id=order.node_id)
        return worker_pb2.WorkerCommand(generation=order.generation, start=start)
    if order.kind == RECONFIGURE:
        reconfigure = worker_pb2.WorkerReconfigure(plan=order.plan)
        return worker_pb2.WorkerCommand(generation=order.generation, reconfigure=reconfigure)
    return worker_pb2.WorkerCommand(generation=order.generation, stop=worker_pb2.WorkerStop(reason=order.reason))


class WorkerServicer(worker_pb2_grpc.WorkerServiceServicer):
    def __init__(self, agent: Agent) -> None:
        self._agent = agent

    async def Attach(self, request: worker_pb2.AttachRequest, context: grpc.aio.ServicerContext):
        try:
            worker = self._agent.worker_for_attach(request.slot, request.pid)
        except LookupError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
            return
        # Streams until the worker goes away (the call is cancelled) or the agent stops.
        while True:
            yield order_message(await worker.commands.get())

    async def Heartbeat(self, request, context):
        self._agent.on_worker_heartbeat(request.slot)
        return worker_pb2.WorkerHeartbeatResponse()

    async def ReportStep(self, request, context):
        self._agent.on_worker_step(
            StepReport(
                slot=request.slot,
                generation=request.generation,
                step=request.step,
                loss=request.loss,
                samples_per_s=request.samples_per_s,
                samples=request.samples,
            )
        )
        return worker_pb2.ReportStepResponse()

    async def ReportReady(self, request, context):
        step = request.step if request.HasField("step") else None
        self._agent.on_worker_ready(
            ReadyReport(request.slot, request.generation, request.regroup_s, request.copy_s, step)
        )
        return worker_pb2.ReportReadyResponse()

    async def ReportError(self, request, context):
        self._agent.on_worker_error(request.slot, request.generation, request.message, request.fatal)
        return worker_pb2.ReportErrorResponse()


async def start_server(agent: Agent, socket_path: str) -> grpc.aio.Server:
    """Serve the WorkerService on ``socket_path`` (an absolute path); returns the started server."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
    )
    worker_pb2_grpc.add_WorkerServiceServicer_to_server(WorkerServicer(agent), server)
    if not server.add_insecure_port("unix:" + socket_path):
        raise OSError(f"cannot listen on the worker socket {socket_path!r}")
    await server.start()
    os.chmod(socket_path, 0o600)
    log.info("worker channel listening on %s", socket_path)
    return server
