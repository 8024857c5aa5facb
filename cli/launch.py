"""``oobleck-launch``: submit a job, or run a whole local cluster on this machine."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from oobleck.cli.admin import ENV_ADMIN_TOKEN_FILE, ENV_MASTER, add_master_flags, admin_channel, iter_nodes
from oobleck.common.cli import base_parser
from oobleck.common.logs import setup_logging
from oobleck.common.validate import ConfigError

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_JOB_FAILED = 1
EXIT_USAGE = 2
SUBMIT_TIMEOUT_S = 60.0  # the master answers at once (a job to profile answers PROFILING)

DESCRIPTION = """\
Launch an Oobleck training job and follow it to the end.

  oobleck-launch --local N --config JOB.yaml [--slots-per-node 1] [--work-dir DIR]
                 [--kill-node-at-step K [--kill-node ID]] [--worker-command CMD] [--json]
      Starts a master and N agents on this machine (loopback, port 0 everywhere, random tokens
      in 0600 files in the work dir), waits until every agent has registered, submits the job,
      prints a line per step (`step 12/200 loss 4.1234 samples/s 512.3 gen 1`, as often as
      --poll-s samples the master's status), each event and reconfiguration with its phases
      (detect, plan, notify, regroup, copy, resume), one JSON summary line at the end, and
      stops everything.
      Daemon logs: DIR/master.log, DIR/node<i>.log (DIR defaults to a fresh temporary
      directory, removed after a successful run).

  oobleck-launch --master HOST:PORT --token-file ADMIN_TOKEN --config JOB.yaml [TLS flags]
      Submits to a running master and follows the job the same way. Ctrl-C stops following;
      the job keeps running (`oobleckctl cancel` stops it).

Profile: the master plans from the per-layer profile that the job spec's `profile:` names
(a path readable by the master; relative paths are taken relative to the job spec's folder).
When the spec names none, the master has the model profiled on the first node (its agent runs
the profiler on that node's device) and caches the result next to its state file, so only the
first submission of a model configuration waits for the measurement.

--kill-node-at-step K: fault injection for demos. Once the job reports step >= K, one node
(--kill-node ID, default: the last node of the plan) is killed: with --local its agent and
workers get SIGKILL, otherwise the master's KillNode fault drill is used.

Exit status: 0 the job succeeded; 1 it failed or was cancelled (or the cluster broke, or the
master was unreachable); 2 usage or configuration error (bad flag, job spec or token: nothing is
started, or the master rejected the job); 130 / 143 interrupted by Ctrl-C / SIGTERM
(everything started is stopped first).
"""


class UsageError(Exception):
    """A bad flag or job spec; printed as one line, exit status 2."""


class Interrupted(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def build_parser() -> argparse.ArgumentParser:
    p = base_parser("oobleck-launch", DESCRIPTION)
    p.add_argument("--config", metavar="JOB.yaml", help="the job spec (required)")
    mode = p.add_argument_group("local cluster")
    mode.add_argument("--local", type=int, metavar="N", help="start a master and N agents on this machine")
    mode.add_argument("--slots-per-node", type=int, default=1, metavar="S", help="workers per agent (default 1)")
    mode.add_argument("--work-dir", metavar="DIR", help="daemon logs, tokens, state (default: a temp dir)")
    mode.add_argument(
        "--worker-command", metavar="CMD", default="", help='worker command line (default: "python -m oobleck.worker")'
    )
    remote = p.add_argument_group("running master")
    add_master_flags(remote)
    g = p.add_argument_group("following and faults")
    g.add_argument("--kill-node-at-step", type=int, metavar="K", help="kill one node once step >= K")
    g.add_argument("--kill-node", type=int, metavar="ID", help="node id to kill (default: last node of the plan)")
    g.add_argument("--json", action="store_true", help="progress lines as JSON objects too")
    g.add_argument("--poll-s", type=float, default=0.2, metavar="S", help="status poll period (default 0.2)")
    g.add_argument("--timeout-s", type=float, default=0.0, metavar="S", help="give up after S seconds (0: never)")
    return p


# -- job spec and profile --------------------------------------------------------------------------
def load_spec(path: str) -> tuple[Any, dict[str, Any]]:
    """Validate the job spec (model config included); returns (JobSpec, the YAML mapping).

    A relative ``profile:`` is made absolute (relative to the spec's folder). Raises ConfigError.
    """
    from oobleck.common.jobspec import job_spec_from_dict, load_job_spec
    from oobleck.common.modelconfig import validate_model_config

    spec = load_job_spec(path)
    try:
        validate_model_config(spec)
    except ConfigError as exc:
        raise ConfigError(exc.field, f"{exc.problem} (in {path})") from None
    raw = dict(yaml.safe_load(Path(path).read_text()))
    if spec.profile is not None and not os.path.isabs(spec.profile):
        raw["profile"] = str((Path(path).resolve().parent / spec.profile).resolve())
        spec = job_spec_from_dict(raw)
    return spec, raw


# -- argument checks --------------------------------------------------------------------------------
def check_args(args: argparse.Namespace) -> None:
    if not args.config:
        raise UsageError("--config: required (the job spec YAML)")
    if args.local is not None and args.master:
        raise UsageError("--local and --master: give one of them")
    if args.local is None:
        args.master = args.master or os.environ.get(ENV_MASTER)
        if not args.master:
            raise UsageError(f"--master: required without --local (or set ${ENV_MASTER})")
        args.token_file = args.token_file or os.environ.get(ENV_ADMIN_TOKEN_FILE)
        if not args.token_file:
            raise UsageError(f"--token-file: required with --master (or set ${ENV_ADMIN_TOKEN_FILE})")
        for flag in ("work_dir", "worker_command"):
            if getattr(args, flag):
                raise UsageError(f"--{flag.replace('_', '-')}: only with --local")
    else:
        if not 1 <= args.local <= 64:
            raise UsageError(f"--local: node count must be 1..64, got {args.local}")
        if not 1 <= args.slots_per_node <= 64:
            raise UsageError(f"--slots-per-node: must be 1..64, got {args.slots_per_node}")
        if args.worker_command:
            try:
                if not shlex.split(args.worker_command):
                    raise ValueError("empty")
            except ValueError as exc:
                raise UsageError(f"--worker-command: cannot split {args.worker_command!r}: {exc}") from None
    if args.kill_node is not None and args.kill_node_at_step is None:
        raise UsageError("--kill-node: needs --kill-node-at-step")
    if args.kill_node_at_step is not None and args.kill_node_at_step < 1:
        raise UsageError(f"--kill-node-at-step: must be >= 1, got {args.kill_node_at_step}")
    if not 0.01 <= args.poll_s <= 60:
        raise UsageError(f"--poll-s: must be in 0.01..60, got {args.poll_s}")
    if args.timeout_s < 0:
        raise UsageError(f"--timeout-s: must be >= 0, got {args.timeout_s}")


# -- the run ------------------------------------------------------------------------------------------
def _raise_interrupted(signum, _frame) -> None:
    raise Interrupted(signum)


def _wait_registered(stub, count: int, timeout_s: float) -> None:
    from oobleck.protos.v1 import admin_pb2

    deadline = time.monotonic() + timeout_s
    while True:
        nodes = list(iter_nodes(stub, admin_pb2, 10))
        live = [n for n in nodes if n.state in (admin_pb2.NODE_STATE_ALIVE, admin_pb2.NODE_STATE_SPARE)]
        if len(live) >= count:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(live)} of {count} agents registered within {timeout_s:g}s")
        time.sleep(0.05)  # a few polls at most: the agents' ready files already said they registered


class Launch:
    """One ``oobleck-launch`` run; :meth:`run` returns the exit status."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.t0 = time.monotonic()
        self.cluster = None
        self.channel = None
        self.follower = None
        self.work_dir: Path | None = None
        self._own_work_dir = False
        self.job_id = ""

    def _print(self, text: str) -> None:
        if not self.args.json:
            print(text, flush=True)

    def run(self) -> int:
        args = self.args
        spec, raw = load_spec(args.config)  # ConfigError -> exit 2 before anything starts
        if args.local is not None:
            from oobleck.cli.local_cluster import LocalCluster, LocalClusterConfig

            if args.work_dir:
                self.work_dir = Path(args.work_dir).resolve()
                self.work_dir.mkdir(parents=True, exist_ok=True)
            else:
                self.work_dir = Path(tempfile.mkdtemp(prefix="oobleck-launch-"))
                self._own_work_dir = True
            self.cluster = LocalCluster(
                LocalClusterConfig(
                    nodes=args.local,
                    work_dir=self.work_dir,
                    slots_per_node=args.slots_per_node,
                    worker_command=args.worker_command,
                    log_level=args.log_level,
                    # The spec's profile (made absolute by load_spec) is where the master may read it.
                    profile_dir=str(Path(raw["profile"]).parent) if raw.get("profile") else "",
                )
            )
            self._print(f"local cluster: master + {args.local} agents x {args.slots_per_node} slots in {self.work_dir}")
            self.cluster.start_master()
            target = self.cluster.wait_master()
            self.cluster.start_agents()
            self.cluster.wait_agents()
            self.channel, stub = admin_channel(target, str(self.cluster.admin_token_file))
            _wait_registered(stub, args.local, 30.0)
            self._print(f"master {target} (http {self.cluster.http_port}); {args.local} agents registered")
        else:
            self.channel, stub = admin_channel(args.master, args.token_file, args)
        if spec.profile is None:
            self._print("profile: measured by the master on the first node (or taken from its cache)")
        return self._submit_and_follow(stub, yaml.safe_dump(raw, sort_keys=False), spec)

    def _submit_and_follow(self, stub, spec_yaml: str, spec) -> int:
        import grpc

        from oobleck.cli.follow import FaultPlan, Follower, existing_event_id
        from oobleck.protos.v1 import admin_pb2

        args = self.args
        if self.work_dir is not None:
            (self.work_dir / "job.yaml").write_text(spec_yaml)
        since = existing_event_id(stub)
        try:
            res = stub.SubmitJob(admin_pb2.SubmitJobRequest(job_spec_yaml=spec_yaml), timeout=SUBMIT_TIMEOUT_S)
        except grpc.RpcError as exc:
            if exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION):
                raise UsageError(f"the master rejected the job: {' '.join((exc.details() or '').split())}") from None
            raise
        self.job_id = res.job_id
        self._print(f"submitted job {res.job_id} ({spec.name}, {spec.steps} steps, ft={spec.ft})")
        fault = None
        if args.kill_node_at_step is not None:
            kill = self.cluster.kill_node if self.cluster is not None else self._kill_by_rpc(stub)
            fault = FaultPlan(args.kill_node_at_step, args.kill_node, kill)
        self.follower = Follower(
            stub,
            res.job_id,
            since_id=since,
            poll_s=args.poll_s,
            json_lines=args.json,
            fault=fault,
            check=self.cluster.check_alive if self.cluster is not None else None,
            timeout_s=args.timeout_s,
        )
        status = self.follower.run()
        state = admin_pb2.JobState.Name(status.state).removeprefix("JOB_STATE_")
        self._print_summary(state)
        return EXIT_OK if state == "SUCCEEDED" else EXIT_JOB_FAILED

    @staticmethod
    def _kill_by_rpc(stub):
        from oobleck.protos.v1 import admin_pb2

        def kill(node_id: int) -> list[int]:
            stub.KillNode(admin_pb2.KillNodeRequest(node_id=node_id), timeout=10)
            return []

        return kill

    def _print_summary(self, state: str | None = None, error: str | None = None) -> None:
        if self.follower is None:
            return
        extra: dict[str, Any] = {}
        if self.work_dir is not None:
            extra["work_dir"] = str(self.work_dir)
        if error:
            extra["error"] = error
        summary = self.follower.summary(state=state, wall_s=time.monotonic() - self.t0, extra=extra)
        print(json.dumps(summary, sort_keys=True), flush=True)

    def close(self, ok: bool) -> None:
        """Stop the local cluster (if any) and close the channel; keeps the work dir unless ok."""
        if self.channel is not None:
            with contextlib.suppress(Exception):
                self.channel.close()
        if self.cluster is not None:
            self.cluster.stop()
            if self._own_work_dir and ok and self.work_dir is not None:
                shutil.rmtree(self.work_dir, ignore_errors=True)
            elif self.work_dir is not None and not ok:
                print(f"oobleck-launch: logs kept in {self.work_dir}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        setup_logging(args.log_level)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        check_args(args)
    except UsageError as exc:
        print(f"oobleck-launch: {exc}", file=sys.stderr)
        return EXIT_USAGE

    import grpc

    from oobleck.cli.follow import FollowError
    from oobleck.cli.local_cluster import ClusterError
    from oobleck.common.auth import TokenFileError
    from oobleck.common.tls import InsecureTransportError, TlsConfigError

    old = {sig: signal.signal(sig, _raise_interrupted) for sig in (signal.SIGINT, signal.SIGTERM)}
    launch = Launch(args)
    rc = EXIT_JOB_FAILED
    try:
        rc = launch.run()
    except (UsageError, ConfigError, TokenFileError, TlsConfigError, InsecureTransportError) as exc:
        print(f"oobleck-launch: {' '.join(str(exc).split())}", file=sys.stderr)
        rc = EXIT_USAGE
    except Interrupted as exc:
        print(f"oobleck-launch: interrupted ({exc}); stopping", file=sys.stderr)
        launch._print_summary("INTERRUPTED")
        if args.local is None and launch.job_id:
            print(f"oobleck-launch: job {launch.job_id} keeps running on the master", file=sys.stderr)
        rc = 128 + exc.signum  # 130 for Ctrl-C, 143 for SIGTERM
    except grpc.RpcError as exc:
        code = exc.code().name if exc.code() else "UNKNOWN"
        print(f"oobleck-launch: {code}: {' '.join((exc.details() or '').split())}", file=sys.stderr)
        launch._print_summary("ERROR", f"{code}: {exc.details()}")
        if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            rc = EXIT_USAGE  # a wrong token file is a configuration error
    except (ClusterError, FollowError, RuntimeError, OSError) as exc:
        print(f"oobleck-launch: {exc}", file=sys.stderr)
        launch._print_summary("ERROR", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    finally:
        # A second Ctrl-C must not cut the teardown short (it is bounded by deadlines).
        for sig in old:
            signal.signal(sig, signal.SIG_IGN)
        try:
            launch.close(ok=rc == EXIT_OK)
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
    return rc


if __name__ == "__main__":
    sys.exit(main())
