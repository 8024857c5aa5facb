"""The chaos drill itself: a local cluster, the seeded fault events injected into its job, the verdict.

:class:`Drill` starts the cluster, submits the job, injects each event of the schedule
(``fault_kill``, ``fault_overkill``, ``fault_master``, ``fault_freeze``) while holding training so
that every event happens, restarts the victims, and at the end checks the job against the reference
and its checkpoints (see ``scripts/chaos.py`` for what each fault does and what is checked).
"""

from __future__ import annotations

import argparse
import os
import random
import re
import threading
import time
from pathlib import Path

import grpc
from chaos_job import compare_with_reference, job_spec
from chaos_schedule import choose_during_reconfiguration, choose_overkill, choose_victims, fault_schedule

from oobleck.cli.admin import admin_channel
from oobleck.cli.launch import _wait_registered
from oobleck.cli.local_cluster import LocalCluster, LocalClusterConfig
from oobleck.common import checkpoint as ck
from oobleck.common.jobspec import JobSpec
from oobleck.protos.v1 import admin_pb2

POLL_S = 0.05
HOLD_SLACK = 2  # training runs at most this many steps past the next event's step
ENV_HOLD_FILE = "OOBLECK_WORKER_HOLD_FILE"
# The drill's workers give up on a peer that stopped answering after this (a frozen node blocks
# the transfers of its pipeline until then); the default is 300 s.
DRILL_COLLECTIVE_TIMEOUT_S = "20"
STATUS_POLL_S = 0.2


class ChaosError(RuntimeError):
    """The drill could not run (cluster error, timeout): not a verdict on the result."""


