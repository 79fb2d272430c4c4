"""Benchmark 3: convergence of LoRA, PiSSA, SLoRA, nlora_reference, NLoRA and IntTune under one recipe.

Run:  python bench/convergence.py --tasks sentiment          (MiniLM, 300 steps of batch 16; ~2.5 min a run here)
      python bench/convergence.py --tasks math               (SmolLM2-135M, 150 steps of batch 4; ~10 min a run)
      python bench/convergence.py --report-only              (rebuild tables and plot from the stored runs)
      python bench/convergence.py --tiny ...                 (a tiny model; smoke test)

Protocol: per method a 3-point log-spaced learning-rate grid at the first seed (IntTune has its own, higher range);
the rate with the lowest final held-out loss is then run with the other seeds. An IntTune rank sweep runs at
IntTune's best rate. Every finished run is stored as JSON under docs/bench-results/runs/<task>/ (settings, summary,
metric curves) by ``nlora compare``'s runner and reused, so the study can be extended or rerun on a GPU without
recomputing; the tables, Welch tests and the plot are rebuilt from the stored runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import warnings
from pathlib import Path

from common import DOCS, RESULTS, machine, markdown, update_section, write_results

from nlora.cli.compare import run_key, run_stored
from nlora.cli.settings import TrainSettings

warnings.filterwarnings("ignore")
METHODS = ["lora", "pissa", "slora", "nlora-reference", "nlora", "inttune"]
LR_GRID = {
    "sentiment": {"default": [3e-4, 1e-3, 3e-3, 1e-2], "inttune": [3e-3, 1e-2, 3e-2, 1e-1]},
    # math: the zero-start methods' grid is centred on LoRA's best math rate (3e-3, found by extending the default
    # grid twice), IntTune's a half-decade above it (on sentiment its best rate was 10x LoRA's): fewer extension runs
    "math": {"default": [1e-4, 3e-4, 1e-3], "slora": [1e-3, 3e-3, 1e-2], "nlora-reference": [1e-3, 3e-3, 1e-2],
             "inttune": [3e-3, 1e-2, 3e-2]},
}  # fmt: skip
RUN_ORDER = ["lora", "nlora", "pissa", "inttune", "slora", "nlora-reference"]
BUDGET = {"sentiment": 300, "math": 150}
SWEEP_RANKS = [4, 8, 16]
MAX_EXTENSIONS = 2  # grid points added beyond an edge where the best rate lies


def task_settings(task: str, steps: int, tiny_model: str | None = None, tiny_data: str | None = None) -> TrainSettings:
    """The one recipe of a task; only method, learning rate, seed and rank vary within the study."""
    every = max(1, steps // 10)
    if tiny_model:
        return TrainSettings(model=tiny_model, data=tiny_data, max_steps=steps, r=4, max_length=192, save_steps=0,
                             eval_steps=max(1, steps // 2), max_eval_samples=8, eval_before=False)  # fmt: skip
    if task == "math":
        # bf16 autocast as in the paper; on this CPU (AVX512-BF16) it halves the step time
        return TrainSettings(model="smollm2-135m", data="gsm8k", max_steps=steps, r=8, max_length=160,
                             per_device_train_batch_size=4, save_steps=0, eval_steps=every, max_eval_samples=64,
                             eval_before=False, bf16=True)  # fmt: skip
    return TrainSettings(model="minilm", task="classification", data="vader-movies", max_steps=steps, r=8,
                         max_length=64, per_device_train_batch_size=16, per_device_eval_batch_size=64, save_steps=0,
                         eval_steps=every, max_eval_samples=512, eval_before=False, max_train_samples=4000)  # fmt: skip


def half_decade(lr: float, direction: int) -> float:
    """The next rate of the 1-3-10 ladder below (direction -1) or above (+1) ``lr``."""
    exponent = math.floor(math.log10(lr) + 1e-9)
    one = round(lr / 10**exponent) == 1
    value = (3 * 10 ** (exponent - 1) if one else 10**exponent) if direction < 0 else (
        3 * 10**exponent if one else 10 ** (exponent + 1))  # fmt: skip
    return float(f"{value:.1g}")


class Study:
    """Runs (or reuses) the runs of one task and answers questions about them."""

    def __init__(self, task: str, base: TrainSettings, seeds: list[int], scratch: Path, train: bool,
                 methods: list[str] = METHODS, sweep_seeds: list[int] | None = None,
                 extensions: int = MAX_EXTENSIONS):  # fmt: skip
        self.task, self.base, self.seeds, self.scratch, self.train = task, base, seeds, scratch, train
        self.methods, self.sweep_seeds, self.extensions = methods, sweep_seeds or seeds[:1], extensions
        self.store = RESULTS / "runs" / task

    def run(self, method: str, lr: float, seed: int, r: int | None = None) -> dict | None:
        """The stored run with these settings; trained first when this study trains and ``method`` is one of its."""
        settings = dataclasses.replace(
            self.base, method=method, learning_rate=lr, seed=seed, r=r or self.base.r, overwrite=True
        )
        settings.output_dir = str(self.scratch / self.task / run_key(settings))
        stored = self.store / f"{run_key(settings)}.json"
        if not self.train or method not in self.methods:
            return json.loads(stored.read_text()) if stored.exists() else None
        return run_stored(settings, self.store)

    def grid(self, method: str) -> list[float]:
        grids = LR_GRID.get(self.task, LR_GRID["sentiment"])
        return grids.get(method, grids["default"])

    def best_lr(self, method: str) -> tuple[float | None, dict[float, float]]:
        """The rate with the lowest final held-out loss at the first seed. A best rate at the end of the grid extends
        the grid by one half-decade that way (at most ``self.extensions`` times): the optimum may lie beyond it."""
        grid, losses = sorted(self.grid(method)), {}
        for extension in range(self.extensions + 1):
            for lr in grid:
                if lr not in losses and (run := self.run(method, lr, self.seeds[0])) is not None:
                    losses[lr] = run["summary"]["after_loss"]
            if any(lr not in losses for lr in self.grid(method)):
                return None, losses  # the base grid is not complete yet
            best = min(losses, key=losses.get)
            if best not in (grid[0], grid[-1]) or extension == self.extensions:
                break
            beyond = half_decade(best, -1 if best == grid[0] else 1)
            if not self.train and beyond not in losses and self.run(method, beyond, self.seeds[0]) is None:
                break  # report-only: the extension has not been run yet
            grid = sorted([*grid, beyond])
        return best, dict(sorted(losses.items()))

    def method_runs(self, method: str, r: int | None = None) -> tuple[float | None, dict, list[dict]]:
        lr, grid = self.best_lr(method)
        if lr is None:
            return None, grid, []
        runs = [self.run(method, lr, seed, r) for seed in self.seeds]
        return lr, grid, [run for run in runs if run is not None]


def ci95(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% t-interval."""
    from scipy import stats

    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, math.nan
    return mean, stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def fmt_ci(values: list[float], digits: int = 4) -> str:
    if not values:
        return "–"
    mean, half = ci95(values)
    return f"{mean:.{digits}f}" if math.isnan(half) else f"{mean:.{digits}f} ± {half:.{digits}f}"


