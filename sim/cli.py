"""``oobleck-sim``: compare fault-tolerance policies under a node add/remove trace."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from oobleck.common.cli import base_parser
from oobleck.common.logs import setup_logging
from oobleck.sim.engine import COMPAT_PRESETS, Result, simulate
from oobleck.sim.inputs import SYSTEMS, SimInputError, load_trace, model_names, system_inputs, trace_names

DESCRIPTION = """\
Simulate a training cluster under a node add/remove trace with Oobleck, Varuna or Bamboo.
"""


def build_parser():
    parser = base_parser("oobleck-sim", DESCRIPTION)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    run = sub.add_parser("run", help="simulate one system on one trace and print its throughput")
    run.add_argument("--model", help=f"a model of the published measurements ({', '.join(model_names())})")
    run.add_argument(
        "--trace",
        required=True,
        help=f"a CSV file or a bundled trace ({', '.join(trace_names())}; gcp and ec2 are aliases)",
    )
    run.add_argument("--system", required=True, choices=SYSTEMS)
    run.add_argument(
        "--compat",
        default="intent",
        choices=sorted(COMPAT_PRESETS),
        help="intent (default): the documented behaviour; research: reproduce the published simulators' "
        "accidents; research-fifo: research with FIFO tie-breaking",
    )
    run.add_argument("--json", action="store_true", help="print one JSON object")
    plan = run.add_argument_group("own model (oobleck only): throughput table from the planner")
    plan.add_argument("--profile", help="a layer profile (oobleck-profile/1 JSON); replaces --model")
    plan.add_argument("--cluster", help="cluster JSON for the planner (nodes is set to --max-nodes)")
    plan.add_argument("--microbatches", type=int, help="global batch in microbatches")
    plan.add_argument("--ft", type=int, default=0, help="fault tolerance f for the templates (default 0)")
    plan.add_argument("--max-nodes", type=int, default=30, help="largest node count to plan for (default 30)")
    plan.add_argument("--reconfiguration-s", type=float, default=10.0, help="cost of one reconfiguration")

    fig = sub.add_parser("figures", help="write the comparison figures (PNG) and their data (CSV)")
    fig.add_argument("--out", required=True, help="output folder")
    fig.add_argument("--models", nargs="*", help="models to include (default: all)")
    fig.add_argument("--compat", default="intent", choices=sorted(COMPAT_PRESETS), help="semantics of the bars")
    fig.add_argument(
        "--reference",
        default="research",
        choices=[*sorted(COMPAT_PRESETS), "none"],
        help="semantics drawn as markers over the bars (default research; none to omit)",
    )
    fig.add_argument("--no-progress", action="store_true", help="no progress bar")

    sens = sub.add_parser("sensitivity", help="how much each --compat research accident moves the results")
    sens.add_argument("--no-progress", action="store_true", help="no progress bar")

    sub.add_parser("list", help="list the bundled models and traces")
    return parser


def format_result(r: Result) -> str:
    b = r.breakdown
    lines = [
        f"{r.system} on {r.trace} ({r.model or 'custom'}, compat {r.compat}): {r.throughput_sps:.4g} samples/s",
        f"  steps kept {r.steps_kept} of {r.steps_completed} completed; reconfigurations {r.reconfigurations}, "
        f"restarts {r.restarts}, checkpoints {r.checkpoints} ({r.failed_checkpoints} failed), stops {r.stops}",
        f"  time over {b.window_s:.1f} s:",
    ]
    for label, value in (
        ("useful work", b.useful_s),
        ("lost work", b.lost_s),
        ("reconfiguration/restart", b.reconfiguration_s),
        ("checkpoint", b.checkpoint_s),
        ("stopped (too few nodes)", b.stopped_s),
    ):
        share = 100 * value / b.window_s if b.window_s else 0.0
        lines.append(f"    {label:<26}{value:12.1f} s {share:6.1f} %")
    if b.redundant_s:
        lines.append(f"    (of useful work, redundant computation {b.redundant_s:.1f} s)")
    return "\n".join(lines)


def _run(args) -> int:
    trace = load_trace(args.trace)
    if args.profile:
        if args.system != "oobleck":
            raise SimInputError("--profile: only the oobleck system can use the planner's table")
        if not args.cluster or not args.microbatches:
            raise SimInputError("--profile: needs --cluster and --microbatches")
        from oobleck.sim.planner_table import planner_system_inputs

        inputs = planner_system_inputs(
            args.profile,
            args.cluster,
            microbatches=args.microbatches,
            ft=args.ft,
            max_nodes=args.max_nodes,
            reconfiguration_s=args.reconfiguration_s,
        )
    else:
        if not args.model:
            raise SimInputError("--model: required unless --profile is given")
        inputs = system_inputs(args.model, args.system)
    result = simulate(inputs, trace, args.compat)
    if args.json:
        print(json.dumps(result.to_dict(), sort_keys=True))
    else:
        print(format_result(result))
    return 0


def _progress(args):
    if args.no_progress:
        return None
    from tqdm import tqdm

    def progress(runs):
        return tqdm(runs, desc="simulations", unit="run", file=sys.stderr)

    return progress


def _figures(args) -> int:
    from oobleck.sim.figures import write_figures

    progress = _progress(args)

    models = args.models or None
    if models:
        known = model_names()
        for m in models:
            if m not in known:
                raise SimInputError(f"--models: unknown model {m!r} (known: {', '.join(known)})")
    reference = None if args.reference == "none" else args.reference
    files = write_figures(args.out, models=models, compat=args.compat, reference=reference, progress=progress)
    for f in files:
        print(f)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "figures":
            return _figures(args)
        if args.command == "sensitivity":
            from oobleck.sim.sensitivity import format_changes, sensitivity

            print(format_changes(sensitivity(_progress(args))))
            return 0
        print("models:", ", ".join(model_names()))
        print("traces:", ", ".join(trace_names()))
        return 0
    except SimInputError as exc:
        print(f"oobleck-sim: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
