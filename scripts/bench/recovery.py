"""Recovery time: Oobleck's in-place reconfiguration vs a checkpoint-restart baseline.

One local cluster (the real master, agents and CPU workers of ``oobleck-launch --local``), one
job (the ``examples/demo.yaml`` tiny GPT, ft=1, min_nodes 2, checkpoints every
``--checkpoint-interval`` steps into a temp dir), two faults in the same run:

1. **Oobleck**: at step ``--kill-at`` one node (the last node of the plan) is SIGKILLed with its
   worker (``LocalCluster.kill_node``). The master detects it, re-plans from the templates
   (5 nodes as 2 + 3 -> 4 nodes as 2 + 2), survivors copy the missing layers and go on.
   Measured: kill -> first step event of the new generation, plus the master's phases
   (detect, plan, notify, regroup, copy, resume) from its events.
2. **Checkpoint restart** (what Varuna / torchrun elastic do): at step ``--baseline-at`` every
   remaining agent and worker is SIGKILLed (the whole job is torn down, as a restart-based system
   does on a failure). The master detects the loss, cannot plan on zero nodes and pauses the
   job; fresh agents (new processes, same count as after step 1, so the same 2 + 2 layout) then
   register, and the master restarts the job from the latest checkpoint
   (``restore_from_checkpoint``: new workers, new process groups, checkpoint load, roll back to
   the checkpointed step). Measured: kill -> first step completed after the restore (the
   earliest "gen N: step K" line in the fresh workers' logs: the master publishes only steps past
   the highest it has seen, so the repeated steps do not appear in its events), with and without
   the detection part (kill -> the master's ``job_paused`` event); also kill -> first step past
   the kill step (the rolled-back steps recomputed).

Times are the master's event timestamps (``unix_time_s``) and the workers' log timestamps (ms),
on the same host clock as the kill.
A fresh submit does not restore from a checkpoint (its plan starts at step 0), so the baseline
uses the master's paused-job path, the supported way to restart a job from its checkpoint.

Usage: python scripts/bench/recovery.py [--nodes 5] [--kill-at 40] [--baseline-at 110]
       [--checkpoint-interval 20] [--timeout-s 300] [--keep]

The last line printed is one JSON object:
{"recovery_s", "detect_s", "restart_baseline_s", "ratio", ...} with
ratio = (recovery_s - detect_s) / restart_baseline_s. Not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from oobleck.cli.admin import admin_channel
from oobleck.cli.follow import PHASES, EventStream, existing_event_id, last_plan_node
from oobleck.cli.launch import _wait_registered, load_spec
from oobleck.cli.local_cluster import LocalCluster, LocalClusterConfig
from oobleck.protos.v1 import admin_pb2

ROOT = Path(__file__).resolve().parents[2]
DEMO_SPEC = ROOT / "examples" / "demo.yaml"


class BenchError(RuntimeError):
    pass


@dataclass(frozen=True)
class Seen:
    """One master event and its time (master's clock; receipt time if it carries none)."""

    t: float
    ev: admin_pb2.Event


class EventLog:
    """Every master event (step events included) from ``since_id`` on, read on a thread."""

    def __init__(self, stub, since_id: int) -> None:
        self.events: list[Seen] = []
        self._cond = threading.Condition()
        self._stream = EventStream(stub, since_id, self._append, retry_s=0.2)

    def start(self) -> None:
        self._stream.start()

    def _append(self, ev: admin_pb2.Event) -> None:
        with self._cond:
            self.events.append(Seen(ev.unix_time_s or time.time(), ev))
            self._cond.notify_all()

    def stop(self) -> None:
        self._stream.stop()

    def wait(self, pred: Callable[[admin_pb2.Event], bool], what: str, timeout_s: float, check=None) -> Seen:
        """The first event (oldest first) matching ``pred``; BenchError at the deadline."""
        deadline = time.monotonic() + timeout_s
        start = 0
        with self._cond:
            while True:
                for seen in self.events[start:]:
                    if pred(seen.ev):
                        return seen
                start = len(self.events)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BenchError(f"timed out after {timeout_s:g}s waiting for {what}")
                self._cond.wait(min(left, 0.5))
                if check is not None:
                    check()

    def matching(self, pred: Callable[[admin_pb2.Event], bool]) -> list[Seen]:
        with self._cond:
            return [s for s in self.events if pred(s.ev)]


def is_step(ev, *, min_step: int = 0, after_generation: int = -1) -> bool:
    return ev.kind == "step" and ev.step >= min_step and ev.generation > after_generation


#: A worker's per-step log line: "2026-11-23 16:20:37,314 INFO oobleck.worker.run: node 6 slot 0 rank 0
#: gen 3: step 81/2000 loss ...".
STEP_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) .* gen (\d+): step (\d+)/\d+ loss ")


