"""The agent's side of the worker channel: a ``grpc.aio`` WorkerService on a Unix socket.

The servicer only records facts on the agent (heartbeat times, reports) and streams each
worker's command queue to it; decisions stay in :mod:`oobleck.agent.daemon`. The socket file
is made private to the agent's user (mode 0600).
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import grpc

from oobleck.protos.v1 import worker_pb2, worker_pb2_grpc

if TYPE_CHECKING:
    from oobleck.agent.daemon import Agent

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # plans for large clusters travel here


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
            yield await worker.commands.get()

    async def Heartbeat(self, request, context):
        self._agent.on_worker_heartbeat(request.slot)
        return worker_pb2.WorkerHeartbeatResponse()

    async def ReportStep(self, request, context):
        self._agent.on_worker_step(request)
        return worker_pb2.ReportStepResponse()

    async def ReportReady(self, request, context):
        self._agent.on_worker_ready(request)
        return worker_pb2.ReportReadyResponse()

    async def ReportError(self, request, context):
        self._agent.on_worker_error(request)
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
