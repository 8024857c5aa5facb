"""A whole Oobleck cluster on this machine: one master and N agents over loopback (``oobleck-launch --local``).

Every daemon runs in its own session (``start_new_session=True``) with its log in the work dir;
ports are all 0 and read back from the daemons' ready files. Tokens are random, written to 0600
files. :meth:`LocalCluster.stop` stops agents first (SIGTERM to the process group: the agent stops
its workers), then the master; one monotonic deadline each, then SIGKILL; finally any worker
still carrying one of our work dirs in ``$OOBLECK_WORK_DIR`` is SIGKILLed. Safe to call twice.

:meth:`LocalCluster.kill_node` is the demo's fault injection: SIGKILL of an agent's process group
and of every worker it spawned (workers run in their own sessions, so they are found through
``/proc``: children of the agent, and processes whose ``OOBLECK_WORK_DIR`` is the agent's).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from oobleck.common import procs
from oobleck.common.files import write_secret
from oobleck.common.procs import wait_pid_gone

log = logging.getLogger(__name__)

#: How often ready files are looked for while a daemon starts (not a busy loop).
READY_POLL_S = 0.05
ENV_WORK_DIR = "OOBLECK_WORK_DIR"


class ClusterError(RuntimeError):
    """A daemon failed to start or died; the message names it and quotes its log's tail."""


def log_tail(path: Path, limit: int = 2000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-limit:].decode("utf-8", "replace")


def worker_pids(agent_pid: int | None, work_dirs: set[str]) -> set[int]:
    """Pids of workers that belong to an agent: its children, and processes whose
    ``$OOBLECK_WORK_DIR`` is one of ``work_dirs`` (this also finds workers of a dead agent)."""
    found: set[int] = set()
    me = os.getpid()
    for pid in procs.pids():
        if pid in (me, agent_pid):
            continue
        child = agent_pid is not None and procs.parent(pid) == agent_pid
        if child or (work_dirs and procs.environ_var(pid, ENV_WORK_DIR) in work_dirs):
            found.add(pid)
    return found


