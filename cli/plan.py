"""``oobleckctl plan``: preview the planner's output offline (docs/planner.md "Command line").

    oobleckctl plan templates   --profile P.json --cluster C.json --ft F [--min-nodes N0] --microbatches B
    oobleckctl plan instantiate --profile P.json --cluster C.json --ft F [--min-nodes N0] --microbatches B [--nodes M]
    oobleckctl plan reconfigure --pipelines '[[0,1],[2,3,4]]' --lost 1,3 --template-sizes 2-5
                                [--profile P.json --cluster C.json --microbatches B [--ft F]]

JSON with ``--json``, a readable table otherwise. Errors: exit status 2 and one line on stderr
naming the violated constraint.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from oobleck.planner.errors import InvalidInputError, PlannerError

EXIT_ERROR = 2


class _OneLineParser(argparse.ArgumentParser):
    """Usage errors as a single line (the planner commands' error contract)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message}\n")


def add_plan_command(subparsers: argparse._SubParsersAction) -> None:
    """Register ``plan`` and its three subcommands on ``oobleckctl``'s subparsers."""
    plan = subparsers.add_parser(
        "plan",
        help="preview plans offline: templates, instantiation, reconfiguration",
        description="Preview the planner's output offline (no master needed).",
    )
    plan.set_defaults(func=lambda args: _usage(plan))
    sub = plan.add_subparsers(dest="plan_command", metavar="PLAN_COMMAND", parser_class=_OneLineParser)

    def planning_inputs(p: argparse.ArgumentParser, required: bool) -> None:
        p.add_argument("--profile", required=required, metavar="P.json", help="model profile (oobleck-profile/1)")
        p.add_argument("--cluster", required=required, metavar="C.json", help="cluster description (JSON)")
        p.add_argument("--microbatches", type=int, required=required, metavar="B", help="global batch in microbatches")

    t = sub.add_parser("templates", help="pipeline templates and the node specification")
    planning_inputs(t, True)
    t.add_argument("--ft", type=int, required=True, metavar="F", help="node failures to tolerate")
    t.add_argument("--min-nodes", type=int, metavar="N0", help="smallest pipeline (default: smallest that fits)")
    t.add_argument("--json", action="store_true", help="print JSON instead of a table")
    t.set_defaults(func=lambda args: _run(_templates, args))

    i = sub.add_parser("instantiate", help="pipelines and batch split for a node count")
    planning_inputs(i, True)
    i.add_argument("--ft", type=int, required=True, metavar="F", help="node failures to tolerate")
    i.add_argument("--min-nodes", type=int, metavar="N0", help="smallest pipeline (default: smallest that fits)")
    i.add_argument("--nodes", type=int, metavar="M", help="available nodes, ids 0..M-1 (default: the cluster's)")
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")
    i.set_defaults(func=lambda args: _run(_instantiate, args))

    r = sub.add_parser("reconfigure", help="pipelines, ranks and layer copies after node failures")
    r.add_argument("--pipelines", required=True, metavar="JSON", help="current pipelines, e.g. '[[0,1],[2,3,4]]'")
    r.add_argument("--lost", required=True, metavar="IDS", help="lost node ids, comma-separated (may be empty)")
    r.add_argument("--template-sizes", required=True, metavar="A-B", help="template sizes, e.g. 2-5")
    planning_inputs(r, False)
    r.add_argument("--ft", type=int, default=0, metavar="F", help="failures to tolerate when re-instantiating")
    r.add_argument("--json", action="store_true", help="print JSON instead of a table")
    r.set_defaults(func=lambda args: _run(_reconfigure, args))


def _usage(parser: argparse.ArgumentParser) -> int:
    print(f"{parser.prog}: error: a subcommand is required (templates, instantiate, reconfigure)", file=sys.stderr)
    return EXIT_ERROR


def _run(func, args: argparse.Namespace) -> int:
    try:
        result, text = func(args)
    except PlannerError as exc:
        message = " ".join(str(exc).split())
        print(f"oobleckctl plan {args.plan_command}: error: {message}", file=sys.stderr)
        return EXIT_ERROR
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(text)
    return 0


# ---- inputs ---------------------------------------------------------------------------------


def _load_cluster(path: str):
    from oobleck.planner.types import Cluster

    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise InvalidInputError(f"{path}: cannot read cluster: {exc.strerror or exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"{path}: malformed JSON at line {exc.lineno}: {exc.msg}") from exc
    try:
        return Cluster.from_dict(data)
    except InvalidInputError as exc:
        raise InvalidInputError(f"{path}: {exc}") from exc
    except TypeError as exc:  # a dataclass argument of the wrong kind
        raise InvalidInputError(f"{path}: {exc}") from exc


def _load_inputs(args: argparse.Namespace):
    from oobleck.planner import load_profile

    if args.microbatches is not None and args.microbatches < 1:
        raise InvalidInputError(f"--microbatches: must be >= 1, got {args.microbatches}")
    return load_profile(args.profile), _load_cluster(args.cluster)


def _parse_pipelines(text: str) -> list[list[int]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"--pipelines: malformed JSON: {exc.msg} at column {exc.colno}") from exc
    if not isinstance(data, list) or not all(isinstance(p, list) for p in data):
        raise InvalidInputError(f"--pipelines: expected a list of lists of node ids, got {text!r}")
    for i, p in enumerate(data):
        for j, n in enumerate(p):
            if isinstance(n, bool) or not isinstance(n, int):
                raise InvalidInputError(f"--pipelines: pipelines[{i}][{j}]: expected an integer node id, got {n!r}")
    return data


def _parse_lost(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            out.append(int(part))
        except ValueError:
            raise InvalidInputError(f"--lost: expected comma-separated node ids, got {part!r}") from None
    return out


def _parse_sizes(text: str) -> tuple[int, int]:
    lo_text, sep, hi_text = text.partition("-")
    try:
        lo = int(lo_text)
        hi = int(hi_text) if sep else lo
    except ValueError:
        raise InvalidInputError(f"--template-sizes: expected A-B (e.g. 2-5), got {text!r}") from None
    if lo < 1 or hi < lo:
        raise InvalidInputError(f"--template-sizes: need 1 <= A <= B, got {text!r}")
    return lo, hi


# ---- JSON shapes --------------------------------------------------------------------------------


def templates_json(ts) -> dict[str, Any]:
    spec = ts.node_spec
    node_spec = {
        "min_nodes": spec.min_nodes,
        "max_nodes": spec.max_nodes,
        "ft": spec.ft,
        "guaranteed_range": list(spec.guaranteed_range),
    }
    if spec.uncovered:
        node_spec["uncovered"] = list(spec.uncovered)
    return {
        "node_spec": node_spec,
        "templates": [
            {
                "num_nodes": t.num_nodes,
                "num_stages": t.num_stages,
                "iteration_ms": t.iteration_ms,
                "bottleneck_ms": t.bottleneck_ms,
                "gap": t.gap,
                "stages": [
                    {
                        "layers": list(s.layers),
                        "node": s.node,
                        "gpus": s.gpus,
                        "latency_ms": s.latency_ms,
                        "memory_bytes": s.memory_bytes,
                    }
                    for s in t.stages
                ],
            }
            for t in ts.templates
        ],
    }


def instantiation_json(inst) -> dict[str, Any]:
    return {
        "pipelines": [
            {
                "template_nodes": p.template_nodes,
                "nodes": list(p.nodes),
                "microbatches": p.microbatches,
                "estimated_ms": p.estimated_ms,
            }
            for p in inst.pipelines
        ],
        "iteration_ms": inst.iteration_ms,
        "sync_ms": inst.sync_ms,
        "degraded": inst.degraded,
        "spares": list(inst.spares),
    }


def _table(header: list[str], rows: list[list[Any]]) -> str:
    cells = [header, *[[_cell(v) for v in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    # Numbers right-aligned, the last (free text) column left-aligned.
    return "\n".join(
        "  ".join(
            c.ljust(w) if i == len(r) - 1 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ).rstrip()
        for r in cells
    )


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def _nodes_text(nodes) -> str:
    return ",".join(map(str, nodes))


# ---- commands -----------------------------------------------------------------------------------


def _plan_templates(args: argparse.Namespace, profile, cluster):
    from oobleck.planner.templates import plan_templates  # lazily: the template planner is separate

    return plan_templates(profile, cluster, ft=args.ft, microbatches=args.microbatches, min_nodes=args.min_nodes)


def _templates(args: argparse.Namespace):
    profile, cluster = _load_inputs(args)
    ts = _plan_templates(args, profile, cluster)
    spec = ts.node_spec
    lines = [
        f"node specification: sizes {spec.min_nodes}..{spec.max_nodes}, ft {spec.ft}, "
        f"guaranteed for {spec.guaranteed_range[0]}..{spec.guaranteed_range[1]} nodes"
        + (f" (uncovered: {_nodes_text(spec.uncovered)})" if spec.uncovered else ""),
        "",
        _table(
            ["nodes", "stages", "iteration_ms", "bottleneck_ms", "gap", "layers per stage (node:gpus)"],
            [
                [
                    t.num_nodes,
                    t.num_stages,
                    t.iteration_ms,
                    t.bottleneck_ms,
                    f"{t.gap:.2%}",
                    " ".join(f"[{s.layers[0]},{s.layers[1]})@{s.node}:{s.gpus}" for s in t.stages),
                ]
                for t in ts.templates
            ],
        ),
    ]
    return templates_json(ts), "\n".join(lines)


def _instantiate(args: argparse.Namespace):
    from oobleck.planner import instantiate

    profile, cluster = _load_inputs(args)
    m = cluster.nodes if args.nodes is None else args.nodes
    if m < 0:
        raise InvalidInputError(f"--nodes: must be >= 0, got {m}")
    ts = _plan_templates(args, profile, cluster)
    inst = instantiate(ts, profile, cluster, list(range(m)), microbatches=args.microbatches)
    rows = [
        [i, p.template_nodes, p.microbatches, p.estimated_ms, _nodes_text(p.nodes)]
        for i, p in enumerate(inst.pipelines)
    ]
    lines = [
        _table(["pipeline", "template_nodes", "microbatches", "estimated_ms", "nodes"], rows),
        "",
        f"iteration {inst.iteration_ms:.3f} ms (slowest pipeline + sync {inst.sync_ms:.3f} ms), "
        f"{len(inst.pipelines)} pipelines on {m - len(inst.spares)} of {m} nodes",
    ]
    if inst.degraded:
        lines.append(f"degraded: fewer than ft + 1 = {ts.node_spec.ft + 1} pipelines (too few nodes)")
    if inst.spares:
        lines.append(f"spares: {_nodes_text(inst.spares)}")
    return instantiation_json(inst), "\n".join(lines)


def _restrict_templates(ts, lo: int, hi: int, ft: int):
    from oobleck.planner.types import NodeSpec, TemplateSet

    chosen = tuple(t for t in ts.templates if lo <= t.num_nodes <= hi)
    missing = sorted(set(range(lo, hi + 1)) - {t.num_nodes for t in chosen})
    if missing:
        raise InvalidInputError(
            f"--template-sizes: no feasible template for {_nodes_text(missing)} nodes with this profile and cluster "
            f"(the planner's sizes are {ts.node_spec.min_nodes}-{ts.node_spec.max_nodes})"
        )
    spec = NodeSpec(
        min_nodes=lo, max_nodes=hi, ft=ft, guaranteed_range=((ft + 1) * lo, ts.node_spec.guaranteed_range[1])
    )
    return TemplateSet(node_spec=spec, templates=chosen)


def _reconfigure(args: argparse.Namespace):
    from oobleck.planner import reconfigure, reconfigure_pipelines

    pipelines = _parse_pipelines(args.pipelines)
    lost = _parse_lost(args.lost)
    lo, hi = _parse_sizes(args.template_sizes)
    given = {"--profile": args.profile, "--cluster": args.cluster, "--microbatches": args.microbatches}
    if any(v is not None for v in given.values()) and not all(v is not None for v in given.values()):
        missing = ", ".join(k for k, v in given.items() if v is None)
        raise InvalidInputError(f"{missing}: required together with the other planning inputs")
    if args.profile is None:
        new = reconfigure_pipelines(pipelines, lost, min_nodes=lo)
        for p in new:
            if not lo <= len(p) <= hi:
                raise InvalidInputError(
                    f"pipeline {p} has {len(p)} nodes but template sizes are {lo}-{hi}: re-instantiating needs "
                    "--profile, --cluster and --microbatches"
                )
        ranks, rank = {}, 0
        for p in new:
            for n in p:
                ranks[n] = [rank]
                rank += 1
        removed = sorted({n for p in pipelines for n in p} & set(lost))
        reason = f"removed lost node(s) {removed}" if removed else "no pipeline lost a node"
        reason += f"; {len(new)} pipelines of sizes {[len(p) for p in new]}"
        result = {
            "pipelines": [{"nodes": p, "template_nodes": len(p)} for p in new],
            "ranks": {str(n): r for n, r in ranks.items()},
            "reason": reason,
        }
        rows = [[i, len(p), "-", _nodes_text(p)] for i, p in enumerate(new)]
        text = "\n".join(
            [
                _table(["pipeline", "template_nodes", "microbatches", "nodes"], rows),
                "",
                f"ranks: 0..{rank - 1} (1 GPU per node without --cluster)",
                f"reason: {reason}",
            ]
        )
        return result, text

    profile, cluster = _load_inputs(args)
    from oobleck.planner.templates import plan_templates

    ts = plan_templates(profile, cluster, ft=args.ft, microbatches=args.microbatches, min_nodes=lo)
    ts = _restrict_templates(ts, lo, hi, args.ft)
    rec = reconfigure(pipelines, lost, templates=ts, profile=profile, cluster=cluster, microbatches=args.microbatches)
    result = {
        "pipelines": [
            {"nodes": list(p.nodes), "template_nodes": p.template_nodes, "microbatches": p.microbatches}
            for p in rec.pipelines
        ],
        "ranks": {str(n): list(r) for n, r in rec.ranks.items()},
        "copies": [{"layer": c.layer, "src": c.src, "dst": c.dst, "bytes": c.bytes} for c in rec.copies],
        "copy_ms": rec.copy_ms,
        "restore_layers": list(rec.restore_layers),
        "spares": list(rec.spares),
        "reason": rec.reason,
    }
    rows = [[i, p.template_nodes, p.microbatches, _nodes_text(p.nodes)] for i, p in enumerate(rec.pipelines)]
    world = sum(len(r) for r in rec.ranks.values())
    lines = [
        _table(["pipeline", "template_nodes", "microbatches", "nodes"], rows),
        "",
        f"ranks: 0..{world - 1} ({cluster.gpus_per_node} per node)",
        f"copies: {len(rec.copies)} ({sum(c.bytes for c in rec.copies)} bytes), estimated {rec.copy_ms:.3f} ms",
    ]
    if rec.copies:
        lines.append(_table(["layer", "src", "dst", "bytes"], [[c.layer, c.src, c.dst, c.bytes] for c in rec.copies]))
    if rec.restore_layers:
        lines.append(f"restore from checkpoint: layers {_nodes_text(rec.restore_layers)}")
    if rec.spares:
        lines.append(f"spares: {_nodes_text(rec.spares)}")
    lines.append(f"reason: {rec.reason}")
    return result, "\n".join(lines)