def welch(a: list[float], b: list[float]) -> float | None:
    from scipy import stats

    if len(a) < 2 or len(b) < 2:
        return None
    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def eval_curve(run: dict, key: str = "eval_loss") -> dict[int, float]:
    return {m["step"]: m[key] for m in run["metrics"] if key in m}


def steps_to(run: dict, threshold: float) -> int | None:
    """The first evaluated step whose held-out loss is at or below ``threshold``."""
    return next((s for s, v in sorted(eval_curve(run).items()) if v <= threshold), None)


def analyse(study: Study, sweep: bool) -> dict:
    """Rows of the main table, Welch tests and the IntTune rank sweep, from whatever runs are stored."""
    rows, by_method = {}, {}
    for method in RUN_ORDER:  # the methods the tests compare first, so a partial study answers them soonest
        lr, grid, runs = study.method_runs(method)
        by_method[method] = runs
        rows[method] = {"method": method, "lr_grid": grid, "best_lr": lr, "runs": runs}
    rows = [rows[m] for m in METHODS]
    lora_final = [r["summary"]["after_loss"] for r in by_method["lora"]]
    threshold = statistics.mean(lora_final) if lora_final else None
    for row in rows:
        row["heldout_loss"] = [r["summary"]["after_loss"] for r in row["runs"]]
        row["accuracy"] = [r["summary"]["after_accuracy"] for r in row["runs"] if "after_accuracy" in r["summary"]]
        row["train_loss"] = [r["summary"]["train_loss"] for r in row["runs"]]
        row["trainable_params"] = row["runs"][0]["summary"]["trainable_params"] if row["runs"] else None
        row["steps_to_lora"] = [steps_to(r, threshold) for r in row["runs"]] if threshold is not None else []
    # the two comparisons first, then each other method against LoRA and NLoRA
    pairs = [("nlora", "lora"), ("nlora", "pissa"), ("pissa", "lora")]
    pairs += [(m, other) for m in ("slora", "nlora-reference", "inttune") for other in ("lora", "nlora")]
    tests = {}
    for method, other in pairs:
        for metric in ("heldout_loss", "accuracy"):
            if not any(row[metric] for row in rows):
                continue  # not measured on this task (math has no accuracy)
            a, b = (next(r for r in rows if r["method"] == m)[metric] for m in (method, other))
            tests[f"{method} vs {other}: {metric}"] = welch(a, b)
    sweep_rows = []
    if sweep:
        lr, _ = study.best_lr("inttune")
        for r in SWEEP_RANKS if lr is not None else []:
            seeds = study.seeds if r == study.base.r else study.sweep_seeds  # the main rank has all seeds anyway
            runs = [run for run in (study.run("inttune", lr, seed, r) for seed in seeds) if run is not None]
            if runs:
                sweep_rows.append({"r": r, "lr": lr, "runs": runs})
    return {"rows": rows, "welch": tests, "sweep": sweep_rows, "lora_final": threshold}


