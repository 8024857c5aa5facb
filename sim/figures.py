"""The published comparison figures: throughput vs failure frequency, and the GCP / EC2 traces."""

from __future__ import annotations

import csv
import dataclasses
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

from oobleck.sim.engine import Compat, Result, compat_preset, simulate
from oobleck.sim.inputs import CLOUD_TRACES, FREQUENCY_TRACES, SYSTEMS, load_paper_inputs, load_trace, system_inputs

logger = logging.getLogger(__name__)

COLORS = {"oobleck": "#1b9e77", "varuna": "#d95f02", "bamboo": "#7570b3"}
CSV_FIELDS = (
    "figure",
    "model",
    "trace",
    "system",
    "compat",
    "throughput_sps",
    "steps_kept",
    "window_s",
    "useful_s",
    "lost_s",
    "reconfiguration_s",
    "checkpoint_s",
    "stopped_s",
)


@dataclasses.dataclass(frozen=True)
class Run:
    figure: str  # "frequency" | "cloud"
    model: str
    trace: str
    system: str
    compat: str


def planned_runs(models: Iterable[str], compats: Iterable[str]) -> list[Run]:
    runs = []
    for compat in compats:
        for model in models:
            for system in SYSTEMS:
                runs.extend(Run("frequency", model, t, system, compat) for t in FREQUENCY_TRACES)
                runs.extend(Run("cloud", model, t, system, compat) for t in CLOUD_TRACES.values())
    return runs


def run_one(run: Run, data: dict | None = None) -> Result:
    compat: Compat = compat_preset(run.compat)
    inputs = system_inputs(run.model, run.system, data)
    if (
        run.figure == "cloud"
        and run.system == "varuna"
        and compat.legacy_bookkeeping
        and inputs.extra.get("rollback_disabled_when_no_small_model_fallback")
    ):
        # The published GCP/EC2 script runs Varuna with no_small_model_fallback: no rollback for the
        # three small models. Reproduced with the research bookkeeping only.
        inputs = dataclasses.replace(inputs, no_rollback=True)
    return simulate(inputs, load_trace(run.trace), compat)


def _row(run: Run, r: Result) -> dict:
    b = r.breakdown
    return {
        "figure": run.figure,
        "model": run.model,
        "trace": run.trace,
        "system": run.system,
        "compat": run.compat,
        "throughput_sps": f"{r.throughput_sps:.6g}",
        "steps_kept": r.steps_kept,
        "window_s": f"{b.window_s:.3f}",
        "useful_s": f"{b.useful_s:.3f}",
        "lost_s": f"{b.lost_s:.3f}",
        "reconfiguration_s": f"{b.reconfiguration_s:.3f}",
        "checkpoint_s": f"{b.checkpoint_s:.3f}",
        "stopped_s": f"{b.stopped_s:.3f}",
    }


def model_slug(model: str) -> str:
    """``GPT-3-6_7b`` -> ``gpt3-6_7b``, ``BERT-large`` -> ``bert-large``."""
    return model.lower().replace("gpt-3-", "gpt3-")


def write_figures(
    out_dir: str | Path,
    *,
    models: Iterable[str] | None = None,
    compat: str = "intent",
    reference: str | None = "research",
    progress: Callable[[Iterable], Iterable] | None = None,
) -> list[Path]:
    """Run every (model, trace, system) and write PNG figures plus ``results.csv`` into ``out_dir``.

    ``compat`` gives the bars; ``reference`` (if not None) is drawn as markers on top of them.
    Returns the files written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = load_paper_inputs()
    models = list(models) if models is not None else list(data["models"])
    compats = [compat] if reference in (None, compat) else [compat, reference]
    runs = planned_runs(models, compats)
    results: dict[Run, Result] = {}
    for run in progress(runs) if progress else runs:
        results[run] = run_one(run, data)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "results.csv"]
    with open(written[0], "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for run, r in results.items():
            writer.writerow(_row(run, r))

    def tput(figure: str, model: str, trace: str, system: str, c: str) -> float:
        return results[Run(figure, model, trace, system, c)].throughput_sps

    for model in models:
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        _bars(ax, list(FREQUENCY_TRACES), compats, lambda t, s, c, m=model: tput("frequency", m, t, s, c))
        ax.set_xticks(range(len(FREQUENCY_TRACES)), [f"every {t}" for t in FREQUENCY_TRACES])
        ax.set_xlabel("one node lost (30 nodes down to 16)")
        ax.set_title(f"{model}: throughput vs failure frequency")
        written.append(_save(fig, out / f"tput-vs-freq-{model_slug(model)}.png", plt))

    fig, axes = plt.subplots(len(CLOUD_TRACES), len(models), figsize=(2.4 * len(models), 5.2), squeeze=False)
    for row, (label, trace) in enumerate(CLOUD_TRACES.items()):
        for col, model in enumerate(models):
            ax = axes[row][col]
            _bars(ax, [None], compats, lambda _x, s, c, m=model, t=trace: tput("cloud", m, t, s, c), legend=False)
            ax.set_xticks([])
            ax.set_title(f"{model} / {label}", fontsize=8)
            if col:
                ax.set_ylabel("")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    written.append(_save(fig, out / "cloud-traces.png", plt, tight=False))
    return written


def _bars(ax, xs, compats, value, *, legend: bool = True) -> None:
    width = 0.26
    main, ref = compats[0], (compats[1] if len(compats) > 1 else None)
    for i, system in enumerate(SYSTEMS):
        pos = [j + (i - 1) * width for j in range(len(xs))]
        vals = [value(x, system, main) for x in xs]
        ax.bar(pos, vals, width, label=system, color=COLORS[system])
        for p, v in zip(pos, vals, strict=True):
            if v == 0:
                ax.annotate("0", (p, 0), ha="center", va="bottom", fontsize=7)
        if ref:
            refs = [value(x, system, ref) for x in xs]
            label = f"{ref} simulator" if i == 0 else None
            ax.scatter(pos, refs, marker="_", s=120, linewidths=2, color="black", zorder=3, label=label)
    ax.set_ylabel("samples/s", fontsize=8)
    ax.tick_params(labelsize=7)
    if legend:
        ax.legend(fontsize=7)


def _save(fig, path: Path, plt, *, tight: bool = True) -> Path:
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=120, metadata={"Software": None})
    plt.close(fig)
    return path
