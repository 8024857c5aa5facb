"""Chaos drill: random faults on a local cluster; the result must equal the reference and every
checkpoint must be intact.

One local cluster (the real master, agents and CPU workers of ``oobleck-launch --local``) trains a
tiny GPT in fp64 (``--steps`` steps, ``ft = --ft``, ``min_nodes`` 2, a checkpoint every 5 steps). A
seeded schedule (``--seed``) then injects ``--kills`` fault events at random steps, their kinds
drawn from ``--faults`` (each listed kind at least once):

- ``kill``: SIGKILLs 1..``ft`` random nodes of the current plan, at whatever moment of the step
  that is (``LocalCluster.kill_node``: the agent and its workers). Victims are drawn only among
  sets the job can absorb without a checkpoint restore: at least one pipeline keeps every node
  (so every layer keeps a copy) and at least two plan nodes survive. With probability
  ``--nested-prob`` (when the event killed fewer than ``ft`` nodes) one more node is killed as
  soon as the master has the next generation (a failure during a reconfiguration). Each victim's
  agent restarts with probability ``--restart-prob`` once the master has reconfigured; it
  registers anew, as a spare, and the master scales the plan up onto it.
- ``overkill``: SIGKILLs more nodes than ``ft`` -- at least one of every pipeline, so some layer
  loses every copy -- then restarts all of them: the job pauses and restores its checkpoint.
- ``master``: SIGKILLs the master and restarts it after a random ``--master-down-s`` (default
  1-40 s); training goes on meanwhile, and the event may fall on the last steps (the job then
  finishes while the master is down and completes when it returns).
- ``freeze``: SIGSTOPs a whole node (agent and workers) for a random ``--freeze-s`` (default
  2-10 s), then SIGCONTs it. Past the heartbeat timeout the node is declared dead and the job
  reconfigures without it; the thawed agent registers again as a spare.

Training never runs more than ``HOLD_SLACK`` steps past the next event's step (the workers'
drill hold file, ``OOBLECK_WORKER_HOLD_FILE``, with ``step@N``), so that every event happens even
while the master is down or a node frozen, and still lands at a random point of a step.
While restarted nodes join, training is held between two steps so that even a short job sees
the scale-up; that hold ends when
every returning node is in the plan, or the master judged it of no use (``scale_up_skipped``).

At the end the job must have SUCCEEDED; its final checkpoint must equal ``--steps`` steps of the
single-process reference loop (``rtol=1e-4, atol=1e-5``: no sample lost or seen twice, the
optimizer state moved correctly through every generation); every complete checkpoint must match
its manifest and ``latest`` must name the newest; and the committed step (polled from the master)
must never have gone below the latest checkpoint taken before a fault. Prints one line per
action, a table, and as its last line one JSON object (``{"ok", "seed", "kills", "faults", ...}``).
Exit status 0 when the checks passed, 1 when they did not, 2 on usage or cluster errors, 143 on
SIGTERM; on every exit the cluster is stopped and any process the drill froze is resumed first.

Usage: python scripts/chaos.py --seed S --nodes N --ft F --steps K --kills R
       [--faults kill,overkill,master,freeze] [--restart-prob P] [--nested-prob Q]
       [--master-down-s A-B] [--freeze-s A-B] [--work-dir DIR] [--timeout-s T] [--keep]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import torch

from oobleck.cli.admin import admin_channel
from oobleck.cli.launch import _wait_registered
from oobleck.cli.local_cluster import ClusterError, LocalCluster, LocalClusterConfig
from oobleck.common import checkpoint as ck
from oobleck.common.jobspec import CheckpointSpec, DataSpec, JobSpec, ModelSpec, OptimizerSpec
from oobleck.protos.v1 import admin_pb2

POLL_S = 0.05
CHECKPOINT_INTERVAL = 5
HOLD_SLACK = 2  # training runs at most this many steps past the next event's step
RTOL, ATOL = 1e-4, 1e-5
ENV_HOLD_FILE = "OOBLECK_WORKER_HOLD_FILE"


class ChaosError(RuntimeError):
    """The drill could not run (cluster error, timeout): not a verdict on the result."""


def job_spec(steps: int, ft: int, checkpoint_dir: Path) -> JobSpec:
    """The drill's job: a 6-layer GPT (4 blocks, hidden 32), 6 microbatches of 2, dropout 0, in
    fp64 and at a learning rate where training is not chaotic. Both matter for the check: in
    fp32 the summation order (which follows the plan) alone moves parameters past ``rtol=1e-4``
    within a few dozen steps, and at a learning rate of 3e-3 even fp64 rounding noise grows about
    tenfold per step after step ~50 (the single-process loop run with two microbatch sizes ends
    0.09 apart after 150 steps); at 1e-3 the two end 2e-10 apart."""
    return JobSpec(
        name="chaos",
        model=ModelSpec("gpt", {"num_layers": 4, "hidden_size": 32, "num_heads": 4, "vocab_size": 64, "dropout": 0.0}),
        data=DataSpec(seq_len=16, num_samples=512, seed=1),
        optimizer=OptimizerSpec(lr=1e-3, eps=1e-6, grad_clip_norm=1.0, warmup_steps=2, weight_decay=0.01),
        global_batch_size=12,
        microbatch_size=2,
        steps=steps,
        ft=ft,
        min_nodes=2,
        seed=7,
        checkpoint=CheckpointSpec(str(checkpoint_dir), CHECKPOINT_INTERVAL),
        precision="fp64",
    )


def choose_victims(rng: random.Random, pipelines: list[list[int]], ft: int) -> list[int]:
    """1..ft plan nodes whose loss the job absorbs in place: some pipeline keeps all its nodes
    and at least two plan nodes survive. Empty when no node can go."""
    nodes = sorted(n for p in pipelines for n in p)
    for count in range(rng.randint(1, max(1, ft)), 0, -1):
        for _ in range(50):
            victims = sorted(rng.sample(nodes, count)) if count <= len(nodes) else []
            if not victims:
                break
            intact = any(not set(p) & set(victims) for p in pipelines)
            if intact and len(nodes) - count >= 2:
                return victims
    return []


def choose_during_reconfiguration(
    rng: random.Random, old: list[list[int]], new: list[list[int]], dead: list[int]
) -> int | None:
    """One more node to kill while the master installs ``new`` (after ``dead`` died out of
    ``old``), or None: survivors may still carry the old generation's layers or the new one's,
    so a pipeline of each must stay intact, and two plan nodes must remain."""
    nodes = sorted(n for p in new for n in p)
    rng.shuffle(nodes)
    for n in nodes:
        gone = {*dead, n}
        if (
            any(not set(p) & gone for p in old)
            and any(n not in p for p in new)
            and len([m for p in new for m in p if m not in gone]) >= 2
        ):
            return n
    return None


def kill_steps(rng: random.Random, steps: int, kills: int) -> list[int]:
    """``kills`` distinct steps in [2, steps - 4], in order (fewer when the job is too short)."""
    candidates = list(range(2, max(2, steps - 4)))
    return sorted(rng.sample(candidates, min(kills, len(candidates))))


def compare_with_reference(spec: JobSpec) -> tuple[bool, float, str]:
    """(all close, max |a-b|, first mismatch) between the final checkpoint and the reference."""
    from oobleck.worker import checkpoint as ckpt
    from oobleck.worker.reference import reference_run

    manifest, root = ckpt.read_manifest(Path(spec.checkpoint.dir))
    if manifest["step"] != spec.steps:
        return False, float("inf"), f"the latest checkpoint is of step {manifest['step']}, not {spec.steps}"
    reference = dataclasses.replace(spec, ft=0, min_nodes=None, checkpoint=None, profile=None)
    _, ref_state = reference_run(reference.to_yaml(), spec.steps)
    layers = ckpt.load_layers(root, manifest, range(len(ref_state)))
    worst, problem = 0.0, ""
    for layer, ref_params in ref_state.items():
        got = {k.removeprefix("param."): v for k, v in layers[layer].items() if k.startswith("param.")}
        if set(got) != set(ref_params):
            return False, float("inf"), f"layer {layer}: parameters {sorted(got)} != {sorted(ref_params)}"
        for name, value in got.items():
            want = ref_params[name]
            worst = max(worst, float((value - want).abs().max()))
            if not problem and not torch.allclose(value, want, rtol=RTOL, atol=ATOL):
                problem = f"layer {layer} {name}: max |diff| {float((value - want).abs().max()):.3g}"
    return not problem, worst, problem


FAULT_KINDS = ("kill", "overkill", "master", "freeze")
# The drill's workers give up on a peer that stopped answering after this (a frozen node blocks
# the transfers of its pipeline until then); the default is 300 s.
DRILL_COLLECTIVE_TIMEOUT_S = "20"
STATUS_POLL_S = 0.2


def fault_schedule(rng: random.Random, steps: int, count: int, kinds: list[str]) -> list[tuple[int, str]]:
    """``count`` (step, kind) events at distinct steps in order, each of ``kinds`` at least once;
    with ``master`` among them, half the schedules end with the master killed on one of the last
    steps (the job may finish while it is down). Empty when ``count`` is 0."""
    if count == 0:
        return []
    if count < len(kinds):
        raise ValueError(f"--kills {count} is fewer than the {len(kinds)} fault kinds of --faults")
    at = kill_steps(rng, steps, count)
    if len(at) < count:
        raise ValueError(f"--steps {steps} leaves room for {len(at)} fault events, not {count}")
    chosen = list(kinds) + [rng.choice(kinds) for _ in range(count - len(kinds))]
    rng.shuffle(chosen)
    pinned = None  # an event that must stay where it is
    if "master" in kinds and rng.random() < 0.5:  # the master goes down on one of the last steps
        i = chosen.index("master")
        chosen[i], chosen[-1] = chosen[-1], chosen[i]
        at[-1] = max(at[-2] + 1 if count > 1 else 2, steps - rng.randint(1, 3))
        pinned = count - 1
    # An overkill restores the latest checkpoint: place it after the first one where possible.
    for i, kind in enumerate(chosen):
        if kind == "overkill" and at[i] <= CHECKPOINT_INTERVAL:
            later = [
                j
                for j in range(i + 1, count)
                if j != pinned and at[j] > CHECKPOINT_INTERVAL and chosen[j] != "overkill"
            ]
            if later:
                chosen[i], chosen[later[0]] = chosen[later[0]], chosen[i]
    return list(zip(at, chosen, strict=True))


def layer_holders(plan: admin_pb2.Plan | None, pipelines: list[list[int]]) -> dict[int, set[int]]:
    """Layer -> the plan nodes holding it, from the plan's templates (stage ranges by node index)."""
    by_size = {t.num_nodes: t for t in plan.templates}
    out: dict[int, set[int]] = {}
    for nodes in pipelines:
        for stage in by_size[len(nodes)].stages:
            for layer in range(stage.layer_start, stage.layer_end):
                out.setdefault(layer, set()).add(nodes[stage.node_index])
    return out


