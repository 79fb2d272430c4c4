"""Benchmark 5: NLoRA on a 4-bit (NF4) base: quantisation error of the residual, init time, and QLoRA vs QNLoRA vs
IntTune in training.

Run:  python bench/quantized.py                  (SmolLM2-135M: 210 matrices, then 3 methods x 3 seeds)
      python bench/quantized.py --tiny           (a tiny random Llama; smoke test)

1. Per matrix W (fp32, ``out x in``): plain NF4 error ``||deq(q(W)) - W||`` against QNLoRA's
   ``||deq(q(W - sBNA)) + sBNA - W||`` (NLoRA's default Nyström factors) and, for reference, PiSSA's (truncated SVD),
   relative to ``||W||``. PiSSA reports that the residual quantises with less error; this checks it for Nyström.
2. Training on the 4-bit base through ``nlora train`` (the compare runner, runs stored like the convergence study):
   QLoRA (PEFT LoRA on NF4), QNLoRA (residual from the full-precision W, base quantise(W - sBNA)) and IntTune
   (the same residual workflow, only N trained): held-out loss after the same budget, step time, peak memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
import warnings
from pathlib import Path

import torch
from common import RESULTS, machine, markdown, update_section, write_results

from nlora import NLoraConfig, nystrom
from nlora.cli.compare import run_key, run_stored
from nlora.cli.settings import TrainSettings

warnings.filterwarnings("ignore")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
METHODS = {"QLoRA": "lora", "QNLoRA": "nlora", "IntTune": "inttune"}
LRS = {"lora": 3e-4, "nlora": 3e-4, "inttune": 3e-3}
DEFAULT = NLoraConfig()  # the init settings every matrix is decomposed with


def nf4_roundtrip(w: torch.Tensor) -> torch.Tensor:
    """``deq(q(w))`` with bitsandbytes' NF4 (block 64), as Linear4bit stores it."""
    import bitsandbytes.functional as F

    packed, state = F.quantize_4bit(w.contiguous(), quant_type="nf4", blocksize=64)
    return F.dequantize_4bit(packed, state).float()


def matrix_errors(w: torch.Tensor, r: int) -> dict[str, float]:
    norm = torch.linalg.matrix_norm(w).item()
    plain = torch.linalg.matrix_norm(nf4_roundtrip(w) - w).item() / norm
    started = time.perf_counter()
    f = nystrom.nystrom_factors(w, r, **DEFAULT.nystrom_options(r, tuple(w.shape)))  # whatever the default is now
    delta = f.B @ f.N @ f.A
    qnlora = torch.linalg.matrix_norm(nf4_roundtrip(w - delta) + delta - w).item() / norm
    seconds = time.perf_counter() - started
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    top = (u[:, :r] * s[:r]) @ vh[:r]
    pissa = torch.linalg.matrix_norm(nf4_roundtrip(w - top) + top - w).item() / norm
    return {"plain": plain, "qnlora": qnlora, "pissa": pissa, "seconds": seconds}


def weights(tiny: bool) -> dict[str, torch.Tensor]:
    if tiny:
        g = torch.Generator().manual_seed(0)
        return {f"m{i}": torch.randn(64, 128, generator=g) for i in range(4)}
    from transformers import AutoModelForCausalLM

    from nlora.cli.assets import smollm2_path

    model = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32)
    return {n: m.weight.detach() for n, m in model.named_modules() if n.endswith(TARGETS)}


def error_table(tiny: bool, ranks: list[int]) -> list[dict]:
    rows = []
    mats = weights(tiny)
    for r in ranks:
        per = {name: matrix_errors(w, r) for name, w in mats.items()}
        ratio = [p["qnlora"] / p["plain"] for p in per.values()]
        pissa = [p["pissa"] / p["plain"] for p in per.values()]
        rows.append({
            "r": r, "matrices": len(per),
            "plain_median": statistics.median(p["plain"] for p in per.values()),
            "qnlora_median": statistics.median(p["qnlora"] for p in per.values()),
            "ratio_median": statistics.median(ratio), "ratio_worst": max(ratio), "ratio_best": min(ratio),
            "layers_better": sum(x < 1 for x in ratio),
            "pissa_ratio_median": statistics.median(pissa), "pissa_ratio_worst": max(pissa),
            "init_seconds_total": sum(p["seconds"] for p in per.values()),
        })  # fmt: skip
    return rows