def first_logged_step(log_files: list[Path], generation: int) -> tuple[float, int] | None:
    """(unix time, step) of the earliest step line of ``generation`` in the workers' logs.

    The master publishes a step only once it passes the job's highest step, so the steps that
    a restart from a checkpoint repeats are seen only in the workers' logs (local time, ms).
    """
    best: tuple[float, int] | None = None
    for path in log_files:
        with contextlib.suppress(OSError), path.open(errors="replace") as f:
            for line in f:
                m = STEP_LINE.match(line)
                if m and int(m.group(3)) == generation:
                    t = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1000
                    if best is None or t < best[0]:
                        best = (t, int(m.group(4)))
                    break
    return best


def write_spec(work: Path, steps: int, interval: int) -> Path:
    raw = yaml.safe_load(DEMO_SPEC.read_text())
    raw["name"] = "bench-recovery"
    raw["steps"] = steps
    raw["checkpoint"] = {"dir": str(work / "ckpt"), "interval_steps": interval}
    path = work / "job.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def phases_of(log: EventLog, generation: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for s in log.matching(
        lambda e: e.generation == generation and e.kind in ("reconfiguring", "reconfigured", "resumed")
    ):
        out.update(dict(s.ev.durations_s))
    return out


def run(args: argparse.Namespace, work: Path) -> dict:
    spec, raw = load_spec(str(write_spec(work, args.steps, args.checkpoint_interval)))
    cluster = LocalCluster(LocalClusterConfig(nodes=args.nodes, work_dir=work / "cluster"))
    restart: LocalCluster | None = None
    channel = None
    log: EventLog | None = None
    try:
        cluster.start_master()
        target = cluster.wait_master()
        cluster.start_agents()
        cluster.wait_agents()
        channel, stub = admin_channel(target, str(cluster.admin_token_file))
        _wait_registered(stub, args.nodes, 30.0)
        log = EventLog(stub, existing_event_id(stub))
        log.start()
        # The master profiles the model on the first node (the spec names no profile).
        stub.SubmitJob(admin_pb2.SubmitJobRequest(job_spec_yaml=yaml.safe_dump(raw, sort_keys=False)), timeout=600)
        print(f"submitted {spec.name}: {args.nodes} nodes, {spec.steps} steps, work dir {work}", flush=True)
        wait = lambda pred, what: log.wait(pred, what, args.timeout_s, cluster.check_alive)  # noqa: E731

        # -- 1. Oobleck: kill one node, the survivors reconfigure in place ------------------------
        wait(lambda e: is_step(e, min_step=args.kill_at), f"step {args.kill_at}")
        status = stub.GetStatus(admin_pb2.GetStatusRequest(), timeout=10)
        gen1, victim = int(status.generation), last_plan_node(status)
        if victim is None:
            raise BenchError("the plan has no nodes")
        t_kill = time.time()
        cluster.kill_node(victim)
        print(f"oobleck: killed node {victim} at step {status.step} (generation {gen1})", flush=True)
        first = wait(lambda e: is_step(e, after_generation=gen1), f"a step of generation > {gen1}")
        gen2 = int(first.ev.generation)
        with contextlib.suppress(BenchError):  # phases: the resumed event follows the first step
            log.wait(lambda e: e.kind == "resumed" and e.generation == gen2, "resumed", 30.0)
        phases = phases_of(log, gen2)
        oobleck = {
            "kill_step": int(status.step),
            "first_step": int(first.ev.step),
            "generation": gen2,
            "recovery_s": first.t - t_kill,
            "phases_s": phases,
            "phases_sum_s": sum(phases.get(k, 0.0) for k in PHASES),
        }
        print(
            f"oobleck: first step {first.ev.step} of generation {gen2} {oobleck['recovery_s']:.3f}s after the kill",
            flush=True,
        )

        # -- 2. Checkpoint restart: tear everything down, fresh agents, restore ------------------
        wait(lambda e: is_step(e, min_step=args.baseline_at, after_generation=gen2 - 1), f"step {args.baseline_at}")
        status = stub.GetStatus(admin_pb2.GetStatusRequest(), timeout=10)
        gen_b = int(status.generation)
        survivors = [nid for nid, agent in cluster.nodes().items() if agent.alive()]
        t_kill_b = time.time()
        for nid in survivors:
            cluster.kill_node(nid)
        print(f"baseline: killed all {len(survivors)} nodes at step {status.step} (generation {gen_b})", flush=True)
        paused = wait(lambda e: e.kind == "job_paused", "job_paused")
        restart = LocalCluster(LocalClusterConfig(nodes=len(survivors), work_dir=work / "restart"))
        restart.work_dir.mkdir(parents=True, exist_ok=True)
        restart.master_target = cluster.master_target  # same master, fresh agents and workers
        restart.agent_token_file = cluster.agent_token_file
        restart.start_agents()
        restart.wait_agents()
        resumed = wait(lambda e: e.kind == "job_resumed", "job_resumed")
        # The master publishes steps beyond the highest one seen: this is the first step past the
        # kill, after the rolled-back steps were recomputed; the first step after the restore
        # itself is read from the workers' logs.
        regain = wait(lambda e: is_step(e, after_generation=gen_b), f"a step of generation > {gen_b}")
        gen_r = int(regain.ev.generation)
        logged = first_logged_step(sorted(restart.work_dir.glob("node*.log")), gen_r)
        if logged is None:
            raise BenchError(f"no step line of generation {gen_r} in {restart.work_dir}/node*.log")
        t_first, first_step = logged
        baseline = {
            "kill_step": int(status.step),
            "first_step": first_step,
            "generation": gen_r,
            "restart_baseline_s": t_first - t_kill_b,
            "detect_s": paused.t - t_kill_b,
            "restart_only_s": t_first - paused.t,
            "job_resumed_after_kill_s": resumed.t - t_kill_b,
            "regain_kill_step_s": regain.t - t_kill_b,
            "steps_rolled_back": int(status.step) - (first_step - 1),
        }
        print(
            f"baseline: first step {first_step} (after restore) {baseline['restart_baseline_s']:.3f}s after the kill",
            flush=True,
        )
        return {"oobleck": oobleck, "baseline": baseline}
    finally:
        # A second Ctrl-C must not cut the teardown short (every stop is bounded by deadlines).
        old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
        if log is not None:
            log.stop()
        if channel is not None:
            with contextlib.suppress(Exception):
                channel.close()
        if restart is not None:
            restart.stop()
        cluster.stop()
        for sig, handler in old.items():
            signal.signal(sig, handler)