def choose_overkill(rng: random.Random, plan, pipelines: list[list[int]], ft: int) -> list[int]:
    """More than ``ft`` plan nodes: every holder of one random layer (so that layer loses every
    copy and the job must restore its checkpoint), topped up with random others, at least one
    node left. Empty when the plan cannot lose that many."""
    nodes = sorted(n for p in pipelines for n in p)
    holders = layer_holders(plan, pipelines)
    victims = set(holders[rng.choice(sorted(holders))])
    others = [n for n in nodes if n not in victims]
    rng.shuffle(others)
    while len(victims) <= ft and others:
        victims.add(others.pop())
    if len(victims) <= ft or len(victims) >= len(nodes):
        return []
    return sorted(victims)


def parse_range(text: str, what: str) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in text.split("-", 1)) if "-" in text else (float(text),) * 2
    except ValueError:
        raise ValueError(f"{what}: expected A-B seconds, got {text!r}") from None
    if not 0 <= lo <= hi:
        raise ValueError(f"{what}: need 0 <= A <= B, got {text!r}")
    return lo, hi


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--nodes", type=int, default=6)
    p.add_argument("--ft", type=int, default=1)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--kills", type=int, default=3, help="fault events (kinds drawn from --faults)")
    p.add_argument(
        "--faults", default="kill",
        help=f"comma-separated fault kinds among {','.join(FAULT_KINDS)}, each injected at least once (default kill)",
    )  # fmt: skip
    p.add_argument("--restart-prob", type=float, default=0.5, help="chance that a killed node's agent restarts")
    p.add_argument(
        "--nested-prob", type=float, default=0.3,
        help="chance that a kill event with failure budget left kills one more node as the master installs the "
        "next generation (a failure during a reconfiguration)",
    )  # fmt: skip
    p.add_argument("--master-down-s", default="1-40", help="how long a killed master stays down, A-B seconds")
    p.add_argument("--freeze-s", default="2-10", help="how long a frozen node stays stopped, A-B seconds")
    p.add_argument("--work-dir", default=None, help="default: a temporary directory, removed unless --keep")
    p.add_argument("--timeout-s", type=float, default=600.0)
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, checkpoints)")
    return p