def step0_distance(model_dir: str, scratch: Path, r: int) -> dict[str, float]:
    """Mean |logits - fp32 logits| at step 0 on fixed GSM8K-style text: plain NF4 against QNLoRA's
    ``quantise(W - sBNA) + sBNA`` (``save_residual_model`` workflow, default init, all linear layers). A lower weight
    error need not make the model closer to full precision; this measures the model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from nlora import save_residual_model
    from nlora.cli.assets import resolve_model

    path = resolve_model(model_dir)
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    text = [
        "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many "
        "clips did Natalia sell altogether in April and May? Natalia sold 48/2 = 24 clips in May."
    ] * 2
    ids = AutoTokenizer.from_pretrained(path)(text, return_tensors="pt")["input_ids"]

    def logits(model) -> torch.Tensor:
        with torch.no_grad():
            return model.eval()(input_ids=ids).logits.float()

    full = logits(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))
    plain = logits(AutoModelForCausalLM.from_pretrained(path, quantization_config=nf4))
    config = NLoraConfig(r=r, target_modules=list(TARGETS))
    residual = scratch / f"step0-residual-r{r}"
    save_residual_model(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), config, residual,
                        overwrite=True)  # fmt: skip
    quantised = AutoModelForCausalLM.from_pretrained(residual, quantization_config=nf4)
    qnlora = logits(PeftModel.from_pretrained(quantised, residual / "initial_adapter"))
    return {"r": r, "nf4": (plain - full).abs().mean().item(), "qnlora": (qnlora - full).abs().mean().item()}


def training(tiny_model: str | None, tiny_data: str | None, steps: int, seeds: list[int], scratch: Path) -> list:
    store = RESULTS / "runs" / "quantized"
    base = TrainSettings(model=tiny_model or "smollm2-135m", data=tiny_data or "gsm8k", quantization="nf4",
                         max_steps=steps, r=8, max_length=160, per_device_train_batch_size=4, save_steps=0,
                         eval_steps=0, max_eval_samples=8 if tiny_model else 64, eval_before=True,
                         nystrom_square_landmarks="columns")  # fmt: skip  # the init its stored runs used
    rows = []
    for label, method in METHODS.items():
        records = []
        for seed in seeds:
            settings = dataclasses.replace(base, method=method, learning_rate=LRS[method], seed=seed, overwrite=True)
            settings.output_dir = str(scratch / run_key(settings))
            records.append(run_stored(settings, store)["summary"])
        rows.append({"method": label, "lr": LRS[method], "runs": records})
    return rows


def mean_sd(values: list[float], digits: int = 3) -> str:
    if len(values) < 2:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="8,32")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default="runs/bench-quantized", help="scratch folder of the training runs")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--tiny-model")
    parser.add_argument("--tiny-data")
    args = parser.parse_args()
    ranks = [int(r) for r in args.ranks.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    errors = error_table(args.tiny, ranks)
    model = args.tiny_model if args.tiny else "smollm2-135m"
    distances = [step0_distance(model, Path(args.out), r) for r in ranks] if model else []
    runs = training(args.tiny_model if args.tiny else None, args.tiny_data, args.steps, seeds, Path(args.out))
    payload = {"machine": machine(), "errors": errors, "step0_logit_distance": distances, "training": runs,
               "steps": args.steps, "seeds": seeds}  # fmt: skip
    write_results("quantized" + ("_tiny" if args.tiny else ""), payload)
    if args.tiny:
        return
    table1 = markdown(
        ["r", "matrices", "NF4 error (median)", "QNLoRA error (median)", "QNLoRA / NF4 (median)", "worst layer",
         "best layer", "layers where QNLoRA is better", "PiSSA / NF4 (median, worst)", "Nyström init, all (s)"],
        [[e["r"], e["matrices"], f"{e['plain_median']:.4f}", f"{e['qnlora_median']:.4f}", f"{e['ratio_median']:.3f}",
          f"{e['ratio_worst']:.3f}", f"{e['ratio_best']:.3f}", f"{e['layers_better']} / {e['matrices']}",
          f"{e['pissa_ratio_median']:.3f}, {e['pissa_ratio_worst']:.3f}", f"{e['init_seconds_total']:.1f}"]
         for e in errors],
    )  # fmt: skip
    table_step0 = markdown(
        ["r", "plain NF4: mean abs(logits − fp32 logits)", "QNLoRA at step 0: the same"],
        [[d["r"], f"{d['nf4']:.3f}", f"{d['qnlora']:.3f}"] for d in distances],
    )
    table2 = markdown(
        ["method", "lr", "seeds", "trainable params", "held-out loss before", "held-out loss after",
         "step s (median)", "peak RSS MB", "init s"],
        [[r["method"], r["lr"], len(r["runs"]), f"{r['runs'][0]['trainable_params']:,}",
          mean_sd([x["before_loss"] for x in r["runs"]]), mean_sd([x["after_loss"] for x in r["runs"]]),
          mean_sd([x["step_seconds_median"] for x in r["runs"]], 2),
          f"{max(x['peak_memory_mb'] for x in r['runs']):,.0f}",
          mean_sd([x["init_seconds"] for x in r["runs"]], 2)] for r in runs],
    )  # fmt: skip
    command = f"python bench/quantized.py --ranks {args.ranks} --steps {args.steps} --seeds {args.seeds}"
    update_section(
        "quantized",
        f"Command: `{command}` · machine: {payload['machine']}\n\n"
        f"Quantisation error of the residual on SmolLM2-135M's matrices (NF4, block 64; errors relative to ‖W‖):\n\n"
        f"{table1}\nThe model at step 0 (a lower weight error need not bring the model closer to full precision):\n\n"
        f"{table_step0}\nTraining on the NF4 base (SmolLM2-135M, GSM8K split, batch 4, {args.steps} steps, r = 8, "
        f"all linear layers; QNLoRA and IntTune decompose the full-precision W first):\n\n{table2}",
    )


if __name__ == "__main__":
    main()
