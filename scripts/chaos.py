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

This file is the command line; the drill is in the modules beside it: ``chaos_schedule`` (the
seeded choices: event steps and kinds, victims), ``chaos_job`` (the job and the reference check)
and ``chaos_drill`` (the cluster, the faults, the verdict).

Usage: python scripts/chaos.py --seed S --nodes N --ft F --steps K --kills R
       [--faults kill,overkill,master,freeze] [--restart-prob P] [--nested-prob Q]
       [--master-down-s A-B] [--freeze-s A-B] [--work-dir DIR] [--timeout-s T] [--keep]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import shutil
import signal
import sys
import tempfile
from pathlib import Path

# The drill's modules live beside this file: importable when it runs as a script and when a test
# loads it by path.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from chaos_drill import ChaosError, Drill
from chaos_schedule import (
    CHECKPOINT_INTERVAL,
    FAULT_KINDS,
    choose_during_reconfiguration,
    choose_overkill,
    choose_victims,
    fault_schedule,
    kill_steps,
    layer_holders,
)

from oobleck.cli.local_cluster import ClusterError


def parse_range(text: str, what: str) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in text.split("-", 1)) if "-" in text else (float(text),) * 2
    except ValueError:
        raise ValueError(f"{what}: expected A-B seconds, got {text!r}") from None
    if not 0 <= lo <= hi:
        raise ValueError(f"{what}: need 0 <= A <= B, got {text!r}")
    return lo, hi


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


__all__ = [
    "CHECKPOINT_INTERVAL",
    "FAULT_KINDS",
    "ChaosError",
    "Drill",
    "build_parser",
    "check_args",
    "choose_during_reconfiguration",
    "choose_overkill",
    "choose_victims",
    "fault_schedule",
    "kill_steps",
    "layer_holders",
    "main",
    "parse_range",
]


if __name__ == "__main__":
    sys.exit(main())
