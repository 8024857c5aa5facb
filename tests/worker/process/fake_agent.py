"""A stand-in agent for worker tests: the node side of the worker channel, no master.

One :class:`FakeNodeAgent` per node serves ``oobleck.v1.WorkerService`` on its own Unix socket
(a gRPC server on threads), queues commands per slot and records every report. Tests spawn real
``python -m oobleck.worker`` processes against it (:func:`spawn_worker`) and build plans with
:func:`plan_message`.
"""

from __future__ import annotations

import contextlib
import os
import queue
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent import futures
from pathlib import Path

import grpc

from oobleck.protos.v1 import plan_pb2, worker_pb2, worker_pb2_grpc

StepHook = Callable[[worker_pb2.ReportStepRequest], None]


class FakeNodeAgent(worker_pb2_grpc.WorkerServiceServicer):
    def __init__(self, socket_path: Path, node_id: int) -> None:
        self.socket_path = socket_path
        self.node_id = node_id
        self._queues: dict[int, queue.Queue] = {}
        self._cond = threading.Condition()
        self.steps: list[worker_pb2.ReportStepRequest] = []
        self.ready: list[worker_pb2.ReportReadyRequest] = []
        self.errors: list[worker_pb2.ReportErrorRequest] = []
        self.attached: set[int] = set()
        #: Called on the server thread before ReportStep returns (fault injection).
        self.on_step: StepHook | None = None
        self._server: grpc.Server | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        worker_pb2_grpc.add_WorkerServiceServicer_to_server(self, self._server)
        if not self._server.add_insecure_port("unix:" + str(self.socket_path)):
            raise OSError(f"cannot listen on {self.socket_path}")
        self._server.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=0).wait()

    # -- commands -------------------------------------------------------------------------------

    def _queue(self, slot: int) -> queue.Queue:
        with self._cond:
            return self._queues.setdefault(slot, queue.Queue())

    def send(self, slot: int, command: worker_pb2.WorkerCommand) -> None:
        self._queue(slot).put(command)

    def start_command(
        self, slot: int, generation: int, plan: plan_pb2.Plan, job_spec_yaml: str
    ) -> worker_pb2.WorkerCommand:
        cmd = worker_pb2.WorkerCommand(
            generation=generation,
            start=worker_pb2.WorkerStart(plan=plan, job_spec_yaml=job_spec_yaml, node_id=self.node_id),
        )
        self.send(slot, cmd)
        return cmd

    def reconfigure(self, slot: int, generation: int, plan: plan_pb2.Plan) -> None:
        self.send(
            slot,
            worker_pb2.WorkerCommand(generation=generation, reconfigure=worker_pb2.WorkerReconfigure(plan=plan)),
        )

    def stop_worker(self, slot: int, generation: int, reason: str = "test") -> None:
        self.send(slot, worker_pb2.WorkerCommand(generation=generation, stop=worker_pb2.WorkerStop(reason=reason)))

    # -- waiting --------------------------------------------------------------------------------

    def wait_for(self, predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"node {self.node_id}: timed out after {timeout_s}s waiting for {what}")
                self._cond.wait(left)

    def steps_of(self, slot: int) -> list[worker_pb2.ReportStepRequest]:
        with self._cond:
            return [r for r in self.steps if r.slot == slot]

    def max_step(self, slot: int) -> int:
        return max((r.step for r in self.steps_of(slot)), default=0)

    # -- WorkerService --------------------------------------------------------------------------

    def Attach(self, request, context):
        q = self._queue(request.slot)
        with self._cond:
            self.attached.add(request.slot)
            self._cond.notify_all()
        while context.is_active():
            try:
                yield q.get(timeout=0.1)  # wakes up to notice a cancelled stream
            except queue.Empty:
                continue

    def Heartbeat(self, request, context):
        return worker_pb2.WorkerHeartbeatResponse()

    def ReportStep(self, request, context):
        with self._cond:
            self.steps.append(request)
            self._cond.notify_all()
        hook = self.on_step
        if hook is not None:
            hook(request)
        return worker_pb2.ReportStepResponse()

    def ReportReady(self, request, context):
        with self._cond:
            self.ready.append(request)
            self._cond.notify_all()
        return worker_pb2.ReportReadyResponse()

    def ReportError(self, request, context):
        with self._cond:
            self.errors.append(request)
            self._cond.notify_all()
        return worker_pb2.ReportErrorResponse()


