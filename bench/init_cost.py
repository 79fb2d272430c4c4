"""Benchmark 1: initialisation cost and quality, per matrix and for the whole SmolLM2-135M model.

Run:  python bench/init_cost.py                   (full: Llama-2-7B shapes + SmolLM2, ~15 min on 2 cores)
      python bench/init_cost.py --targets         (the targets only, ~3 min; run it on a quiet machine)
      python bench/init_cost.py --tiny            (a smoke run on small shapes, used by the test suite)

Every method goes through ``get_peft_model`` on the same weights (stock PEFT for LoRA, PiSSA, pissa_niter_4 and
OLoRA), timed interleaved (A B C ... A B C ...) and reported as medians and median ratios. "floor" is one product of
W with an in x r matrix: the least work any residual init must do. Llama-2-7B shapes use random Gaussian weights
(the real ones are not available offline); SmolLM2 uses its real (4-bit-rounded) weights.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import statistics
import time
import warnings

import torch
from common import machine, markdown, median, peak_rss_delta, update_section, write_results
from peft import LoraConfig, get_peft_model
from torch import nn

import nlora
from nlora import NLoraConfig

warnings.filterwarnings("ignore")

METHODS = {
    "nlora (default: project, norm, r/4)": lambda r: NLoraConfig(r=r, lora_alpha=r),
    "nlora lstsq, norm, 2r (previous default)": lambda r: NLoraConfig(
        r=r, lora_alpha=r, nystrom_core="lstsq", nystrom_oversample=1.0
    ),
    "nlora first, lstsq, r": lambda r: NLoraConfig(
        r=r, lora_alpha=r, nystrom_core="lstsq", nystrom_landmarks="first", nystrom_oversample=0
    ),
    "nlora leverage, lstsq, 2r": lambda r: NLoraConfig(
        r=r, lora_alpha=r, nystrom_core="lstsq", nystrom_landmarks="leverage", nystrom_oversample=1.0
    ),
    "nlora random, lstsq, 2r": lambda r: NLoraConfig(
        r=r, lora_alpha=r, nystrom_core="lstsq", nystrom_landmarks="random", nystrom_oversample=1.0
    ),
    "nlora norm, pinv, r": lambda r: NLoraConfig(r=r, lora_alpha=r, nystrom_core="pinv", nystrom_oversample=0),
    "nlora norm, ridge, r": lambda r: NLoraConfig(r=r, lora_alpha=r, nystrom_core="ridge", nystrom_oversample=0),
    "nlora_reference": lambda r: NLoraConfig(r=r, lora_alpha=r, init_lora_weights="nlora_reference"),
    "slora": lambda r: NLoraConfig(r=r, lora_alpha=r, init_lora_weights="slora"),
    "PEFT LoRA": lambda r: LoraConfig(r=r, lora_alpha=r),
    "PEFT pissa_niter_4": lambda r: LoraConfig(r=r, lora_alpha=r, init_lora_weights="pissa_niter_4"),
    "PEFT OLoRA": lambda r: LoraConfig(r=r, lora_alpha=r, init_lora_weights="olora"),
}
FULL_SVD = {"PEFT PiSSA (full SVD)": lambda r: LoraConfig(r=r, lora_alpha=r, init_lora_weights="pissa")}


class One(nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.proj = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")  # no Kaiming draw to pay
        self.proj.weight = nn.Parameter(weight.clone())


def _adapt(model: nn.Module, config, targets) -> nn.Module:
    config = copy.copy(config)
    config.target_modules = targets
    return get_peft_model(model, config)


def approx_error(model, original: dict[str, torch.Tensor], method: str, r: int) -> list[float]:
    """Relative error ||W - s B N A|| / ||W|| of the initial adapter, per adapted layer."""
    errors = []
    report = nlora.init_report(model, compute_missing=True) if method == "nlora_reference" else {}
    residual = ("nlora" in method and "reference" not in method) or "pissa" in method.lower() or "OLoRA" in method
    for name, module in model.named_modules():
        if not hasattr(module, "lora_A") or "default" not in module.lora_A:
            continue
        w0 = original[name.removeprefix("base_model.model.")]
        if residual:  # the base weight now holds W - s B N A
            errors.append((module.base_layer.weight.float().norm() / w0.norm()).item())
        elif method == "nlora_reference":
            errors.append(report[name]["approx_error"])
        else:
            errors.append(1.0)  # B = 0: the adapter approximates nothing
    return errors


def optimal_errors(weight: torch.Tensor, ranks: list[int]) -> dict[int, float]:
    """Eckart-Young optimum for several ranks from one set of singular values."""
    s2 = torch.linalg.svdvals(weight.float()).pow(2)
    return {r: (s2[r:].sum() / s2.sum()).sqrt().item() for r in ranks}


def bench_matrix(shape: tuple[int, int], ranks: list[int], repeats: int) -> list[dict]:
    torch.manual_seed(0)
    weight = torch.randn(*shape) * 0.02
    optimum = optimal_errors(weight, ranks)
    rows = []
    for r in ranks:
        # a full SVD costs the same at every rank (tens of seconds per matrix on CPU): measured once, at the top rank
        methods = dict(METHODS) | (FULL_SVD if r == ranks[-1] else {})
        times: dict[str, list[float]] = {m: [] for m in methods} | {"floor": []}
        x = torch.randn(shape[1], r)
        for rep in range(repeats):
            for method, make in methods.items():
                if method in FULL_SVD and rep > 0:
                    continue  # a full SVD is measured once (tens of seconds per matrix on CPU)
                model = One(weight)  # setup, not timed
                started = time.perf_counter()
                _adapt(model, make(r), ["proj"])
                times[method].append(time.perf_counter() - started)
            started = time.perf_counter()
            weight @ x
            times["floor"].append(time.perf_counter() - started)
        floor = median(times["floor"])
        niter = median(times["PEFT pissa_niter_4"])
        for method, make in methods.items():
            model, memory = peak_rss_delta(lambda: _adapt(One(weight), make(r), ["proj"]))  # noqa: B023
            error = approx_error(model, {"proj": weight}, method, r)[0]
            t = median(times[method])
            rows.append(
                {
                    "shape": f"{shape[0]}x{shape[1]}",
                    "r": r,
                    "method": method,
                    "seconds": t,
                    "x_floor": t / floor,
                    "pissa_niter_4_over_this": niter / t,
                    "peak_mib": memory,
                    "rel_error": error,
                    "svd_optimum": optimum[r],
                    "error_over_optimum": error / optimum[r],
                }
            )
        rows.append(
            {
                "shape": f"{shape[0]}x{shape[1]}",
                "r": r,
                "method": "floor (W @ X, X in x r)",
                "seconds": floor,
                "x_floor": 1.0,
            }
        )
    return rows


TARGETS = {
    "nlora (default)": lambda r: NLoraConfig(r=r, lora_alpha=r),
    "nlora (previous: square columns, PEFT's draw)": lambda r: NLoraConfig(
        r=r, lora_alpha=r, nystrom_square_landmarks="columns"
    ),
    "nlora_reference": lambda r: NLoraConfig(r=r, lora_alpha=r, init_lora_weights="nlora_reference"),
    "nlora_reference (previous: PEFT's draw)": lambda r: NLoraConfig(
        r=r, lora_alpha=r, init_lora_weights="nlora_reference"
    ),
    "PEFT LoRA": lambda r: LoraConfig(r=r, lora_alpha=r),
    "PEFT pissa_niter_4": lambda r: LoraConfig(r=r, lora_alpha=r, init_lora_weights="pissa_niter_4"),
}


@contextlib.contextmanager
def previous_creation(method: str):
    """The adapter creation before nlora skipped PEFT's draw: PEFT creates A and B on the CPU with its Kaiming init
    and nlora copies its factors in (the path ``low_cpu_mem_usage`` and meta bases still take)."""
    import nlora.model

    if "previous" not in method:
        yield
        return
    saved = nlora.model.empty_weights_active
    nlora.model.empty_weights_active = lambda: True
    try:
        yield
    finally:
        nlora.model.empty_weights_active = saved


def spread(values: list[float]) -> str:
    """min / median / max."""
    return f"{min(values):.3g} / {median(values):.3g} / {max(values):.3g}"


def bench_targets(shapes: list[tuple[int, int]], ranks: list[int], repeats: int) -> list[dict]:
    """The issue's targets, interleaved (every method and the floor once per repeat): each method's time over the
    floor of the same repeat, and pissa_niter_4's time over the method's, as min / median / max over the repeats."""
    rows = []
    for shape in shapes:
        torch.manual_seed(0)
        weight = torch.randn(*shape) * 0.02
        for r in ranks:
            times: dict[str, list[float]] = {m: [] for m in TARGETS} | {"floor": []}
            x = torch.randn(shape[1], r)
            for _ in range(repeats + 1):  # the first round warms up and is dropped
                for method, make in TARGETS.items():
                    model = One(weight)  # setup, not timed
                    gc.collect()  # else the cycles of the previous model (and its 64+ MB weight) are freed mid-timing
                    with previous_creation(method):
                        started = time.perf_counter()
                        _adapt(model, make(r), ["proj"])
                        times[method].append(time.perf_counter() - started)
                    del model
                gc.collect()
                started = time.perf_counter()
                weight @ x
                times["floor"].append(time.perf_counter() - started)
            times = {m: t[1:] for m, t in times.items()}
            floor, niter = times["floor"], times["PEFT pissa_niter_4"]
            for method in TARGETS:
                t = times[method]
                rows.append({"shape": f"{shape[0]}x{shape[1]}", "r": r, "method": method, "seconds": median(t),
                             "x_floor": [a / b for a, b in zip(t, floor)],
                             "pissa_niter_4_over_this": [a / b for a, b in zip(niter, t)]})  # fmt: skip
    return rows


def default_quality(models: list[str], ranks: list[int]) -> list[dict]:
    """Error / truncated-SVD optimum of the default init on the real weights of §1b (every linear layer of each
    model), with square layers' landmarks on rows (the default) and on columns (before)."""
    from init_sweep import model_matrices

    from nlora.nystrom import nystrom_factors, relative_error

    rows = []
    for name in models:
        matrices = model_matrices(name)
        optimum = {key: optimal_errors(w, ranks) for key, w in matrices.items()}
        for r in ranks:
            for side in ("rows", "columns"):
                ratios = [relative_error(w, nystrom_factors(w, r, oversample=r // 4, landmarks="norm", core="project",
                                                            square_landmarks=side), 1.0) / optimum[key][r]
                          for key, w in matrices.items()]  # fmt: skip
                rows.append({"model": f"{name} ({len(matrices)} matrices)", "r": r, "square_landmarks": side,
                             "median_over_optimum": median(ratios), "worst_over_optimum": max(ratios)})  # fmt: skip
    return rows


