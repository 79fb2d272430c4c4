"""Benchmark 3: convergence of LoRA, PiSSA, SLoRA, nlora_reference, NLoRA and IntTune under one recipe.

Run:  python bench/convergence.py                 (both offline tasks, reduced budget: see the flags; ~45 min)
      python bench/convergence.py --tiny          (a tiny model; smoke test)

Per method a small learning-rate grid is run with the first seed; the lr with the lowest final held-out loss is then
run with the other seeds, so no method loses only to a bad lr. Held-out loss is measured every --eval-steps steps.
Tasks: SmolLM2-135M on the offline GSM8K split (SFT, prompt-masked loss) and all-MiniLM-L6-v2 on the VADER
movie-review sentences (binary classification, accuracy).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import warnings
from pathlib import Path

from common import DOCS, machine, markdown, update_section, write_results

from nlora.cli.settings import TrainSettings
from nlora.cli.train import run_train

warnings.filterwarnings("ignore")
METHODS = ["lora", "pissa", "slora", "nlora-reference", "nlora", "inttune"]
# IntTune trains r*r parameters per matrix and wants a larger step (the notes' E1 suggests it)
LR_GRID = {"default": [2e-4, 1e-3], "inttune": [1e-3, 5e-3]}


def task_settings(task: str, steps: int, tiny_model: str | None, tiny_data: str | None) -> TrainSettings:
    if tiny_model:
        return TrainSettings(
            model=tiny_model,
            data=tiny_data,
            max_steps=steps,
            r=4,
            max_length=192,
            save_steps=0,
            eval_steps=max(1, steps // 2),
            max_eval_samples=8,
            eval_before=False,
        )
    if task == "math":
        return TrainSettings(
            model="smollm2-135m",
            data="gsm8k",
            max_steps=steps,
            r=8,
            max_length=160,
            per_device_train_batch_size=4,
            save_steps=0,
            eval_steps=max(1, steps // 4),
            max_eval_samples=32,
            eval_before=False,
        )
    return TrainSettings(
        model="minilm",
        task="classification",
        data="vader-movies",
        text_field="text",
        label_field="label",
        max_steps=steps,
        r=8,
        max_length=64,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=64,
        save_steps=0,
        eval_steps=max(1, steps // 4),
        max_eval_samples=256,
        eval_before=False,
        max_train_samples=4000,
    )


def curve(run_dir: Path, key: str) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r[key] for r in map(json.loads, lines) if key in r}


def run_task(task: str, base: TrainSettings, seeds: list[int], out: Path) -> list[dict]:
    def run(method: str, lr: float, seed: int) -> tuple[float, Path]:
        run_dir = out / task / f"{method}-lr{lr}-seed{seed}"
        settings = dataclasses.replace(
            base, method=method, learning_rate=lr, seed=seed, overwrite=True, output_dir=str(run_dir)
        )
        return run_train(settings)["after_loss"], run_dir

    results = []
    for method in METHODS:
        trials = {lr: run(method, lr, seeds[0]) for lr in LR_GRID.get(method, LR_GRID["default"])}
        best_lr = min(trials, key=lambda lr: trials[lr][0])
        run_dirs = [trials[best_lr][1]] + [run(method, best_lr, seed)[1] for seed in seeds[1:]]
        summaries = [json.loads((d / "summary.json").read_text()) for d in run_dirs]
        results.append(
            {
                "task": task,
                "method": method,
                "lr_grid": {str(lr): t[0] for lr, t in trials.items()},
                "best_lr": best_lr,
                "runs": [str(d) for d in run_dirs],
                "summaries": summaries,
            }
        )
    return results


def aggregate(results: list[dict]) -> list[dict]:
    rows = []
    for task in dict.fromkeys(r["task"] for r in results):
        task_results = [r for r in results if r["task"] == task]
        lora = next(r for r in task_results if r["method"] == "lora")
        lora_final = statistics.mean(s["after_loss"] for s in lora["summaries"])
        for r in task_results:
            curves = [curve(Path(d), "eval_loss") for d in r["runs"]]
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            mean_curve = {s: statistics.mean(c[s] for c in curves) for s in steps}
            reach = next((s for s in steps if mean_curve[s] <= lora_final), None)
            metric = [s.get("after_accuracy") for s in r["summaries"] if s.get("after_accuracy") is not None]
            rows.append(
                {
                    "task": task,
                    "method": r["method"],
                    "best_lr": r["best_lr"],
                    "seeds": len(r["runs"]),
                    "trainable_params": r["summaries"][0]["trainable_params"],
                    "train_loss": [s["train_loss"] for s in r["summaries"]],
                    "heldout_loss": [s["after_loss"] for s in r["summaries"]],
                    "accuracy": metric,
                    "steps_to_lora_final": reach,
                    "eval_curve": mean_curve,
                }
            )
    return rows


def fmt(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for r in (r for r in rows if r["task"] == task):
            steps = sorted(r["eval_curve"])
            ax.plot(
                steps, [r["eval_curve"][s] for s in steps], marker="o", label=f"{r['method']} (lr {r['best_lr']:g})"
            )
        ax.set_title(f"{task}: held-out loss (mean over seeds)")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="sentiment,math")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--math-steps", type=int, default=24)
    parser.add_argument("--sentiment-steps", type=int, default=40)
    parser.add_argument("--out", default="runs/bench-convergence")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--tiny-model")
    parser.add_argument("--tiny-data")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    results = []
    for task in args.tasks.split(","):
        steps = args.math_steps if task == "math" else args.sentiment_steps
        base = task_settings(task, steps, args.tiny_model if args.tiny else None, args.tiny_data)
        results += run_task(task, base, seeds, out)
    rows = aggregate(results)
    command = "python bench/convergence.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v not in (None, False) and k != "out"
    )
    payload = {"machine": machine(), "command": command, "rows": rows, "lr_grids": LR_GRID}
    write_results("convergence" + ("_tiny" if args.tiny else ""), payload)
    if args.tiny:
        return
    plot(rows, DOCS / "convergence.png")
    table = markdown(
        [
            "task",
            "method",
            "best lr",
            "seeds",
            "trainable params",
            "final train loss",
            "final held-out loss",
            "held-out accuracy",
            "first step ≤ LoRA's final held-out loss",
        ],
        [
            [
                r["task"],
                r["method"],
                r["best_lr"],
                r["seeds"],
                f"{r['trainable_params']:,}",
                fmt(r["train_loss"]),
                fmt(r["heldout_loss"]),
                fmt(r["accuracy"]),
                r["steps_to_lora_final"] if r["steps_to_lora_final"] is not None else "not reached",
            ]
            for r in rows
        ],
    )
    update_section(
        "convergence",
        f"Command: `{command}` · lr grids {LR_GRID} · machine: {payload['machine']}\n\n"
        f"{table}\n![held-out loss curves](convergence.png)",
    )


if __name__ == "__main__":
    main()
