"""Benchmark 1b: the NLoRA init default, chosen by measurement (landmark method x oversampling).

Run:  python bench/init_sweep.py                    (all three parts; ~25 min on 2 cores)
      python bench/init_sweep.py --parts quality    (approximation error on SmolLM2-135M's 210 and MiniLM's 36 matrices)
      python bench/init_sweep.py --parts cost       (seconds x floor on Llama-2-7B shapes; run it on a quiet machine)
      python bench/init_sweep.py --parts training   (approximation error against early held-out loss, MiniLM sentiment)
      python bench/init_sweep.py --parts report     (rebuild the docs section from the stored results)
      python bench/init_sweep.py --tiny             (small shapes; smoke test)

Variants: core in {lstsq (two-sided C+ W R+), project (one-sided C C+ W)} x landmarks in {first, random, norm,
leverage} x oversampling p in {0, 8, 16, r/4, r} extra landmarks, with orthonormal factors and truncation back to
rank r (``nlora.nystrom.nystrom_factors``).
Quality is error / truncated-SVD optimum per matrix (median and worst layer). Cost goes through ``get_peft_model``
(what users pay), interleaved, as a multiple of the floor: one product of W with an in x r matrix. Any residual init
needs about two floors (one sketch of W, one residual update W - s B N A).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
import warnings
from pathlib import Path

import torch
from common import RESULTS, machine, markdown, median, update_section, write_results
from init_cost import One, _adapt

from nlora import NLoraConfig
from nlora.nystrom import nystrom_factors, relative_error

warnings.filterwarnings("ignore")
LANDMARKS = ["first", "random", "norm", "leverage"]
OVERSAMPLE = ["0", "8", "16", "r/4", "r"]
CORES = ["lstsq", "project"]
VARIANTS = [(core, landmarks, p) for core in CORES for landmarks in LANDMARKS for p in OVERSAMPLE]
RANKS = [8, 32, 128]
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
TRAINING_RANK = 32  # where the variants' approximation errors differ most on MiniLM (0.89-0.97; at r = 8 all ~0.99)
# a spread of approximation quality for the training part: the new and the previous default, cheap variants, pinv
TRAINING_VARIANTS = {
    f"{core}, {landmarks}, p={p:g}r{note}": {"nystrom_core": core, "nystrom_landmarks": landmarks,
                                            "nystrom_oversample": p}
    for core, landmarks, p, note in [("project", "norm", 0.25, " (default)"),
                                     ("lstsq", "norm", 1.0, " (previous default)"), ("project", "norm", 1.0, ""),
                                     ("lstsq", "first", 0.0, ""), ("lstsq", "random", 0.0, ""),
                                     ("pinv", "norm", 0.0, "")]
}  # fmt: skip


def extra(p: str, r: int) -> int:
    """Number of extra landmarks for an oversampling label."""
    return {"r/4": r // 4, "r": r}.get(p) or int(p)


def fraction(p: str, r: int) -> float:
    """``NLoraConfig.nystrom_oversample`` (a fraction of r) that gives ``extra(p, r)`` extra landmarks."""
    return extra(p, r) / r


def model_matrices(name: str) -> dict[str, torch.Tensor]:
    """The 2-D weights of every linear layer of an offline model (fp32)."""
    from transformers import AutoModel

    from nlora.cli.assets import resolve_model

    model = AutoModel.from_pretrained(resolve_model(name), dtype=torch.float32)
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def quality(models: list[str], ranks: list[int]) -> list[dict]:
    """Error / SVD optimum of every variant on every matrix of each model."""
    rows = []
    for name in models:
        matrices = model_matrices(name)
        spectra = {k: torch.linalg.svdvals(w).pow(2) for k, w in matrices.items()}
        for r in ranks:
            for core, landmarks, p in VARIANTS:
                ratios, errors = [], []
                for key, w in matrices.items():
                    s2 = spectra[key]
                    optimum = (s2[r:].sum() / s2.sum()).sqrt().item()
                    gen = torch.Generator().manual_seed(0)  # never more landmarks than the matrix has (k_proj: 192)
                    f = nystrom_factors(w, r, landmarks=landmarks, core=core, oversample=extra(p, r), generator=gen)
                    error = max(0.0, 1 - f.captured_energy / s2.sum().item()) ** 0.5
                    errors.append(error)
                    ratios.append(error / optimum)
                rows.append({"model": f"{name} ({len(matrices)} matrices)", "r": r, "core": core,
                             "landmarks": landmarks, "p": p, "median_error": statistics.median(errors),
                             "median_over_optimum": statistics.median(ratios),
                             "worst_over_optimum": max(ratios)})  # fmt: skip
    return rows


def cost(shapes: list[tuple[int, int]], ranks: list[int], repeats: int) -> list[dict]:
    """Seconds of ``get_peft_model`` per variant as a multiple of the floor, timed interleaved."""
    rows = []
    for shape in shapes:
        torch.manual_seed(0)
        weight = torch.randn(*shape) * 0.02
        for r in ranks:
            variants = {v: NLoraConfig(r=r, lora_alpha=r, nystrom_core=v[0], nystrom_landmarks=v[1],
                                       nystrom_oversample=fraction(v[2], r)) for v in VARIANTS}  # fmt: skip
            times: dict = {v: [] for v in variants} | {"floor": []}
            x = torch.randn(shape[1], r)
            for _ in range(repeats):
                for variant, config in variants.items():
                    model = One(weight)  # setup, not timed
                    started = time.perf_counter()
                    _adapt(model, config, ["proj"])
                    times[variant].append(time.perf_counter() - started)
                    del model
                started = time.perf_counter()
                weight @ x
                times["floor"].append(time.perf_counter() - started)
            floor = median(times["floor"])
            for (core, landmarks, p), t in ((v, median(times[v])) for v in variants):
                rows.append({"shape": f"{shape[0]}x{shape[1]}", "r": r, "core": core, "landmarks": landmarks, "p": p,
                             "seconds": t, "x_floor": t / floor, "floor_seconds": floor})  # fmt: skip
    return rows


def variant_error(matrices: dict[str, torch.Tensor], r: int, knobs: dict) -> float:
    """Median relative error ||W - B N A|| / ||W|| over ``matrices`` of the init that ``knobs`` select."""
    errors = []
    for w in matrices.values():
        f = nystrom_factors(w, r, landmarks=knobs["nystrom_landmarks"], core=knobs["nystrom_core"],
                            oversample=round(knobs["nystrom_oversample"] * r),
                            generator=torch.Generator().manual_seed(0))  # fmt: skip
        errors.append(relative_error(w, f, 1.0))
    return statistics.median(errors)


def training(steps: int, seeds: list[int], lr: float, scratch: Path) -> list[dict]:
    """Early held-out loss of each variant on the study's sentiment recipe (MiniLM) at rank ``TRAINING_RANK``; the
    runs go to the study's store (their keys name the variant) and are reused."""
    from convergence import task_settings

    from nlora.cli.compare import run_key, run_stored

    matrices = model_matrices("minilm")
    rows = []
    for label, knobs in TRAINING_VARIANTS.items():
        runs = []
        for seed in seeds:
            settings = dataclasses.replace(task_settings("sentiment", steps), method="nlora", learning_rate=lr,
                                           r=TRAINING_RANK, seed=seed, eval_steps=max(1, steps // 8),
                                           overwrite=True, **knobs)  # fmt: skip
            settings.output_dir = str(scratch / run_key(settings))
            runs.append(run_stored(settings, RESULTS / "runs" / "sentiment"))
        curve = {}
        for run in runs:
            for m in run["metrics"]:
                if "eval_loss" in m:
                    curve.setdefault(m["step"], []).append(m["eval_loss"])
        rows.append({"variant": label, "knobs": knobs, "lr": lr, "seeds": seeds,
                     "median_error": variant_error(matrices, TRAINING_RANK, knobs),
                     "heldout": {s: statistics.mean(v) for s, v in sorted(curve.items())}})  # fmt: skip
    return rows


def spearman(xs: list[float], ys: list[float]) -> tuple[float, float]:
    from scipy import stats

    result = stats.spearmanr(xs, ys)
    return float(result.statistic), float(result.pvalue)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="quality,cost,training")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100, help="training part: steps per run")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--lr", type=float, default=3e-4, help="training part: learning rate of every variant")
    parser.add_argument("--out", default="runs/bench-init-sweep", help="scratch folder of the training runs")
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    parts = args.parts.split(",")
    if parts == ["report"]:
        return rebuild()
    name = "init_sweep" + ("_tiny" if args.tiny else "")
    previous = RESULTS / f"{name}.json"
    payload = json.loads(previous.read_text()) if previous.exists() and not args.tiny else {}
    payload["machine"] = machine()
    if "quality" in parts:
        models = ["minilm"] if args.tiny else ["smollm2-135m", "minilm"]
        payload["quality"] = quality(models, [8] if args.tiny else RANKS)
    if "cost" in parts:
        shapes, ranks = ([(64, 96)], [8]) if args.tiny else (SHAPES, RANKS)
        payload["cost"] = cost(shapes, ranks, 1 if args.tiny else args.repeats)
    if "training" in parts and not args.tiny:
        seeds = [int(s) for s in args.seeds.split(",")]
        payload["training"] = training(args.steps, seeds, args.lr, Path(args.out))
    write_results(name, payload)
    if not args.tiny:
        update_section("init-sweep", render(payload))


