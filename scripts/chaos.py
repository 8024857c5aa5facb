"""Chaos drill: random node kills (and restarts) on a local cluster; the result must equal the reference.

One local cluster (the real master, agents and CPU workers of ``oobleck-launch --local``) trains a
tiny GPT in fp64 (``--steps`` steps, ``ft = --ft``, ``min_nodes`` 2, a checkpoint every 5 steps). A
seeded schedule (``--seed``) then:

- at ``--kills`` random steps, SIGKILLs 1..``ft`` random nodes of the current plan, at whatever
  moment of the step that is (``LocalCluster.kill_node``: the agent and its workers). Victims
  are drawn only among sets the job can absorb without a checkpoint restore: at least one
  pipeline keeps every node (so every layer keeps a copy) and at least two plan nodes survive;
- with probability ``--nested-prob`` (when the event killed fewer than ``ft`` nodes), kills one
  more node as soon as the master has the next generation (a failure during a
  reconfiguration), again only one whose loss keeps every layer;
- after each kill, restarts each victim's agent with probability ``--restart-prob`` once the
  master has reconfigured; the agent registers anew, as a spare, and the master scales the plan
  up onto it. While restarted nodes join, training is held between two steps (the workers' drill
  hold file, ``OOBLECK_WORKER_HOLD_FILE``) so that even a short job sees the scale-up; the hold
  ends when every returning node is in the plan, or the master judged it of no use
  (``scale_up_skipped``).

At the end the job must have SUCCEEDED and its final checkpoint must equal ``--steps`` steps of
the single-process reference loop (``rtol=1e-4, atol=1e-5``): no sample lost or seen twice, the
optimizer state moved correctly through every generation. Prints one line per action, a table,
and as its last line one JSON object (``{"ok", "seed", "kills", "restarts", "generations", ...}``).
Exit status 0 when the check passed, 1 when it did not, 2 on usage or cluster errors.

Usage: python scripts/chaos.py --seed S --nodes N --ft F --steps K --kills R
       [--restart-prob P] [--work-dir DIR] [--timeout-s T] [--keep]
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
import time
from pathlib import Path

import grpc
import torch

from oobleck.cli.admin import admin_channel
from oobleck.cli.launch import _wait_registered
from oobleck.cli.local_cluster import ClusterError, LocalCluster, LocalClusterConfig
from oobleck.common.jobspec import CheckpointSpec, DataSpec, JobSpec, ModelSpec, OptimizerSpec
from oobleck.protos.v1 import admin_pb2

POLL_S = 0.05
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
        checkpoint=CheckpointSpec(str(checkpoint_dir), 5),
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


class Drill:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.rng = random.Random(args.seed)
        self.hold = work / "hold"
        self.cluster: LocalCluster | None = None
        self.stub = None
        self.channel = None
        self.t0 = time.monotonic()
        self.log: list[dict] = []
        self.deadline = self.t0 + args.timeout_s

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
            if time.monotonic() > self.deadline:
                raise ChaosError(f"--timeout-s {self.args.timeout_s:g} reached waiting for {what}")
            time.sleep(POLL_S)

    def events(self) -> list:
        return list(self.stub.WatchEvents(admin_pb2.WatchEventsRequest(since_id=0), timeout=10))

    def run(self) -> dict:
        args = self.args
        spec = job_spec(args.steps, args.ft, self.work / "checkpoints")
        os.environ[ENV_HOLD_FILE] = str(self.hold)  # inherited by agents, and by their workers
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
        self.say(f"job submitted: {args.steps} steps, ft={args.ft}, {args.nodes} nodes")
        kills = restarts = 0
        for at in kill_steps(self.rng, args.steps, args.kills):
            s = self.wait_status(
                lambda s, at=at: (
                    s.state == admin_pb2.JOB_STATE_SUCCEEDED
                    or (s.state == admin_pb2.JOB_STATE_RUNNING and s.step >= at)
                ),
                f"step {at}",
            )
            if s.state == admin_pb2.JOB_STATE_SUCCEEDED:
                self.say(f"the job finished before step {at}'s kill")
                break
            pipelines = [list(p.node_ids) for p in s.plan.pipelines]
            victims = choose_victims(self.rng, pipelines, args.ft)
            if not victims:
                self.say(f"step {s.step}: no node can be killed without losing a layer; skipped")
                continue
            names = {n: self.cluster.nodes()[n].name for n in victims}
            for n in victims:
                self.cluster.kill_node(n)
            kills += len(victims)
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
                    kills += 1
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
                restarts += len(back)
                self.restart(back)
        final = self.wait_status(lambda s: s.state == admin_pb2.JOB_STATE_SUCCEEDED, "the job to succeed")
        self.say(f"job succeeded at step {final.step}, generation {final.generation}")
        ok, worst, problem = compare_with_reference(spec)
        events = self.events()
        kinds = [e.kind for e in events]
        return {
            "ok": ok,
            "seed": args.seed,
            "nodes": args.nodes,
            "ft": args.ft,
            "steps": args.steps,
            "kills": kills,
            "restarts": restarts,
            "generations": final.generation,
            "reconfigurations": kinds.count("reconfigured"),
            "scale_ups": sum(1 for e in events if e.kind == "reconfiguring" and "scaled up" in e.message),
            "superseded": kinds.count("reconfigure_incomplete"),
            "max_abs_diff": worst,
            "problem": problem,
            "wall_s": round(time.monotonic() - self.t0, 2),
        }

    def restart(self, names: list[str]) -> None:
        """Hold training, restart the agents ``names``, release once each is in the plan (or judged
        of no use by the master)."""
        self.hold.write_text("step")
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
            self.hold.unlink(missing_ok=True)

    def close(self) -> None:
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
    p.add_argument("--kills", type=int, default=3, help="kill events (each kills 1..ft nodes)")
    p.add_argument("--restart-prob", type=float, default=0.5, help="chance that a killed node's agent restarts")
    p.add_argument(
        "--nested-prob", type=float, default=0.3,
        help="chance that a kill event with failure budget left kills one more node as the master installs the "
        "next generation (a failure during a reconfiguration)",
    )  # fmt: skip
    p.add_argument("--work-dir", default=None, help="default: a temporary directory, removed unless --keep")
    p.add_argument("--timeout-s", type=float, default=600.0)
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, checkpoints)")
    return p


class Terminated(Exception):
    """SIGTERM: unwind so that the cluster is stopped on the way out."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    if not 2 <= args.nodes <= 32 or not 0 <= args.ft < args.nodes or args.steps < 1 or args.kills < 0:
        print("chaos: need 2 <= --nodes <= 32, 0 <= --ft < --nodes, --steps >= 1, --kills >= 0", file=sys.stderr)
        return 2
    if not (0.0 <= args.restart_prob <= 1.0 and 0.0 <= args.nested_prob <= 1.0):
        print("chaos: --restart-prob and --nested-prob must be in [0, 1]", file=sys.stderr)
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
    print("| seed | nodes | ft | steps | kills | restarts | generations | scale-ups | max abs diff | equal |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {result['seed']} | {result['nodes']} | {result['ft']} | {result['steps']} | {result['kills']} | "
        f"{result['restarts']} | {result['generations']} | {result['scale_ups']} | {result['max_abs_diff']:.3g} | "
        f"{'yes' if result['ok'] else 'NO: ' + result['problem']} |"
    )
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