def check_args(args: argparse.Namespace) -> str | None:
    """The first usage error (None when the arguments are usable); fills the parsed fields."""
    if not 2 <= args.nodes <= 32 or not 0 <= args.ft < args.nodes or args.steps < 1 or args.kills < 0:
        return "need 2 <= --nodes <= 32, 0 <= --ft < --nodes, --steps >= 1, --kills >= 0"
    if not (0.0 <= args.restart_prob <= 1.0 and 0.0 <= args.nested_prob <= 1.0):
        return "--restart-prob and --nested-prob must be in [0, 1]"
    kinds = [k.strip() for k in args.faults.split(",") if k.strip()]
    unknown = sorted(set(kinds) - set(FAULT_KINDS))
    if not kinds or unknown or len(set(kinds)) != len(kinds):
        return f"--faults: a comma-separated list of distinct kinds among {', '.join(FAULT_KINDS)}, got {args.faults!r}"
    args.fault_kinds = kinds
    try:
        args.master_down = parse_range(args.master_down_s, "--master-down-s")
        args.freeze_s = parse_range(args.freeze_s, "--freeze-s")
        fault_schedule(random.Random(args.seed), args.steps, args.kills, kinds)
    except ValueError as exc:
        return str(exc)
    return None


class Terminated(Exception):
    """SIGTERM: unwind so that the cluster is stopped on the way out."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    problem = check_args(args)
    if problem:
        print(f"chaos: {problem}", file=sys.stderr)
        return 2
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="oobleck-chaos-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    drill = Drill(args, work)
    try:
        result = drill.run()
    except Terminated:
        print(f"chaos: terminated (logs under {work})", file=sys.stderr)
        args.keep = True
        return 143
    except (ChaosError, ClusterError) as exc:
        print(f"chaos: {exc} (logs under {work})", file=sys.stderr)
        args.keep = True
        print(json.dumps({"ok": False, "seed": args.seed, "error": str(exc)}))
        return 2
    finally:
        with contextlib.suppress(Exception):
            drill.close()
        if not args.keep and args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    print()
    faults = " ".join(f"{k}:{n}" for k, n in result["faults"].items())
    print("| seed | nodes | ft | steps | faults | kills | restarts | generations | scale-ups | restores | "
          "checkpoints intact | max abs diff | ok |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {result['seed']} | {result['nodes']} | {result['ft']} | {result['steps']} | {faults} | {result['kills']} | "
        f"{result['restarts']} | {result['generations']} | {result['scale_ups']} | {result['restores']} | "
        f"{result['checkpoints']} {'yes' if result['checkpoints_intact'] else 'NO'} | {result['max_abs_diff']:.3g} | "
        f"{'yes' if result['ok'] else 'NO: ' + result['problem']} |"
    )
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
