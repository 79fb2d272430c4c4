"""The engine of a fair method comparison: per-method rate search on a validation slice, then seeds, then statistics.

Protocol (``nlora compare --tune`` and ``bench/convergence.py``):

1. Each method runs a log-spaced grid of rates on the 1-3-10 ladder, centred on its recommended rate, at the first
   seed; a best rate at an edge extends the grid that way (at most ``extensions`` points).
2. The two best grid points by *validation* loss (held-out rows disjoint from the reported ones) run every seed; the
   rate with the lowest mean validation loss over the seeds is selected.
3. The selected rate's runs are reported on the reporting rows: mean and 95% CI, the difference to a baseline method
   with its Welch CI, Holm-corrected Welch tests, the collapse rate under a bound fixed in advance, and the steps each
   run needs to reach the baseline's final loss.

Every finished run is stored as JSON under ``store`` (settings, summary, metric curves) and reused, so an interrupted
search resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import stats
from ..rates import recommended_learning_rate
from .settings import TrainSettings, recorded_settings

NEEDS = ("validation_loss", "before_loss")  # what a stored run must hold for the protocol


def ladder(lr: float, steps: int) -> float:
    """``lr`` moved ``steps`` half-decades along the 1-3-10 ladder (1e-3 -> +1 -> 3e-3 -> +1 -> 1e-2)."""
    exponent = math.floor(math.log10(lr) + 1e-9)
    position = 2 * exponent + (0 if round(lr / 10**exponent) < 2 else 1) + steps
    return float(f"{(1 if position % 2 == 0 else 3) * 10.0 ** (position // 2):.1g}")


def centred_grid(lr: float, points: int) -> list[float]:
    """``points`` half-decade rates around ``lr`` (one more below than above for an even count)."""
    return [ladder(lr, k) for k in range(-(points // 2), points - points // 2)]


@dataclasses.dataclass
class Selection:
    """The outcome of one method's rate search."""

    method: str
    seed0_validation: dict[float, float]  # grid rate -> validation loss of the first seed
    candidates: dict[float, float]  # the two best grid rates -> mean validation loss over the seeds
    lr: float | None  # the selected rate (None while runs are missing)
    runs: list[dict]  # the selected rate's runs, one per seed that exists


class RateSearch:
    """Runs (or reads back) the runs of one comparison and selects each method's rate on validation loss."""

    def __init__(
        self,
        base: TrainSettings,
        methods: list[str],
        seeds: list[int],
        store: Path,
        scratch: Path,
        *,
        points: int = 3,
        extensions: int = 1,
        grids: dict[str, list[float]] | None = None,
        train: bool = True,
        progress: Callable[[str], None] | None = print,
        metric: str = "validation_loss",
        top: int = 2,
    ) -> None:
        """``metric`` is what selects (``after_loss``, the reported loss, reproduces the earlier seed-0 protocol
        with ``top=1``: for reading old runs only); ``top`` grid rates run every seed."""
        self.base, self.methods, self.seeds, self.store, self.scratch = base, methods, seeds, store, scratch
        self.points, self.extensions, self.grids, self.train = points, extensions, grids or {}, train
        self.progress, self.durations, self.metric, self.top = progress, [], metric, top
        self.needs = NEEDS if metric == "validation_loss" else ()
        self.done: set[str] = set()  # the runs of this search finished so far (trained or read back)

    def grid(self, method: str) -> list[float]:
        """The method's base grid: given, or centred on its recommended rate for the task."""
        if method in self.grids:
            return sorted(self.grids[method])
        return centred_grid(recommended_learning_rate(method, self.base.task), self.points)

    def planned_runs(self) -> int:
        """Runs the protocol needs at least (grid at the first seed, two candidates at every other seed)."""
        per_method = len(self.grid(self.methods[0])) + min(self.top, self.points) * (len(self.seeds) - 1)
        return per_method * len(self.methods)

    def run(self, method: str, lr: float, seed: int, r: int | None = None) -> dict | None:
        """The stored run with these settings; trained (and stored) first when this search trains."""
        from .compare import run_key, run_stored

        settings = dataclasses.replace(
            self.base, method=method, learning_rate=lr, seed=seed, r=r or self.base.r, overwrite=True, resume=False
        )
        key = run_key(settings)
        settings.output_dir = str(self.scratch / key)
        path = self.store / f"{key}.json"
        if not self.train:
            record = json.loads(path.read_text()) if path.exists() else None
            wanted = settings.comparable()
            if (
                record is None
                or recorded_settings(record["settings"]) != wanted
                or not all(k in record["summary"] for k in self.needs)
            ):
                return None
            return record
        started = time.perf_counter()
        fresh = not path.exists() or not all(k in json.loads(path.read_text())["summary"] for k in self.needs)
        record = run_stored(settings, self.store, needs=self.needs)
        self.done.add(key)
        if fresh and self.progress is not None:
            self.durations.append(time.perf_counter() - started)
            left = self.planned_runs() - len(self.done)
            eta = f", about {max(left, 0) * statistics.mean(self.durations) / 60:.0f} min left" if left > 0 else ""
            self.progress(
                f"nlora: {method} lr {lr:g} seed {seed}: validation loss {record['summary']['validation_loss']:.4f} "
                f"({self.durations[-1]:.0f} s{eta})"
            )
        return record

    def select_grid(self, method: str) -> dict[float, float] | None:
        """Validation loss of the first seed over the grid, extended past an edge best rate."""
        grid, losses = self.grid(method), {}
        for _ in range(self.extensions + 1):
            for lr in grid:
                if lr not in losses and (run := self.run(method, lr, self.seeds[0])) is not None:
                    losses[lr] = run["summary"][self.metric]
            if any(lr not in losses for lr in self.grid(method)):
                return None  # the base grid is not complete yet
            best = min(losses, key=losses.get)
            if best not in (grid[0], grid[-1]):
                break
            beyond = ladder(best, -1 if best == grid[0] else 1)
            if beyond in losses or (not self.train and self.run(method, beyond, self.seeds[0]) is None):
                break
            grid = sorted([*grid, beyond])
        return dict(sorted(losses.items()))

    def select(self, method: str) -> Selection:
        """The method's rate: the best of its two best grid points by mean validation loss over the seeds."""
        seed0 = self.select_grid(method)
        if seed0 is None:
            return Selection(method, {}, {}, None, [])
        candidates, runs = {}, {}
        for lr in sorted(seed0, key=seed0.get)[: self.top]:
            found = [run for seed in self.seeds if (run := self.run(method, lr, seed)) is not None]
            runs[lr] = found
            if len(found) == len(self.seeds):
                candidates[lr] = statistics.mean(r["summary"][self.metric] for r in found)
        if len(candidates) < min(self.top, len(seed0)):
            return Selection(method, seed0, candidates, None, [])
        chosen = min(candidates, key=candidates.get)
        return Selection(method, seed0, candidates, chosen, runs[chosen])