class StatusLog:
    """The job's committed step over time, polled from the master in a thread (a down master is
    simply not heard from)."""

    def __init__(self, stub) -> None:
        self.stub = stub
        self.records: list[tuple[float, int, int]] = []  # (monotonic time, step, state)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="status-log", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(STATUS_POLL_S):
            try:
                s = self.stub.GetStatus(admin_pb2.GetStatusRequest(), timeout=2)
            except grpc.RpcError:
                continue
            self.records.append((time.monotonic(), s.step, s.state))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class Drill:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.rng = random.Random(args.seed)
        self.hold = work / "hold"
        self.cluster: LocalCluster | None = None
        self.stub = None
        self.channel = None
        self.statuses: StatusLog | None = None
        self.frozen: list[int] = []  # pids the drill stopped: resumed on every way out
        self.t0 = time.monotonic()
        self.log: list[dict] = []
        self.deadline = self.t0 + args.timeout_s
        self.kills = self.restarts = 0
        self.faults: list[tuple[float, int | None, str]] = []  # (time, newest checkpoint then, kind)
        self.hold_at: int | None = None  # training holds once this many steps are done
        self.holding = False  # ... or right away (while restarted nodes join)

    def say(self, text: str, **record) -> None:
        print(f"[{time.monotonic() - self.t0:7.2f}s] {text}", flush=True)
        self.log.append({"t_s": round(time.monotonic() - self.t0, 3), "what": text, **record})

    def status(self) -> admin_pb2.GetStatusResponse:
        return self.stub.GetStatus(admin_pb2.GetStatusRequest(), timeout=10)

    def wait_status(self, pred, what: str) -> admin_pb2.GetStatusResponse:
        while True:
            self.cluster.check_alive()
            s = self.status()
            if pred(s):
                return s
            if s.state in (admin_pb2.JOB_STATE_FAILED, admin_pb2.JOB_STATE_CANCELLED):
                raise ChaosError(f"the job ended ({admin_pb2.JobState.Name(s.state)}: {s.reason}) waiting for {what}")
            self.check_deadline(what)
            time.sleep(POLL_S)

    def check_deadline(self, what: str) -> None:
        if time.monotonic() > self.deadline:
            raise ChaosError(f"--timeout-s {self.args.timeout_s:g} reached waiting for {what}")

    def events(self) -> list:
        return list(self.stub.WatchEvents(admin_pb2.WatchEventsRequest(since_id=0), timeout=10))

    def newest_checkpoint(self, spec: JobSpec) -> int | None:
        steps = ck.complete_steps(spec.checkpoint.dir)
        return steps[0] if steps else None

    def run(self) -> dict:
        args = self.args
        spec = job_spec(args.steps, args.ft, self.work / "checkpoints")
        schedule = fault_schedule(self.rng, args.steps, args.kills, args.fault_kinds)
        os.environ[ENV_HOLD_FILE] = str(self.hold)  # inherited by agents, and by their workers
        os.environ.setdefault("OOBLECK_COLLECTIVE_TIMEOUT_S", DRILL_COLLECTIVE_TIMEOUT_S)
        self.cluster = LocalCluster(LocalClusterConfig(nodes=args.nodes, work_dir=self.work / "cluster"))
        self.cluster.start_master()
        target = self.cluster.wait_master()
        self.cluster.start_agents()
        self.cluster.wait_agents()
        self.channel, self.stub = admin_channel(target, str(self.cluster.admin_token_file))
        _wait_registered(self.stub, args.nodes, 60)
        # No `profile:` in the spec: the master has the model profiled on the first node.
        try:
            self.stub.SubmitJob(admin_pb2.SubmitJobRequest(job_spec_yaml=spec.to_yaml()), timeout=600)
        except grpc.RpcError as exc:
            raise ChaosError(f"the master rejected the job: {exc.details()}") from None
        self.statuses = StatusLog(self.stub)
        kinds = ", ".join(f"{k}@{at}" for at, k in schedule) or "none"
        self.say(f"job submitted: {args.steps} steps, ft={args.ft}, {args.nodes} nodes; faults {kinds}")
        for i, (at, kind) in enumerate(schedule):
            self.hold_until(min(at + HOLD_SLACK, args.steps - 1))
            s = self.wait_status(
                lambda s, at=at: (
                    s.state == admin_pb2.JOB_STATE_SUCCEEDED
                    or (s.state == admin_pb2.JOB_STATE_RUNNING and s.step >= at)
                ),
                f"step {at}",
            )
            if s.state == admin_pb2.JOB_STATE_SUCCEEDED:
                self.say(f"the job finished before step {at}'s {kind}")
                break
            self.faults.append((time.monotonic(), self.newest_checkpoint(spec), kind))
            # Meanwhile (the master down, a node frozen, a reconfiguration), training goes on up
            # to the next event; after the last one, to the end.
            later = schedule[i + 1][0] if i + 1 < len(schedule) else None
            self.hold_until(None if later is None else min(later + HOLD_SLACK, args.steps - 1))
            getattr(self, f"fault_{kind}")(s)
        self.hold_until(None)
        final = self.wait_status(lambda s: s.state == admin_pb2.JOB_STATE_SUCCEEDED, "the job to succeed")
        self.say(f"job succeeded at step {final.step}, generation {final.generation}")
        self.statuses.stop()
        ok, worst, problem = compare_with_reference(spec)
        broken = ck.audit(spec.checkpoint.dir)
        went_back = [
            f"step {step} at {t - self.t0:.1f}s, after a {kind} when checkpoint {taken} existed"
            for t_fault, taken, kind in self.faults
            if taken is not None
            for t, step, _state in self.statuses.records
            if t > t_fault and step < taken
        ]
        problems = [p for p in (problem, *broken, *went_back[:3]) if p]
        events = self.events()
        kinds_seen = [e.kind for e in events]
        return {
            "ok": ok and not broken and not went_back,
            "seed": args.seed,
            "nodes": args.nodes,
            "ft": args.ft,
            "steps": args.steps,
            "kills": self.kills,
            "faults": {k: sum(1 for _, _, kind in self.faults if kind == k) for k in args.fault_kinds},
            "restarts": self.restarts,
            "generations": final.generation,
            "reconfigurations": kinds_seen.count("reconfigured"),
            "scale_ups": sum(1 for e in events if e.kind == "reconfiguring" and "scaled up" in e.message),
            "superseded": kinds_seen.count("reconfigure_incomplete"),
            "restores": sum(1 for e in events if "restored at step" in e.message),
            "checkpoints": len(ck.complete_steps(spec.checkpoint.dir)),
            "checkpoints_intact": not broken,
            "step_went_back": len(went_back),
            "max_abs_diff": worst,
            "problem": "; ".join(problems),
            "wall_s": round(time.monotonic() - self.t0, 2),
        }

    # -- faults --------------------------------------------------------------------------------

    def fault_kill(self, s: admin_pb2.GetStatusResponse) -> None:
        args = self.args
        pipelines = [list(p.node_ids) for p in s.plan.pipelines]
        victims = choose_victims(self.rng, pipelines, args.ft)
        if not victims:
            self.say(f"step {s.step}: no node can be killed without losing a layer; skipped")
            return
        names = {n: self.cluster.nodes()[n].name for n in victims}
        for n in victims:
            self.cluster.kill_node(n)
        self.kills += len(victims)
        self.say(f"step {s.step}: killed nodes {victims} ({', '.join(names.values())}) of {pipelines}")
        gen = s.generation
        if args.ft - len(victims) >= 1 and self.rng.random() < args.nested_prob:
            s2 = self.wait_status(
                lambda s, gen=gen: s.state == admin_pb2.JOB_STATE_SUCCEEDED or s.generation > gen,
                "the next generation",
            )
            extra = None
            if s2.state != admin_pb2.JOB_STATE_SUCCEEDED:
                new = [list(p.node_ids) for p in s2.plan.pipelines]
                extra = choose_during_reconfiguration(self.rng, pipelines, new, victims)
            if extra is not None:
                names[extra] = self.cluster.nodes()[extra].name
                self.cluster.kill_node(extra)
                self.kills += 1
                state = admin_pb2.JobState.Name(s2.state).removeprefix("JOB_STATE_")
                self.say(f"generation {s2.generation} ({state}): killed node {extra} ({names[extra]}) of {new}")
                victims.append(extra)
                gen = s2.generation
        s = self.wait_status(
            lambda s, gen=gen: (
                s.state == admin_pb2.JOB_STATE_SUCCEEDED
                or (s.generation > gen and s.state == admin_pb2.JOB_STATE_RUNNING)
            ),
            "the reconfiguration",
        )
        self.say(f"generation {s.generation}: {[list(p.node_ids) for p in s.plan.pipelines]} at step {s.step}")
        back = [name for name in names.values() if self.rng.random() < args.restart_prob]
        if back and s.state == admin_pb2.JOB_STATE_RUNNING:
            self.restart(back)

    def fault_overkill(self, s: admin_pb2.GetStatusResponse) -> None:
        pipelines = [list(p.node_ids) for p in s.plan.pipelines]
        victims = choose_overkill(self.rng, s.plan, pipelines, self.args.ft)
        if not victims:
            self.say(f"step {s.step}: the plan cannot lose more than ft={self.args.ft} nodes; overkill skipped")
            return
        names = [self.cluster.nodes()[n].name for n in victims]
        for n in victims:
            self.cluster.kill_node(n)
        self.kills += len(victims)
        self.say(f"step {s.step}: overkill: killed nodes {victims} ({', '.join(names)}) of {pipelines}")
        gen = s.generation
        s = self.wait_status(
            lambda s, gen=gen: (
                s.state in (admin_pb2.JOB_STATE_PAUSED, admin_pb2.JOB_STATE_SUCCEEDED)
                or (s.generation > gen and s.state == admin_pb2.JOB_STATE_RUNNING)
            ),
            "the job to pause (or restore in place)",
        )
        self.say(f"generation {s.generation}: {admin_pb2.JobState.Name(s.state)} ({s.reason}) at step {s.step}")
        if s.state != admin_pb2.JOB_STATE_SUCCEEDED:
            self.restart(names)

    def fault_master(self, s: admin_pb2.GetStatusResponse) -> None:
        lo, hi = self.args.master_down
        down_s = self.rng.uniform(lo, hi)
        self.cluster.kill_master()
        killed = time.monotonic()
        self.say(f"step {s.step}: killed the master; restarting it in {down_s:.1f}s")
        while time.monotonic() < killed + down_s:  # the outage itself
            self.check_deadline("the end of the master outage")
            time.sleep(min(POLL_S * 4, max(0.0, killed + down_s - time.monotonic())))
        self.cluster.restart_master()
        self.cluster.wait_master()
        s = self.status()
        state = admin_pb2.JobState.Name(s.state).removeprefix("JOB_STATE_")
        back_s = time.monotonic() - killed
        self.say(f"master back after {back_s:.1f}s: generation {s.generation}, {state}, step {s.step}")

    def fault_freeze(self, s: admin_pb2.GetStatusResponse) -> None:
        pipelines = [list(p.node_ids) for p in s.plan.pipelines]
        victims = choose_victims(self.rng, pipelines, 1)
        if not victims:
            self.say(f"step {s.step}: no node can be frozen without losing a layer; skipped")
            return
        (victim,) = victims
        lo, hi = self.args.freeze_s
        frozen_s = self.rng.uniform(lo, hi)
        name = self.cluster.nodes()[victim].name
        self.frozen = self.cluster.freeze_node(victim)
        stopped = time.monotonic()
        self.say(f"step {s.step}: froze node {victim} ({name}) of {pipelines} for {frozen_s:.1f}s")
        while time.monotonic() < stopped + frozen_s:
            self.check_deadline("the end of the freeze")
            time.sleep(min(POLL_S * 4, max(0.0, stopped + frozen_s - time.monotonic())))
        self.cluster.thaw(self.frozen)
        self.frozen = []
        s = self.status()
        self.say(f"thawed node {victim} ({name}): generation {s.generation}, step {s.step}")

    def hold_until(self, at: int | None) -> None:
        """Training holds once ``at`` steps are done (None: it does not)."""
        self.hold_at = at
        self._write_hold()

    def hold_now(self, now: bool) -> None:
        """Training holds between two steps right away (until ``hold_now(False)``)."""
        self.holding = now
        self._write_hold()

    def _write_hold(self) -> None:
        words = (["step"] if self.holding else []) + ([f"step@{self.hold_at}"] if self.hold_at is not None else [])
        if words:
            self.hold.write_text(" ".join(words))
        else:
            self.hold.unlink(missing_ok=True)

    def restart(self, names: list[str]) -> None:
        """Hold training, restart the agents ``names``, release once each is in the plan (or judged
        of no use by the master)."""
        self.restarts += len(names)
        self.hold_now(True)
        try:
            before = {e.id for e in self.events()}
            daemons = [self.cluster.restart_agent(name) for name in names]
            ids = [int(self.cluster.wait_agent(d)["node_id"]) for d in daemons]
            self.say(f"restarted {names} as nodes {ids}; training held until the master uses them")

            def settled(s) -> bool:
                """Every restarted node is in the plan, or was judged of no use after it joined
                (or the job is over: the last steps ran before the hold took effect)."""
                if s.state == admin_pb2.JOB_STATE_SUCCEEDED:
                    return True
                if s.state != admin_pb2.JOB_STATE_RUNNING:
                    return False
                placed = {n for p in s.plan.pipelines for n in p.node_ids}
                for e in self.events():
                    if e.kind == "scale_up_skipped" and e.id not in before:
                        found = re.search(r"spares \[([\d, ]*)\]", e.message)
                        placed |= {int(x) for x in found.group(1).split(",") if x.strip()} if found else set()
                return set(ids) <= placed

            s = self.wait_status(settled, f"nodes {ids} to join the plan")
            self.say(f"generation {s.generation}: {[list(p.node_ids) for p in s.plan.pipelines]}")
        finally:
            self.hold_now(False)

    def close(self) -> None:
        if self.frozen and self.cluster is not None:
            self.cluster.thaw(self.frozen)  # a stopped process would ignore SIGTERM until SIGKILL
            self.frozen = []
        if self.statuses is not None:
            self.statuses.stop()
        if self.channel is not None:
            self.channel.close()
        if self.cluster is not None:
            self.cluster.stop()


__all__ = ["HOLD_SLACK", "ChaosError", "Drill", "StatusLog"]