def zoom_window(means: dict[str, dict[int, float]]) -> tuple[tuple[float, float], tuple[float, float]]:
    """Axis limits showing the second half of the steps and, in it, the curves of the better half of the methods
    (ranked by final loss), with a 10% margin."""
    last = max(max(curve) for curve in means.values())
    better = sorted(means.values(), key=lambda curve: curve[max(curve)])[: max(1, (len(means) + 1) // 2)]
    values = [v for curve in better for step, v in curve.items() if step >= last / 2]
    pad = 0.1 * (max(values) - min(values)) or 0.01
    return (last / 2 - last / 40, last + last / 40), (min(values) - pad, max(values) + pad)


def plot(analyses: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # top row: whole curves; bottom row: the second half, zoomed on the better half of the methods, whose final
    # losses differ by less than the top row's scale can show
    fig, axes = plt.subplots(2, len(analyses), figsize=(6.5 * len(analyses), 8.4), squeeze=False)
    for column, (task, analysis) in enumerate(analyses.items()):
        means = {}
        for row in analysis["rows"]:
            curves = [eval_curve(r) for r in row["runs"]]
            if not curves:
                continue
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            values = [[c[s] for c in curves] for s in steps]
            means[row["method"]] = dict(zip(steps, map(statistics.mean, values)))
            for ax in axes[:, column]:
                line = ax.plot(steps, means[row["method"]].values(), marker=".",
                               label=f"{row['method']} (lr {row['best_lr']:g}, n={len(curves)})")  # fmt: skip
                if len(curves) > 1:
                    ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], alpha=0.15,
                                    color=line[0].get_color())  # fmt: skip
        top, zoom = axes[:, column]
        top.set_title(f"{task}: held-out loss (mean; band: min-max over seeds)")
        if means:
            xlim, ylim = zoom_window(means)
            zoom.set_xlim(*xlim)
            zoom.set_ylim(*ylim)
        zoom.set_title(f"{task}: second half, zoomed on the better half of the methods")
        top.legend(fontsize=8)  # the zoom below shares its colours
        for ax in (top, zoom):
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def edge(row: dict) -> str:
    """A best rate at the end of its grid is flagged: the optimum may lie outside the grid."""
    grid = sorted(float(lr) for lr in row["lr_grid"])
    return " (grid edge)" if row["best_lr"] is not None and row["best_lr"] in (grid[0], grid[-1]) else ""


def report(task: str, analysis: dict, budget: int) -> str:
    rows = analysis["rows"]
    table = markdown(
        ["method", "lr grid (final held-out loss, seed 0)", "best lr", "seeds", "trainable params",
         "held-out loss per seed", "held-out loss (mean ± 95% CI)", "held-out accuracy",
         "step reaching LoRA's final loss (per seed)"],
        [
            [
                r["method"],
                ", ".join(f"{lr:g}: {loss:.3f}" for lr, loss in r["lr_grid"].items()) or "–",
                "–" if r["best_lr"] is None else f"{r['best_lr']:g}" + edge(r),
                len(r["runs"]),
                "–" if r["trainable_params"] is None else f"{r['trainable_params']:,}",
                ", ".join(f"{loss:.3f}" for loss in r["heldout_loss"]) or "–",
                fmt_ci(r["heldout_loss"]),
                fmt_ci(r["accuracy"]),
                ", ".join("never" if s is None else str(s) for s in r["steps_to_lora"]) or "–",
            ]
            for r in rows
        ],
    )  # fmt: skip
    tests = "; ".join(
        f"{name}: p = {p:.3g}" if p is not None else f"{name}: too few runs" for name, p in analysis["welch"].items()
    )
    text = f"**{task}** ({budget} steps):\n\n{table}\nWelch two-sided tests — {tests}.\n"
    if analysis["sweep"]:
        lora = next(r for r in rows if r["method"] == "lora")
        sweep = markdown(
            ["method", "r", "seeds", "trainable params", "held-out loss (mean ± 95% CI)", "held-out accuracy"],
            [["lora", 8, len(lora["runs"]), f"{lora['trainable_params']:,}" if lora["runs"] else "–",
              fmt_ci(lora["heldout_loss"]), fmt_ci(lora["accuracy"])]]
            + [["inttune", s["r"], len(s["runs"]), f"{s['runs'][0]['summary']['trainable_params']:,}",
                fmt_ci([r["summary"]["after_loss"] for r in s["runs"]]),
                fmt_ci([r["summary"].get("after_accuracy") for r in s["runs"] if "after_accuracy" in r["summary"]])]
               for s in analysis["sweep"]],
        )  # fmt: skip
        text += f"\nIntTune rank sweep (lr {analysis['sweep'][0]['lr']:g}):\n\n"
        text += sweep
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="sentiment,math")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--math-steps", type=int, default=BUDGET["math"])
    parser.add_argument("--sentiment-steps", type=int, default=BUDGET["sentiment"])
    parser.add_argument("--out", default="runs/bench-convergence", help="scratch folder of the run outputs")
    parser.add_argument("--report-only", action="store_true", help="no training: tables from the stored runs")
    parser.add_argument("--no-sweep", action="store_true", help="skip the IntTune rank sweep")
    parser.add_argument("--sweep-seeds", default="0", help="seeds of the IntTune rank sweep's other ranks")
    parser.add_argument("--methods", default=",".join(METHODS), help="train only these; the others are read")
    parser.add_argument("--grid-extensions", type=int, default=MAX_EXTENSIONS, help="points added beyond an edge")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--tiny-model")
    parser.add_argument("--tiny-data")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    analyses, budgets = {}, {}
    for task in args.tasks.split(","):
        budgets[task] = args.math_steps if task == "math" else args.sentiment_steps
        base = task_settings(task, budgets[task], args.tiny_model if args.tiny else None, args.tiny_data)
        methods = args.methods.split(",")
        sweep_seeds = [int(s) for s in args.sweep_seeds.split(",")]
        study = Study(task, base, seeds, Path(args.out), not args.report_only, methods, sweep_seeds,
                      args.grid_extensions)  # fmt: skip
        if study.train:  # the lr grids of every method first, so a partial study is already a fair comparison
            for method in methods:
                study.best_lr(method)
        analyses[task] = analyse(study, sweep=not args.no_sweep)
    slim = {t: {**a, "rows": [{k: v for k, v in r.items() if k != "runs"} for r in a["rows"]],
                "sweep": [{"r": s["r"], "lr": s["lr"], "heldout_loss": [x["summary"]["after_loss"] for x in s["runs"]]}
                          for s in a["sweep"]]} for t, a in analyses.items()}  # fmt: skip
    payload = {"machine": machine(), "lr_grids": LR_GRID, "seeds": seeds, "budgets": budgets, "tasks": slim}
    write_results("convergence" + ("_tiny" if args.tiny else ""), payload)
    if args.tiny:
        return
    plot(analyses, DOCS / "convergence.png")
    body = "\n".join(report(task, a, budgets[task]) for task, a in analyses.items())
    update_section(
        "convergence",
        f"Command: `python bench/convergence.py --tasks {args.tasks} --seeds {args.seeds}` (stored runs in "
        f"`docs/bench-results/runs/`) · lr grids {LR_GRID} · machine: {payload['machine']}\n\n"
        f"{body}\n![held-out loss curves](convergence.png)",
    )


if __name__ == "__main__":
    main()