def final_loss(run: dict) -> float:
    """The reported (held-out) loss at the end of a run."""
    return run["summary"]["after_loss"]


def eval_curve(run: dict, key: str = "eval_loss") -> dict[int, float]:
    """Held-out loss by step, from the run's metric curve."""
    return {m["step"]: m[key] for m in run["metrics"] if key in m}


def steps_to(run: dict, threshold: float) -> int | None:
    """The first evaluated step whose held-out loss is at or below ``threshold`` (None: never)."""
    return next((s for s, v in sorted(eval_curve(run).items()) if v <= threshold), None)


def compare_selections(selections: dict[str, Selection], baseline: str, threshold: float,
                       margin: float | None = None) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Per method: collapse count, mean ± CI over the non-collapsed seeds, the difference to ``baseline`` with its CI
    (and, given an equivalence ``margin``, what that CI says against it: :func:`nlora.stats.read_difference`), the
    Welch p-value Holm-corrected across the family of methods compared with the baseline, steps to the baseline's
    final loss (mean over its non-collapsed seeds) and the mean step-0 loss where the runs stored it."""
    kept = {m: [final_loss(r) for r in s.runs if not stats.collapsed(final_loss(r), threshold)]
            for m, s in selections.items()}  # fmt: skip
    target = statistics.mean(kept[baseline]) if kept.get(baseline) else None
    rows, pvalues = {}, {}
    for method, selection in selections.items():
        losses = kept[method]
        accuracy = [r["summary"]["after_accuracy"] for r in selection.runs
                    if "after_accuracy" in r["summary"] and not stats.collapsed(final_loss(r), threshold)]  # fmt: skip
        before = [r["summary"]["before_loss"] for r in selection.runs if "before_loss" in r["summary"]]
        row = {
            "lr": selection.lr,
            "seeds": len(selection.runs),
            "collapsed": len(selection.runs) - len(losses),
            "loss": stats.mean_ci(losses) if losses else None,
            "accuracy": stats.mean_ci(accuracy) if accuracy else None,
            "before_loss": statistics.mean(before) if before else None,  # step 0: the init's own change
            "difference": None,
            "reading": None,
            "p": None,
            "steps_to_baseline": [steps_to(r, target) for r in selection.runs] if target is not None else [],
        }
        if method != baseline and baseline in kept:
            row["difference"] = stats.difference_ci(losses, kept[baseline])
            if row["difference"] is not None and margin is not None:
                row["reading"] = stats.read_difference(*row["difference"][1:], margin)
            pvalues[method] = stats.welch_p(losses, kept[baseline])
        rows[method] = row
    for method, p in stats.holm(pvalues).items():
        rows[method]["p"], rows[method]["p_holm"] = pvalues[method], p
    return rows


def base_loss(selections: dict[str, Selection], search: RateSearch) -> float | None:
    """The base model's held-out loss: the step-0 loss of the runs whose step 0 is the base model (all but the
    authors' init, which changes the model at step 0)."""
    values = [r["summary"]["before_loss"] for m, s in selections.items() if m != "nlora-reference" for r in s.runs
              if "before_loss" in r["summary"]]  # fmt: skip
    return statistics.median(values) if values else None