def rebuild() -> None:
    """Rewrite the docs section from the stored results, without measuring anything."""
    update_section("init-sweep", render(json.loads((RESULTS / "init_sweep.json").read_text())))


def render(payload: dict) -> str:
    """The three tables of the sweep, from whatever parts are stored."""
    text = f"Command: `python bench/init_sweep.py` · machine: {payload['machine']}\n\n"
    if "quality" in payload:
        text += "<details><summary>Approximation error / truncated-SVD optimum (median and worst matrix)</summary>"
        text += "\n\n" + markdown(
            ["model", "r", "core", "landmarks", "p", "median error", "median / optimum", "worst / optimum"],
            [[q["model"], q["r"], q["core"], q["landmarks"], q["p"], q["median_error"], q["median_over_optimum"],
              q["worst_over_optimum"]] for q in payload["quality"]],
        ) + "\n</details>\n\n"  # fmt: skip
    if "cost" in payload:
        text += ("<details><summary>Cost of <code>get_peft_model</code> (one matrix, median of interleaved repeats, "
                 "× the floor W·X)</summary>\n\n")  # fmt: skip
        text += markdown(
            ["shape", "r", "core", "landmarks", "p", "seconds", "× floor"],
            [[c["shape"], c["r"], c["core"], c["landmarks"], c["p"], c["seconds"], c["x_floor"]]
             for c in payload["cost"]],
        ) + "\n</details>\n\n"  # fmt: skip
    if "training" in payload:
        rows = payload["training"]
        steps = sorted({int(s) for row in rows for s in row["heldout"]}, key=int)
        text += (f"**Approximation error against early held-out loss** (MiniLM sentiment, r = {TRAINING_RANK}, "
                 f"lr {rows[0]['lr']:g}, "
                 f"mean of seeds {rows[0]['seeds']}):\n\n")  # fmt: skip
        text += markdown(
            ["variant", f"median error (MiniLM, r = {TRAINING_RANK})", *[f"loss @ {s}" for s in steps]],
            [[row["variant"], row["median_error"], *[row["heldout"].get(str(s), row["heldout"].get(s)) for s in steps]]
             for row in rows],
        )  # fmt: skip
        sound = [row for row in rows if row["median_error"] < 1]  # an error above 1 is no approximation at all
        text += "\n| step | Spearman(error, loss), all variants | same, approximations only (error < 1) |\n"
        text += "|---|---|---|\n"
        for s in steps:
            cells = []
            for group in (rows, sound):
                losses = [row["heldout"].get(str(s), row["heldout"].get(s)) for row in group]
                rho, p = spearman([row["median_error"] for row in group], losses)
                cells.append(f"{rho:.2f} (p = {p:.2g}, {len(group)} variants)")
            text += f"| {s} | {cells[0]} | {cells[1]} |\n"
        text += "\n"
    return text


if __name__ == "__main__":
    main()