def targets_table(rows: list[dict]) -> str:
    return markdown(
        ["shape", "r", "method", "median seconds", "× floor (min / median / max)",
         "pissa_niter_4 / this (min / median / max)"],
        [[x["shape"], x["r"], x["method"], x["seconds"], spread(x["x_floor"]), spread(x["pissa_niter_4_over_this"])]
         for x in rows],
    )  # fmt: skip


def bench_smollm2(ranks: list[int], repeats: int) -> list[dict]:
    from transformers import AutoModelForCausalLM

    from nlora.cli.assets import smollm2_path

    base = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    original = {n: m.weight.detach().clone() for n, m in base.named_modules() if n.split(".")[-1] in targets}
    rows = []
    optimum_by_layer = {n: optimal_errors(w, ranks) for n, w in original.items()}
    for r in ranks:
        optimum = {n: o[r] for n, o in optimum_by_layer.items()}
        methods = dict(METHODS) | FULL_SVD
        times: dict[str, list[float]] = {m: [] for m in methods}
        for rep in range(repeats):
            for method, make in methods.items():
                if method in FULL_SVD and rep > 0:
                    continue
                model = copy.deepcopy(base)
                started = time.perf_counter()
                adapted = _adapt(model, make(r), targets)
                times[method].append(time.perf_counter() - started)
                if rep == 0:
                    errors = approx_error(adapted, original, method, r)
                    names = [
                        n.removeprefix("base_model.model.")
                        for n, m in adapted.named_modules()
                        if hasattr(m, "lora_A") and "default" in m.lora_A
                    ]
                    ratios = [e / optimum[n] for e, n in zip(errors, names)]
                    rows.append(
                        {
                            "model": "SmolLM2-135M (210 matrices)",
                            "r": r,
                            "method": method,
                            "median_error": statistics.median(errors),
                            "median_error_over_optimum": statistics.median(ratios),
                            "max_error_over_optimum": max(ratios),
                        }
                    )
                del model
        niter = median(times["PEFT pissa_niter_4"])
        for row in rows:
            if row["r"] == r:
                row["seconds"] = median(times[row["method"]])
                row["pissa_niter_4_over_this"] = niter / row["seconds"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="small shapes, one repeat, no SmolLM2 (smoke test)")
    parser.add_argument("--targets", action="store_true", help="only the targets table (interleaved, 9 repeats)")
    args = parser.parse_args()
    if args.targets or args.tiny:
        shapes, ranks, repeats = ([(64, 96)], [4], 2) if args.tiny else ([(4096, 4096), (4096, 11008), (11008, 4096)],
                                                                          [8, 32, 128], 9)  # fmt: skip
        rows = bench_targets(shapes, ranks, repeats)
        quality = default_quality(["minilm"] if args.tiny else ["smollm2-135m", "minilm"], [4] if args.tiny else ranks)
        command = "python bench/init_cost.py " + ("--tiny" if args.tiny else "--targets")
        write_results("init_targets" + ("_tiny" if args.tiny else ""), {"machine": machine(), "command": command,
                                                                         "rows": rows, "quality": quality})  # fmt: skip
        if not args.tiny:
            quality_table = markdown(
                ["model", "r", "square layers' landmarks", "median error / optimum", "worst error / optimum"],
                [[q["model"], q["r"], q["square_landmarks"], q["median_over_optimum"], q["worst_over_optimum"]]
                 for q in quality],
            )  # fmt: skip
            body = f"Command: `{command}` · machine: {machine()}\n\n{targets_table(rows)}\n"
            update_section("init-targets", f"{body}Quality of the default on §1b's real weights:\n\n{quality_table}")
        if args.targets:
            return
    if args.tiny:
        shapes, ranks, repeats = [(64, 96)], [4], 1
    else:
        shapes, ranks, repeats = [(4096, 4096), (11008, 4096), (4096, 11008)], [8, 32, 128], 3
    matrix_rows = []
    for shape in shapes:
        matrix_rows += bench_matrix(shape, ranks, repeats)
    model_rows = [] if args.tiny else bench_smollm2(ranks, repeats)
    payload = {
        "machine": machine(),
        "command": "python bench/init_cost.py" + (" --tiny" if args.tiny else ""),
        "matrices": matrix_rows,
        "smollm2": model_rows,
    }
    write_results("init_cost" + ("_tiny" if args.tiny else ""), payload)
    if args.tiny:
        return
    headers = [
        "shape",
        "r",
        "method",
        "seconds",
        "× floor",
        "pissa_niter_4 / this",
        "peak MiB",
        "rel. error",
        "SVD optimum",
        "error / optimum",
    ]
    table = markdown(
        headers,
        [
            [
                x["shape"],
                x["r"],
                x["method"],
                x["seconds"],
                x["x_floor"],
                x.get("pissa_niter_4_over_this", ""),
                x.get("peak_mib", ""),
                x.get("rel_error", ""),
                x.get("svd_optimum", ""),
                x.get("error_over_optimum", ""),
            ]
            for x in matrix_rows
        ],
    )
    table2 = markdown(
        [
            "model",
            "r",
            "method",
            "seconds (all 210)",
            "pissa_niter_4 / this",
            "median rel. error",
            "median error / optimum",
            "max error / optimum",
        ],
        [
            [
                x["model"],
                x["r"],
                x["method"],
                x["seconds"],
                x["pissa_niter_4_over_this"],
                x["median_error"],
                x["median_error_over_optimum"],
                x["max_error_over_optimum"],
            ]
            for x in model_rows
        ],
    )
    body = (
        f"Command: `{payload['command']}` · machine: {payload['machine']}\n\n### Per matrix\n\n{table}\n"
        f"### Whole model\n\n{table2}"
    )
    update_section("init-cost", body)


if __name__ == "__main__":
    main()