def format_ci(value: tuple[float, float] | None, digits: int = 4) -> str:
    """``mean ± half-width`` of a :func:`nlora.stats.mean_ci` pair; the mean alone for one value, "–" for none."""
    if value is None:
        return "–"
    mean, half = value
    return f"{mean:.{digits}f}" if math.isnan(half) else f"{mean:.{digits}f} ± {half:.{digits}f}"


def format_difference(diff: tuple[float, float, float] | None, digits: int = 4) -> str:
    """``difference [low, high]`` of a :func:`nlora.stats.difference_ci` triple, signed with a true minus sign; "–"
    for none."""
    if diff is None:
        return "–"
    signed = [f"{v:+.{digits}f}".replace("-", "\u2212") for v in diff]
    return f"{signed[0]} [{signed[1]}, {signed[2]}]"


def _p(value: float | None) -> str:
    return "–" if value is None else f"{value:.3g}"


def comparison_cells(method: str, row: dict, reading: bool = True) -> list[str]:
    """One method's cells of a comparison table (a :func:`compare_selections` row): rate, seeds, collapsed, mean ±
    95% CI (a single seed labelled), accuracy, the difference to the baseline with its CI, the reading against the
    margin (when ``reading``), Welch and Holm p, and the step at which each seed reaches the baseline's final loss."""
    steps = ", ".join("never" if s is None else str(s) for s in row["steps_to_baseline"]) or "–"
    return [
        method, "–" if row["lr"] is None else f"{row['lr']:g}", str(row["seeds"]), str(row["collapsed"]),
        format_ci(row["loss"]) + (" (1 seed)" if row["seeds"] == 1 else ""), format_ci(row["accuracy"], 3),
        format_difference(row["difference"]), *([row["reading"] or "–"] if reading else []),
        _p(row["p"]), _p(row.get("p_holm")), steps,
    ]  # fmt: skip


def tune_report(selections: dict[str, Selection], rows: dict[str, dict], baseline: str, threshold: float,
                margin: float | None = None) -> str:  # fmt: skip
    """The Markdown of a tuned comparison: the selection on validation loss, then the reported comparison (with a
    column reading each difference against the equivalence ``margin`` when one was set)."""
    grid = ["| method | validation loss by rate (first seed) | mean validation loss over seeds | selected rate |",
            "|---|---|---|---|"]  # fmt: skip
    for method, s in selections.items():
        grid.append(
            f"| {method} | {', '.join(f'{lr:g}: {v:.4f}' for lr, v in s.seed0_validation.items()) or '–'} | "
            f"{', '.join(f'{lr:g}: {v:.4f}' for lr, v in s.candidates.items()) or '–'} | "
            f"{'–' if s.lr is None else f'{s.lr:g}'} |"
        )
    reading = "" if margin is None else f" against ±{margin:g} |"
    head = ["| method | rate | seeds | collapsed | held-out loss (mean ± 95% CI) | accuracy | "
            f"difference to {baseline} [95% CI] |{reading} Welch p | Holm p | step reaching {baseline}'s final loss |",
            "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if reading else "")]  # fmt: skip
    head += ["| " + " | ".join(comparison_cells(method, row, bool(reading))) + " |" for method, row in rows.items()]
    bound = "none" if math.isinf(threshold) else f"{threshold:.4f}"
    return (
        "Selection (validation rows, disjoint from the reported ones): each method's grid at the first seed, then "
        "its two best rates over every seed.\n\n" + "\n".join(grid) + "\n\n"
        f"Reported rows, at each method's selected rate. A run counts as collapsed when its final loss is not below "
        f"{bound} (the rule, fixed before running: chance level for classification, the base model's loss for "
        f"language modelling); means, CIs and tests use the other runs. Holm corrects the Welch tests across the "
        f"methods compared with {baseline}.\n\n" + "\n".join(head) + "\n"
    )


def plot_rate_sensitivity(selections: dict[str, Selection], path: Path) -> None:
    """Validation loss against learning rate per method (first seed's grid; the candidates' seed means as stars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, s in selections.items():
        if not s.seed0_validation:
            continue
        line = ax.plot(list(s.seed0_validation), list(s.seed0_validation.values()), marker="o", label=method)
        if s.candidates:
            ax.scatter(list(s.candidates), list(s.candidates.values()), marker="*", s=120, color=line[0].get_color())
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("validation loss (o: first seed, *: mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    tmp.replace(path)