def report(res: dict) -> dict:
    o, b = res["oobleck"], res["baseline"]
    detect = o["phases_s"].get("detect", 0.0)
    rows = [("oobleck: kill -> first step of new generation", o["recovery_s"])]
    rows += [(f"  phase {k}", o["phases_s"][k]) for k in PHASES if k in o["phases_s"]]
    rows += [
        ("  recovery minus detect", o["recovery_s"] - detect),
        ("restart baseline: kill -> first step after restore", b["restart_baseline_s"]),
        ("  detect (kill -> job_paused)", b["detect_s"]),
        ("  restart only (job_paused -> first step)", b["restart_only_s"]),
        ("  kill -> step past the kill step (with recompute)", b["regain_kill_step_s"]),
    ]
    print(f"\n{'measure':<52} {'seconds':>9}")
    for name, value in rows:
        print(f"{name:<52} {value:9.3f}")
    print(
        f"oobleck: killed at step {o['kill_step']}, resumed at step {o['first_step']} (no rollback); "
        f"baseline: killed at step {b['kill_step']}, resumed at step {b['first_step']} "
        f"({b['steps_rolled_back']} steps rolled back, not counted above)"
    )
    summary = {
        "recovery_s": round(o["recovery_s"], 3),
        "detect_s": round(detect, 3),
        "restart_baseline_s": round(b["restart_baseline_s"], 3),
        "ratio": round((o["recovery_s"] - detect) / b["restart_baseline_s"], 3),
        "ratio_both_without_detect": round((o["recovery_s"] - detect) / b["restart_only_s"], 3),
        "baseline_detect_s": round(b["detect_s"], 3),
        "baseline_restart_only_s": round(b["restart_only_s"], 3),
        "phases_s": {k: round(v, 4) for k, v in o["phases_s"].items()},
        "baseline_steps_rolled_back": b["steps_rolled_back"],
        "baseline_regain_kill_step_s": round(b["regain_kill_step_s"], 3),
    }
    return summary


def _interrupt(signum, _frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=5, help="local nodes of 1 slot (default 5: 2 + 3)")
    p.add_argument("--steps", type=int, default=2000, help="job length (the run stops after both faults)")
    p.add_argument("--kill-at", type=int, default=40, help="step of the Oobleck fault")
    p.add_argument("--baseline-at", type=int, default=110, help="step of the restart baseline's fault")
    p.add_argument("--checkpoint-interval", type=int, default=20, help="checkpoint every N steps")
    p.add_argument("--timeout-s", type=float, default=300.0, help="deadline of every wait")
    p.add_argument("--keep", action="store_true", help="keep the work dir (logs, checkpoints)")
    args = p.parse_args(argv)
    if not args.kill_at < args.baseline_at < args.steps:
        p.error("need --kill-at < --baseline-at < --steps")
    if args.baseline_at - args.kill_at < args.checkpoint_interval:
        p.error("--baseline-at must be at least one checkpoint interval after --kill-at")
    signal.signal(signal.SIGTERM, _interrupt)
    work = Path(tempfile.mkdtemp(prefix="oobleck-bench-recovery-"))
    ok = False
    try:
        summary = report(run(args, work))
        ok = True
    except KeyboardInterrupt:
        print("interrupted; processes stopped", file=sys.stderr)
        return 130
    except BenchError as exc:
        print(f"recovery bench: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.keep or not ok:
            print(f"work dir kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