def plan_message(
    generation: int,
    pipelines: Sequence[tuple[Sequence[int], int]],
    templates: Mapping[int, Iterable[tuple[int, int, int, int]]],
    ranks: Mapping[int, Sequence[int]],
    store_port: int,
    *,
    resume_step: int = 0,
    restore_from_checkpoint: bool = False,
) -> plan_pb2.Plan:
    """``pipelines``: (node ids, microbatches); ``templates``: nodes -> stages (layer_start,
    layer_end, node_index, gpus); ``ranks``: node id -> ranks in slot order. Like the master's,
    every plan has a fresh rendezvous secret (workers key the store with it)."""
    return plan_pb2.Plan(
        generation=generation,
        templates=[
            plan_pb2.Template(
                num_nodes=n,
                stages=[plan_pb2.Stage(layer_start=a, layer_end=b, node_index=i, gpus=g) for a, b, i, g in stages],
            )
            for n, stages in sorted(templates.items())
        ],
        pipelines=[plan_pb2.Pipeline(node_ids=list(nodes), microbatches=m) for nodes, m in pipelines],
        ranks=[plan_pb2.NodeRanks(node_id=n, ranks=list(r)) for n, r in sorted(ranks.items())],
        rendezvous=plan_pb2.Endpoint(host="127.0.0.1", port=store_port, secret=secrets.token_hex(16)),
        resume_step=resume_step,
        world_size=sum(len(r) for r in ranks.values()),
        restore_from_checkpoint=restore_from_checkpoint,
    )


class WorkerProcesses:
    """Real worker processes; :meth:`stop_all` (SIGTERM, deadline, SIGKILL) is safe to call twice."""

    def __init__(self, work_dir: Path) -> None:
        self.work_dir = work_dir
        self.procs: dict[tuple[int, int], subprocess.Popen] = {}
        self.logs: dict[tuple[int, int], Path] = {}

    def spawn(
        self,
        agent: FakeNodeAgent,
        slot: int,
        env: Mapping[str, str] | None = None,
        argv: Sequence[str] = (sys.executable, "-m", "oobleck.worker"),
    ) -> subprocess.Popen:
        full = dict(os.environ)
        full.update(
            {
                "OOBLECK_AGENT_SOCKET": str(agent.socket_path),
                "OOBLECK_NODE_ID": str(agent.node_id),
                "OOBLECK_SLOT": str(slot),
                "OOBLECK_WORK_DIR": str(self.work_dir),
                "OOBLECK_AGENT_PID": str(os.getpid()),  # the test process is the parent
                "OOBLECK_WORKER_HEARTBEAT_INTERVAL_S": "0.5",
                "OOBLECK_WORKER_DEVICE": "cpu",
                "OOBLECK_COLLECTIVE_TIMEOUT_S": "30",
                "OOBLECK_RECONFIGURE_WAIT_S": "60",
                "OOBLECK_START_WAIT_S": "60",
            }
        )
        full.update(env or {})
        log_path = self.work_dir / f"worker-{agent.node_id}-{slot}.log"
        with log_path.open("wb") as out:
            proc = subprocess.Popen(
                list(argv),
                env=full,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs[(agent.node_id, slot)] = proc
        self.logs[(agent.node_id, slot)] = log_path
        return proc

    def log(self, node_id: int, slot: int = 0) -> str:
        return self.logs[(node_id, slot)].read_text(errors="replace")

    def all_logs(self) -> str:
        parts = [f"--- worker {key} ---\n{path.read_text(errors='replace')[-6000:]}" for key, path in self.logs.items()]
        return "\n".join(parts)

    def wait(self, node_id: int, slot: int = 0, timeout_s: float = 60) -> int:
        try:
            return self.procs[(node_id, slot)].wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"worker {(node_id, slot)} did not exit in {timeout_s}s\n{self.all_logs()}") from None

    def stop_all(self, timeout_s: float = 5.0) -> None:
        live = [p for p in self.procs.values() if p.poll() is None]
        for p in live:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for p in live:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
