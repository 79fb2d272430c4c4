"""The ``nlora compare`` recipe: several methods x seeds under one recipe, a Markdown table and a loss-curve PNG."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import sys
from pathlib import Path
from typing import Any

from ..config import LEGACY_DEFAULTS
from ..files import COMPARE_MARKER, OutputFolder, write_atomic
from ..rates import rate_spread, recommended_learning_rate
from .settings import NYSTROM_KNOBS, CompareSettings, TrainSettings, recorded_settings
from .train import run_train


def _mean_std(values: list[float]) -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.4g}"
    return f"{statistics.mean(values):.4g} ± {statistics.stdev(values):.2g}"


def run_key(settings: TrainSettings) -> str:
    """The file name a finished run is stored under: what distinguishes runs of one study."""
    key = f"{settings.method}-r{settings.r}-lr{settings.learning_rate:g}-seed{settings.seed}-steps{settings.max_steps}"
    if settings.method in ("nlora", "inttune"):  # a Nyström variant other than the store's first one is another run
        baseline = {f.name: f.default for f in dataclasses.fields(settings)} | LEGACY_DEFAULTS
        variant = [getattr(settings, name) for name in NYSTROM_KNOBS]
        if variant[:3] != [baseline[name] for name in NYSTROM_KNOBS[:3]]:
            key += "-{}-{}-p{:g}".format(*variant[:3])
        if settings.nystrom_square_landmarks != baseline["nystrom_square_landmarks"]:
            key += f"-square-{settings.nystrom_square_landmarks}"
    return key


def run_stored(settings: TrainSettings, store: Path | None, needs: tuple[str, ...] = ()) -> dict[str, Any]:
    """Train once, or reuse the run stored under ``store`` with exactly these settings and the summary keys ``needs``.

    The stored record holds the settings, the summary and the metric curves (``metrics.jsonl``), so tables and plots
    can be rebuilt, and a study extended or rerun elsewhere, without training again. A stored run that lacks a needed
    measurement is trained again; the run it replaces stays in the record (``first_run``: its summary and curves;
    ``rerun_of_after_loss``, a reproduction check), so that a view of the earlier runs still reads them.
    """
    path = store / f"{run_key(settings)}.json" if store is not None else None
    wanted = settings.comparable()
    previous = None
    if path is not None and path.exists():
        record = json.loads(path.read_text())
        if recorded_settings(record["settings"]) == wanted:
            if all(key in record["summary"] for key in needs):
                return record
            previous = record
    summary = run_train(settings)
    lines = (Path(settings.output_dir) / "metrics.jsonl").read_text().splitlines()
    record = {"settings": wanted, "summary": summary, "metrics": [json.loads(line) for line in lines]}
    if previous is not None:
        record["rerun_of_after_loss"] = previous["summary"].get("after_loss")
        record["first_run"] = previous.get("first_run") or {k: previous[k] for k in ("summary", "metrics")}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(record, indent=1))
    return record


def run_compare(
    base: TrainSettings, methods: list[str], seeds: list[int], out_dir: str, store: Path | None = None
) -> Path:
    """Train every method with every seed (same settings otherwise); write ``compare.md``, ``compare.json``, PNG.

    Finished runs are stored (default: ``out_dir/runs``) and reused, so an interrupted comparison resumes.
    """
    folder = OutputFolder(out_dir, COMPARE_MARKER, replace_own=True, inputs=[base.data, base.model])
    folder.check()
    out = folder.path
    store = store or out / "runs"
    shared = base.learning_rate_source == "given"  # else every method trains at its own recommended rate
    warning = shared_rate_warning(base.learning_rate, methods, base.task) if shared else None
    if warning:
        print(f"nlora: warning: {warning}", file=sys.stderr)
    folder.acquire()
    finished = False
    try:
        out.mkdir(parents=True, exist_ok=True)
        folder.write_marker()  # the folder is ours from now on: its runs and tables may be replaced
        records = []
        for method in methods:
            for seed in seeds:
                run_dir = out / f"{method}-seed{seed}"
                own_rate = {} if shared else {"learning_rate": None}
                settings = dataclasses.replace(
                    base, method=method, seed=seed, output_dir=str(run_dir), resume=False, overwrite=True, **own_rate
                )
                settings.validate()
                records.append(run_stored(settings, store))
        summaries = [{"learning_rate": r["settings"]["learning_rate"], **r["summary"]} for r in records]
        table = markdown_table(summaries)
        write_atomic(out / "compare.json", json.dumps(records, indent=2))
        write_atomic(out / "compare.md", f"**Warning:** {warning}\n\n{table}" if warning else table)
        plot_losses(records, out / "compare.png")
        finished = True
    finally:
        folder.release(finished)
    return out / "compare.md"


def run_tuned_compare(base: TrainSettings, compare: CompareSettings, out_dir: str) -> Path:
    """``nlora compare --tune``: the study's protocol (:mod:`nlora.cli.tune`) on the user's data and model; writes
    ``tune.md``, ``tune.json`` and ``tune.png`` (validation loss against rate) and stores every run in ``runs/``."""
    from .. import stats
    from .tune import RateSearch, base_loss, compare_selections, plot_rate_sensitivity, tune_report

    folder = OutputFolder(out_dir, COMPARE_MARKER, replace_own=True, inputs=[base.data, base.model])
    folder.check()
    out = folder.path
    validation = base.validation_samples or base.max_eval_samples  # select on as many rows as are reported
    base = dataclasses.replace(base, validation_samples=validation, eval_before=True, save_steps=0)
    base.validate()
    methods, seeds = compare.method_list(), compare.seed_list()
    folder.acquire()
    finished = False
    try:
        out.mkdir(parents=True, exist_ok=True)
        folder.write_marker()
        search = RateSearch(base, methods, seeds, out / "runs", out / "tune-runs", points=compare.grid_points,
                            extensions=compare.grid_extensions,
                            progress=lambda line: print(line, file=sys.stderr, flush=True))  # fmt: skip
        planned = f"at least {search.planned_runs()} runs of {base.max_steps} steps"
        print(f"nlora: compare --tune: {planned}", file=sys.stderr)
        for method in methods:  # every method's grid first: a partial search is already balanced
            search.select_grid(method)
        selections = {method: search.select(method) for method in methods}
        found = base_loss(selections, search)
        threshold = stats.collapse_threshold(base.task, base.num_labels, found)
        rows = compare_selections(selections, compare.baseline, threshold, compare.margin)
        report = tune_report(selections, rows, compare.baseline, threshold, compare.margin)
        record = {"settings": base.comparable(), "baseline": compare.baseline, "collapse_threshold": threshold,
                  "margin": compare.margin,
                  "base_loss": found, "selections": {m: dataclasses.asdict(s) for m, s in selections.items()},
                  "rows": rows}  # fmt: skip
        write_atomic(out / "tune.json", json.dumps(record, indent=1, default=str))
        write_atomic(out / "tune.md", report)
        plot_rate_sensitivity(selections, out / "tune.png")
        finished = True
    finally:
        folder.release(finished)
    return out / "tune.md"


def shared_rate_warning(learning_rate: float, methods: list[str], task: str) -> str | None:
    """One sentence when one rate is given to methods whose recommended rates differ by more than 3x."""
    spread = rate_spread(methods, task)
    if spread <= 3:
        return None
    own = ", ".join(f"{m} {recommended_learning_rate(m, task):g}" for m in methods)
    return (
        f"one learning rate ({learning_rate:g}) for methods whose recommended rates differ {spread:.0f}x ({own}) "
        "favours the methods it suits, which is how a shared-rate comparison manufactures a winner; leave out "
        "--learning-rate to give each method its own rate."
    )


def markdown_table(summaries: list[dict[str, Any]]) -> str:
    """One row per method: mean ± std over seeds."""
    metric = next((k for k in ("after_accuracy", "after_pearson") if any(k in s for s in summaries)), None)
    header = [
        "method",
        "learning rate",
        "seeds",
        "trainable params",
        "init s",
        "step s (median)",
        "peak memory MB",
        "final train loss",
        "held-out loss",
    ] + ([metric.removeprefix("after_")] if metric else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method in dict.fromkeys(s["method"] for s in summaries):
        rows = [s for s in summaries if s["method"] == method]
        cells = [
            method,
            ", ".join(f"{lr:g}" for lr in dict.fromkeys(r["learning_rate"] for r in rows if "learning_rate" in r)),
            str(len(rows)),
            f"{rows[0]['trainable_params']:,}",
            _mean_std([r["init_seconds"] for r in rows]),
            _mean_std([r["step_seconds_median"] for r in rows]),
            _mean_std([r["peak_memory_mb"] for r in rows]),
            _mean_std([r["train_loss"] for r in rows]),
            _mean_std([r.get("after_loss") for r in rows]),
        ]
        if metric:
            cells.append(_mean_std([r.get(metric) for r in rows]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_losses(records: list[dict[str, Any]], path: Path) -> None:
    """Training loss against step, mean over seeds, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(r["summary"]["method"] for r in records):
        curves = [
            {m["step"]: m["loss"] for m in r["metrics"] if "loss" in m}
            for r in records
            if r["summary"]["method"] == method
        ]
        steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        ax.plot(steps, [statistics.mean(c[s] for c in curves) for s in steps], label=method)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (mean over seeds)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=120, format="png")
    os.replace(tmp, path)  # a user's compare.png is never half-overwritten
    plt.close(fig)
