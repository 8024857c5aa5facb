"""A real Oobleck cluster on this machine for end-to-end tests.

The real ``oobleck-master`` (with the C planner), one real ``oobleck-agent`` per node (one slot
each) and the real workers (``python -m oobleck.worker``, gloo on CPU) that the agents spawn. All
ports are 0 and read back from ready files. Every daemon runs in its own session; workers run in
sessions of their own too, so they are found through ``/proc`` (processes whose
``$OOBLECK_WORK_DIR`` is one of this cluster's node directories: this also finds workers whose
agent is gone). :meth:`Cluster.stop` stops everything (SIGTERM, one deadline, SIGKILL) and
returns the processes that were still there at the end (orphans): tests assert it is empty.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from support.waiting import poll_until

from oobleck.common import procs
from oobleck.common.files import write_secret
from oobleck.common.procs import wait_pid_gone
from oobleck.common.tls import sync_channel
from oobleck.protos.v1 import admin_pb2, admin_pb2_grpc

BIN = Path(sys.executable).parent
MASTER = BIN / "oobleck-master"
AGENT = BIN / "oobleck-agent"
AGENT_TOKEN = "e2e-agent-token-" + "a" * 24
ADMIN_TOKEN = "e2e-admin-token-" + "b" * 24
POLL_S = 0.02  # how often status and ready files are polled (waits always have a deadline)

#: Environment of the agents, inherited by their workers: short failure timeouts for tests.
WORKER_ENV = {
    "OOBLECK_COLLECTIVE_TIMEOUT_S": "60",
    "OOBLECK_RECONFIGURE_WAIT_S": "90",
    "OOBLECK_START_WAIT_S": "90",
    "OOBLECK_TORCH_THREADS": "1",
    "OOBLECK_WORKER_DEVICE": "cpu",
}


def processes_under(root: Path) -> dict[int, str]:
    """Live (not zombie) processes that belong to a cluster rooted at ``root``: their command line
    or their ``$OOBLECK_WORK_DIR`` names a path under it. ``pid -> command line``."""
    prefix = str(root)
    found = {}
    for pid in procs.pids():
        if pid == os.getpid():
            continue
        cmd = procs.cmdline(pid)
        work = procs.environ_var(pid, "OOBLECK_WORK_DIR") or ""
        if (prefix in cmd or work.startswith(prefix)) and procs.alive(pid):
            found[pid] = cmd
    return found


@dataclass
class Daemon:
    name: str
    proc: subprocess.Popen
    log: Path
    ready_file: Path
    work_dir: Path | None = None
    info: dict = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid


class Cluster:
    """A master and ``len(names)`` agents under ``root`` (see the module docstring)."""

    def __init__(self, root: Path, *, heartbeat_interval_s: float = 0.1, heartbeat_timeout_s: float = 1.0) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        write_secret(root / "agent.token", AGENT_TOKEN)
        write_secret(root / "admin.token", ADMIN_TOKEN)
        self.heartbeat_interval_s = heartbeat_interval_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.master_args: list[str] = []  # extra master flags, set before start()
        self.profile_dir: str | None = None  # where the master may read job specs' profiles
        self.master_prefix: list[str] = []  # a command the master runs under (e.g. unshare)
        self.state_file = root / "master.db"
        self.agent_args: list[str] = []  # extra agent flags, set before start()
        self.agent_env: dict[str, str] = {}  # extra environment of agents (and their workers)
        self.grpc_port = 0
        self.http_port = 0
        self.master: Daemon | None = None
        self.agents: dict[str, Daemon] = {}
        self._channel: grpc.Channel | None = None
        self.admin: admin_pb2_grpc.AdminServiceStub | None = None

    # -- start ------------------------------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Daemon:
        log = self.root / f"{name}.log"
        ready = self.root / f"{name}.ready.json"
        ready.unlink(missing_ok=True)
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [*argv, "--ready-file", str(ready)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env={**os.environ, **(env or {})},
            )
        return Daemon(name, proc, log, ready)

    def _wait_ready(self, daemon: Daemon, deadline: float) -> dict:
        while not daemon.ready_file.exists():
            if daemon.proc.poll() is not None:
                raise AssertionError(f"{daemon.name} exited with {daemon.proc.returncode}:\n{self.tail(daemon)}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{daemon.name} not ready in time:\n{self.tail(daemon)}")
            time.sleep(POLL_S)
        daemon.info = json.loads(daemon.ready_file.read_text())
        return daemon.info

    def start(self, nodes: int, timeout_s: float = 60.0) -> None:
        """Start the master, then ``nodes`` agents (node0, node1, ...); wait until all registered."""
        deadline = time.monotonic() + timeout_s
        self.start_master(deadline=deadline)
        for i in range(nodes):
            self.spawn_agent(f"node{i}")
        for daemon in self.agents.values():
            self._wait_ready(daemon, deadline)
        self.wait_nodes(lambda ns: len(ns) == nodes, f"{nodes} registered nodes", deadline - time.monotonic())

    def start_master(self, *, deadline: float | None = None) -> dict:
        """Start the master (again: on the port of its first life, so the agents' configured
        address still works, and on the same state file) and wait until it is ready."""
        deadline = deadline or time.monotonic() + 60
        self.master = self._spawn(
            "master",
            [
                *self.master_prefix,
                str(MASTER), "--listen", f"127.0.0.1:{self.grpc_port}", "--http-listen", f"127.0.0.1:{self.http_port}",
                "--state-file", str(self.state_file),
                "--token-file", str(self.root / "agent.token"), "--admin-token-file", str(self.root / "admin.token"),
                "--heartbeat-interval-s", str(self.heartbeat_interval_s),
                "--heartbeat-timeout-s", str(self.heartbeat_timeout_s),
                "--session-grace-s", "0.3", "--shutdown-grace-s", "2", *self.master_args,
                *(["--profile-dir", self.profile_dir] if self.profile_dir else []),
            ],
        )  # fmt: skip
        info = self._wait_ready(self.master, deadline)
        self.grpc_port, self.http_port = int(info["grpc_port"]), int(info.get("http_port") or 0)
        self.target = f"127.0.0.1:{self.grpc_port}"
        if self._channel is not None:
            self._channel.close()
        self._channel = sync_channel(self.target, token=ADMIN_TOKEN)
        self.admin = admin_pb2_grpc.AdminServiceStub(self._channel)
        return info

    def kill_master(self) -> None:
        """``kill -9`` of the master (its process group); agents and workers go on."""
        assert self.master is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.master.pid, signal.SIGKILL)
        self.master.proc.wait(timeout=10)

    def http_json(self, path: str) -> dict:
        """GET ``path`` on the master's HTTP port (loopback), parsed as JSON."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=5) as response:
            return json.loads(response.read())

    def spawn_agent(self, name: str) -> Daemon:
        """Start an agent (one slot) against the running master; :meth:`stop` stops it too."""
        work = self.root / name
        work.mkdir(exist_ok=True)
        daemon = self._spawn(
            name,
            [
                str(AGENT), "--master", self.target, "--token-file", str(self.root / "agent.token"),
                "--node-name", name, "--slots", "1", "--work-dir", str(work), "--stop-timeout-s", "5",
                *self.agent_args,
            ],
            env={**WORKER_ENV, **self.agent_env},
        )  # fmt: skip
        daemon.work_dir = work.resolve()
        self.agents[name] = daemon
        return daemon

    def add_agent(self, name: str, timeout_s: float = 30.0) -> dict:
        """A fresh node joining later: start its agent and wait until it is ready."""
        return self._wait_ready(self.spawn_agent(name), time.monotonic() + timeout_s)

    # -- admin ------------------------------------------------------------------------------------

    def status(self) -> admin_pb2.GetStatusResponse:
        return self.admin.GetStatus(admin_pb2.GetStatusRequest(), timeout=5)

    def nodes(self):
        return self.admin.ListNodes(admin_pb2.ListNodesRequest(), timeout=5).nodes

    def events(self) -> list:
        return list(self.admin.WatchEvents(admin_pb2.WatchEventsRequest(since_id=0), timeout=5))

    def submit(self, spec_yaml: str) -> str:
        return self.admin.SubmitJob(admin_pb2.SubmitJobRequest(job_spec_yaml=spec_yaml), timeout=30).job_id

    def wait_status(self, predicate, what: str, timeout_s: float = 90.0) -> admin_pb2.GetStatusResponse:
        """Poll GetStatus until ``predicate(status)``; fails early when the job ends otherwise."""

        def probe():
            status = self.status()
            if status.state in (admin_pb2.JOB_STATE_FAILED, admin_pb2.JOB_STATE_CANCELLED) and not predicate(status):
                raise AssertionError(f"job ended while waiting for {what}: {status}\n{self.logs()}")
            return (status,) if predicate(status) else None

        return self.wait(probe, what, timeout_s)[0]

    def wait(self, predicate, what: str, timeout_s: float = 60.0):
        """Poll ``predicate()`` until it returns something true (returned), with a deadline; the
        cluster's logs are in the failure."""
        try:
            return poll_until(predicate, what, timeout_s, POLL_S)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.logs()}") from None

    def wait_nodes(self, predicate, what: str, timeout_s: float = 60.0):
        return self.wait(lambda: (nodes,) if predicate(nodes := self.nodes()) else None, what, timeout_s)[0]

    def node_ids(self) -> dict[str, int]:
        return {n.name: n.node_id for n in self.nodes()}

    # -- processes --------------------------------------------------------------------------------

    def worker_pids(self, name: str) -> set[int]:
        """Live workers of node ``name`` (found by their ``$OOBLECK_WORK_DIR``)."""
        work = str(self.agents[name].work_dir)
        pids = set()
        for pid in processes_under(self.root):
            if procs.environ_var(pid, "OOBLECK_WORK_DIR") == work:
                pids.add(pid)
        return pids

    def wait_workers(self, names, timeout_s: float = 60.0) -> dict[str, int]:
        """The one worker pid of every node in ``names`` once each has exactly one."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = {name: self.worker_pids(name) for name in names}
            if all(len(p) == 1 for p in found.values()):
                return {name: next(iter(p)) for name, p in found.items()}
            if time.monotonic() > deadline:
                raise AssertionError(f"workers not found in time: {found}\n{self.logs()}")
            time.sleep(POLL_S)

    def kill_nodes(self, names) -> None:
        """``kill -9`` of each node: its agent's process group and its workers, back to back."""
        victims = []
        for name in names:
            agent = self.agents[name]
            victims.append((agent.pid, True))
            victims += [(pid, False) for pid in self.worker_pids(name)]
        for pid, group in victims:
            with contextlib.suppress(ProcessLookupError):
                if group:
                    os.killpg(pid, signal.SIGKILL)
                else:
                    os.kill(pid, signal.SIGKILL)
        for name in names:
            self.agents[name].proc.wait(timeout=10)
        for pid, _group in victims:
            assert wait_pid_gone(pid, 10), f"pid {pid} survived SIGKILL"

    # -- logs and shutdown ------------------------------------------------------------------------

    @staticmethod
    def tail(daemon: Daemon, limit: int = 6000) -> str:
        try:
            return daemon.log.read_bytes()[-limit:].decode("utf-8", "replace")
        except OSError:
            return ""

    def logs(self, limit: int = 3000) -> str:
        daemons = ([self.master] if self.master else []) + list(self.agents.values())
        return "\n".join(f"----- {d.name} -----\n{self.tail(d, limit)}" for d in daemons)

    def stop(self, timeout_s: float = 20.0) -> dict[int, str]:
        """Stop agents (they stop their workers), then the master: SIGTERM to each process group,
        one deadline, SIGKILL. Then SIGKILL whatever of this cluster is left, and return what was
        left (``pid -> command line``): orphans. Safe to call twice."""
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        for group in (list(self.agents.values()), [self.master] if self.master else []):
            live = [d for d in group if d.proc.poll() is None]
            for d in live:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(d.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            for d in live:
                try:
                    d.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(d.pid, signal.SIGKILL)
                    d.proc.wait(timeout=10)
        # Workers die with their agent (parent-death signal); give them a moment to go.
        deadline = time.monotonic() + 10
        left = processes_under(self.root)
        while left and time.monotonic() < deadline:
            time.sleep(POLL_S)
            left = processes_under(self.root)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return left