def _kill_group_and_pid(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


@dataclass
class Daemon:
    """One started daemon: its process (own session), ready file and log."""

    name: str
    proc: subprocess.Popen
    ready_file: Path
    log_path: Path
    work_dir: Path | None = None
    info: dict = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def read_ready(self) -> dict | None:
        try:
            return json.loads(self.ready_file.read_text())
        except (OSError, ValueError):
            return None

    def died_error(self) -> ClusterError:
        return ClusterError(
            f"{self.name} exited with status {self.proc.returncode}; last lines of {self.log_path}:\n"
            f"{log_tail(self.log_path).rstrip()}"
        )


@dataclass(frozen=True)
class LocalClusterConfig:
    nodes: int
    work_dir: Path
    slots_per_node: int = 1
    worker_command: str = ""  # "": the agent's default (python -m oobleck.worker)
    python: str = sys.executable
    log_level: str | None = None
    ready_timeout_s: float = 60.0
    stop_timeout_s: float = 15.0
    agent_stop_timeout_s: float = 5.0  # the agent's own SIGTERM -> SIGKILL deadline for workers
    profile_dir: str = ""  # where the master may read a job spec's `profile:` (default: its state dir)

    def __post_init__(self) -> None:
        if not isinstance(self.nodes, int) or not 1 <= self.nodes <= 64:
            raise ValueError(f"--local: node count must be 1..64, got {self.nodes!r}")
        if not isinstance(self.slots_per_node, int) or not 1 <= self.slots_per_node <= 64:
            raise ValueError(f"--slots-per-node: must be 1..64, got {self.slots_per_node!r}")


class LocalCluster:
    """Start, inspect, fault-inject and stop a master and ``nodes`` agents on loopback."""

    def __init__(self, config: LocalClusterConfig) -> None:
        self.config = config
        self.work_dir = Path(config.work_dir).resolve()
        self.master: Daemon | None = None
        self.agents: list[Daemon] = []
        self.master_target = ""
        self.http_port = 0
        self.admin_token_file = self.work_dir / "admin.token"
        self.agent_token_file = self.work_dir / "agent.token"
        self._master_argv: list[str] = []
        self._stopped = False

    # -- start ---------------------------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str], ready_file: Path, work_dir: Path | None = None) -> Daemon:
        log_path = self.work_dir / f"{name}.log"
        ready_file.unlink(missing_ok=True)
        if self.config.log_level:
            argv = [*argv, "--log-level", self.config.log_level]
        with log_path.open("ab") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )
        log.debug("started %s (pid %d): %s", name, proc.pid, " ".join(argv))
        return Daemon(name, proc, ready_file, log_path, work_dir)

    def start_master(self) -> None:
        """Generate tokens and start the master (returns at once; see :meth:`wait_master`)."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        write_secret(self.agent_token_file, secrets.token_urlsafe(32))
        write_secret(self.admin_token_file, secrets.token_urlsafe(32))
        state = self.work_dir / "master.db"
        for suffix in ("", "-wal", "-shm"):  # a fresh job state for every run
            Path(f"{state}{suffix}").unlink(missing_ok=True)
        self._master_argv = [
            self.config.python, "-m", "oobleck.master.main",
            "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0",
            "--state-file", str(state),
            "--token-file", str(self.agent_token_file),
            "--admin-token-file", str(self.admin_token_file),
            "--ready-file", str(self.work_dir / "master.ready.json"),
        ]  # fmt: skip
        if self.config.profile_dir:
            self._master_argv += ["--profile-dir", self.config.profile_dir]
        self.master = self._spawn("master", self._master_argv, self.work_dir / "master.ready.json")

    def kill_master(self) -> None:
        """SIGKILL the master (a crash); agents and workers go on. See :meth:`restart_master`."""
        assert self.master is not None
        _kill_group_and_pid(self.master.pid, signal.SIGKILL)
        self.master.proc.wait(timeout=10)

    def restart_master(self) -> str:
        """Start the master again on the same state file and ports (the agents' configured
        address); returns at once, see :meth:`wait_master`."""
        assert self.master is not None and self.master_target, "start_master() and wait_master() first"
        if self.master.alive():
            raise ClusterError(f"the master (pid {self.master.pid}) is still running")
        argv = list(self._master_argv)
        argv[argv.index("--listen") + 1] = self.master_target
        argv[argv.index("--http-listen") + 1] = f"127.0.0.1:{self.http_port}"
        self.master = self._spawn("master", argv, self.work_dir / "master.ready.json")
        return self.master_target

    def _wait_ready(self, daemon: Daemon, deadline: float) -> dict:
        while True:
            info = daemon.read_ready()
            if info is not None:
                daemon.info = info
                return info
            if not daemon.alive():
                raise daemon.died_error()
            if time.monotonic() >= deadline:
                raise ClusterError(
                    f"{daemon.name} not ready within {self.config.ready_timeout_s:g}s; last lines of "
                    f"{daemon.log_path}:\n{log_tail(daemon.log_path).rstrip()}"
                )
            wait_pid_gone(daemon.pid, READY_POLL_S)  # wakes early if it dies

    def wait_master(self) -> str:
        assert self.master is not None
        info = self._wait_ready(self.master, time.monotonic() + self.config.ready_timeout_s)
        self.master_target = f"127.0.0.1:{int(info['grpc_port'])}"
        self.http_port = int(info.get("http_port") or 0)
        return self.master_target

    def start_agents(self) -> None:
        """Start the agents against the (ready) master; returns at once, see :meth:`wait_agents`."""
        assert self.master_target, "wait_master() first"
        for i in range(self.config.nodes):
            self.agents.append(self._spawn_agent(f"node{i}"))

    def _spawn_agent(self, name: str) -> Daemon:
        work = self.work_dir / name
        ready = self.work_dir / f"{name}.ready.json"
        argv = [
            self.config.python, "-m", "oobleck.agent.main",
            "--master", self.master_target,
            "--token-file", str(self.agent_token_file),
            "--node-name", name,
            "--slots", str(self.config.slots_per_node),
            "--work-dir", str(work),
            "--stop-timeout-s", str(self.config.agent_stop_timeout_s),
            "--ready-file", str(ready),
        ]  # fmt: skip
        if self.config.worker_command:
            argv += ["--worker-command", self.config.worker_command]
        return self._spawn(name, argv, ready, work)

    def restart_agent(self, name: str) -> Daemon:
        """Start node ``name``'s agent again after it died (a node coming back): it registers anew,
        under a new node id, and joins as a spare. Returns at once; its ready file names the id."""
        old = next((a for a in self.agents if a.name == name), None)
        if old is None:
            raise ClusterError(f"no local agent is called {name!r}")
        if old.alive():
            raise ClusterError(f"{name}'s agent (pid {old.pid}) is still running")
        new = self._spawn_agent(name)
        self.agents[self.agents.index(old)] = new
        return new

    def wait_agent(self, daemon: Daemon) -> dict:
        """Wait until one (re)started agent has registered; returns its ready-file contents."""
        return self._wait_ready(daemon, time.monotonic() + self.config.ready_timeout_s)

    def wait_agents(self) -> dict[int, Daemon]:
        """Wait until every agent has registered (its ready file carries its node id)."""
        deadline = time.monotonic() + self.config.ready_timeout_s
        for agent in self.agents:
            self._wait_ready(agent, deadline)
        return self.nodes()

    # -- inspect --------------------------------------------------------------------------------
    def nodes(self) -> dict[int, Daemon]:
        """node id -> agent (node ids from the agents' ready files, re-read: they may re-register)."""
        out = {}
        for agent in self.agents:
            info = agent.read_ready() or agent.info
            if info.get("node_id"):
                agent.info = info
                out[int(info["node_id"])] = agent
        return out

    def check_alive(self) -> None:
        """Raise :class:`ClusterError` if the master died (agents may die: that is a node failure)."""
        if self.master is not None and not self.master.alive() and not self._stopped:
            raise self.master.died_error()

    def all_pids(self) -> set[int]:
        """Every live process of the cluster: master, agents and their workers."""
        pids = {d.pid for d in [self.master, *self.agents] if d is not None and d.alive()}
        for agent in self.agents:
            pids |= worker_pids(agent.pid if agent.alive() else None, {str(agent.work_dir)})
        return pids

    # -- fault injection ---------------------------------------------------------------------------
    def kill_node(self, node_id: int) -> list[int]:
        """SIGKILL node ``node_id``'s agent (its process group) and all its workers; returns the pids."""
        agent = self.nodes().get(node_id)
        if agent is None:
            raise ClusterError(f"--kill-node: no local agent has node id {node_id} (known: {sorted(self.nodes())})")
        # Stop the agent first so that it cannot spawn or restart anything while we look.
        with contextlib.suppress(ProcessLookupError):
            os.kill(agent.pid, signal.SIGSTOP)
        workers = worker_pids(agent.pid, {str(agent.work_dir)})
        _kill_group_and_pid(agent.pid, signal.SIGKILL)
        for pid in workers:
            _kill_group_and_pid(pid, signal.SIGKILL)
        agent.proc.wait(timeout=10)
        for pid in workers:
            wait_pid_gone(pid, 5.0)
        log.info("killed node %d: agent pid %d, workers %s", node_id, agent.pid, sorted(workers))
        return [agent.pid, *sorted(workers)]

    def freeze_node(self, node_id: int) -> list[int]:
        """SIGSTOP node ``node_id``'s agent and workers (a frozen machine: sockets stay open);
        returns the pids, for :meth:`thaw`."""
        agent = self.nodes().get(node_id)
        if agent is None:
            raise ClusterError(f"no local agent has node id {node_id} (known: {sorted(self.nodes())})")
        pids = [agent.pid, *sorted(worker_pids(agent.pid, {str(agent.work_dir)}))]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        log.info("froze node %d: pids %s", node_id, pids)
        return pids

    @staticmethod
    def thaw(pids: list[int]) -> None:
        """SIGCONT processes :meth:`freeze_node` stopped (those still there)."""
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    # -- stop ------------------------------------------------------------------------------------
    def _stop_daemons(self, daemons: list[Daemon]) -> None:
        live = [d for d in daemons if d.alive()]
        for d in live:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(d.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.config.stop_timeout_s
        for d in live:
            try:
                d.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) ignored SIGTERM for %gs: SIGKILL", d.name, d.pid, self.config.stop_timeout_s)
                _kill_group_and_pid(d.pid, signal.SIGKILL)
                d.proc.wait(timeout=10)
        for d in daemons:  # the group may outlive its leader
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(d.pid, signal.SIGKILL)

    def stop(self) -> None:
        """Stop agents (and so their workers), then the master; SIGKILL whatever is left. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        work_dirs = {str(a.work_dir) for a in self.agents}
        self._stop_daemons(self.agents)
        leftovers = worker_pids(None, work_dirs)
        for pid in leftovers:
            log.warning("worker pid %d outlived its agent: SIGKILL", pid)
            _kill_group_and_pid(pid, signal.SIGKILL)
        for pid in leftovers:
            wait_pid_gone(pid, 5.0)
        if self.master is not None:
            self._stop_daemons([self.master])
