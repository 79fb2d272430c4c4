"""Benchmark 4: how init time and step time grow with the rank and the matrix size, with fitted exponents.

Run:  python bench/scaling.py            (~10 min on 2 cores)
      python bench/scaling.py --tiny     (smoke test)

Init: NLoRA's default init (residual included) and PEFT's pissa_niter_4 on random Gaussian matrices; the exponent is
the slope of log(time) against log(rank) or log(number of weights), fitted by least squares. Step: an NLoRA training
step on SmolLM2-135M (batch 4 x 128) at each rank.
"""

from __future__ import annotations

import argparse
import math
import time
import warnings

import torch
from common import machine, markdown, median, update_section, write_results
from peft import LoraConfig, get_peft_model
from torch import nn

from nlora import NLoraConfig

warnings.filterwarnings("ignore")


def fit_exponent(xs: list[float], ys: list[float]) -> float:
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def init_seconds(shape, r, config_factory, repeats) -> float:
    torch.manual_seed(0)
    weight = torch.randn(*shape) * 0.02
    times = []
    for _ in range(repeats):
        model = nn.Sequential(nn.Linear(shape[1], shape[0], bias=False))
        model[0].weight.data.copy_(weight)
        started = time.perf_counter()
        get_peft_model(model, config_factory(r))
        times.append(time.perf_counter() - started)
    return median(times)


INITS = {
    "nlora": lambda r: NLoraConfig(r=r, lora_alpha=r, target_modules=["0"]),
    "PEFT pissa_niter_4": lambda r: LoraConfig(
        r=r, lora_alpha=r, target_modules=["0"], init_lora_weights="pissa_niter_4"
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    if args.tiny:
        ranks, shapes, fixed_shape, fixed_r, repeats = [2, 4], [(32, 32), (64, 64)], (64, 64), 4, 1
    else:
        ranks, fixed_shape, fixed_r, repeats = [8, 16, 32, 64, 128, 256], (4096, 4096), 32, 3
        shapes = [(1024, 1024), (2048, 2048), (4096, 4096), (4096, 11008), (8192, 28672)]
    rows, fits = [], []
    for name, factory in INITS.items():
        by_rank = [init_seconds(fixed_shape, r, factory, repeats) for r in ranks]
        by_size = [init_seconds(s, fixed_r, factory, 1 if s[0] * s[1] > 5e7 else repeats) for s in shapes]
        rows += [
            {"what": "init", "method": name, "shape": f"{fixed_shape[0]}x{fixed_shape[1]}", "r": r, "seconds": t}
            for r, t in zip(ranks, by_rank)
        ]
        rows += [
            {"what": "init", "method": name, "shape": f"{s[0]}x{s[1]}", "r": fixed_r, "seconds": t}
            for s, t in zip(shapes, by_size)
        ]
        fits.append(
            {
                "what": f"{name} init vs rank ({fixed_shape[0]}x{fixed_shape[1]})",
                "exponent": fit_exponent(ranks, by_rank),
            }
        )
        fits.append(
            {
                "what": f"{name} init vs number of weights (r={fixed_r})",
                "exponent": fit_exponent([s[0] * s[1] for s in shapes], by_size),
            }
        )
    if not args.tiny:
        from step_cost import load_base, make_step

        base, batch = load_base(False)
        step_ranks, step_times = [8, 16, 32, 64, 128], []  # k_proj is 192 x 576: r <= 192
        for r in step_ranks:
            model = get_peft_model(
                base,
                NLoraConfig(
                    r=r,
                    lora_alpha=r,
                    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                ),
            ).train()
            step, _ = make_step(model, batch)
            step()
            times = []
            for _ in range(4):
                started = time.perf_counter()
                step()
                times.append(time.perf_counter() - started)
            step_times.append(median(times))
            rows.append({"what": "step", "method": "nlora", "shape": "SmolLM2-135M", "r": r, "seconds": step_times[-1]})
            base = model.unload()
        fits.append(
            {"what": "nlora training step vs rank (SmolLM2-135M)", "exponent": fit_exponent(step_ranks, step_times)}
        )
    payload = {
        "machine": machine(),
        "command": "python bench/scaling.py" + (" --tiny" if args.tiny else ""),
        "rows": rows,
        "fits": fits,
    }
    write_results("scaling" + ("_tiny" if args.tiny else ""), payload)
    if args.tiny:
        return
    table = markdown(
        ["what", "method", "shape", "r", "seconds"],
        [[x["what"], x["method"], x["shape"], x["r"], x["seconds"]] for x in rows],
    )
    fit_table = markdown(["fit", "exponent"], [[f["what"], f["exponent"]] for f in fits])
    update_section(
        "scaling", f"Command: `{payload['command']}` · machine: {payload['machine']}\n\n{fit_table}\n{table}"
    )


if __name__ == "__main__":
    main()
