"""Why one shared learning rate favours some methods: the size of the first update each method makes at that rate.

Run:  python bench/first_step.py            (SmolLM2-135M, the math recipe's first batch, lr 2e-4; ~1 min)
      python bench/first_step.py --tiny     (a tiny random Llama; smoke test)

For each method of the study, one AdamW step at the same rate on the same batch (the math task's first four GSM8K
training rows, r = 8 on every linear layer). Measured: the Frobenius norm of the change of the effective weight,
sqrt(sum over adapted layers of ||ΔW_eff||²), where ΔW_eff is the adapter's delta after the step minus before it.
Adam moves every trainable entry by about the rate in its first step, whatever the gradient's scale; what that does
to W depends on the factors it multiplies: with LoRA's B = 0 only B moves, against a small random A, while a
residual init's A and B carry the top singular values of W, so the same step moves W far more.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import warnings
from pathlib import Path

import torch
from common import machine, markdown, update_section, write_results

sys.path.insert(0, str(Path(__file__).parent))
from convergence import METHODS, PAPER_RATE, task_settings  # noqa: E402

warnings.filterwarnings("ignore")


def deltas(model) -> dict[str, torch.Tensor]:
    """Each adapted layer's effective delta weight (N included for NLoRA layers), in fp32."""
    from peft.tuners.lora import LoraLayer

    from nlora.variants import SLoraLinearVariant

    found = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            if "default" in getattr(module, "lora_N", {}):
                delta = SLoraLinearVariant.delta_weight(module, "default")
            else:
                delta = module.get_delta_weight("default")
            found[name] = delta.detach().float().clone()
    return found


def first_step(method: str, settings, batch: dict, lr: float) -> dict:
    """The norm of the effective update of one AdamW step of ``method`` at ``lr``."""
    from peft import get_peft_model

    from nlora.cli.methods import peft_config
    from nlora.cli.models import load_model

    torch.manual_seed(0)
    base, _ = load_model(settings.model, settings.task, trainable=True)
    model = get_peft_model(base, peft_config(dataclasses.replace(settings, method=method)))
    before = deltas(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    after = deltas(model)
    squared = sum(float((after[k] - before[k]).pow(2).sum()) for k in before)
    return {"method": method, "lr": lr, "update_norm": math.sqrt(squared), "loss_before": float(loss),
            "layers": len(before)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lr", type=float, default=PAPER_RATE)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--tiny-model")
    parser.add_argument("--tiny-data")
    args = parser.parse_args()
    from transformers import DataCollatorForSeq2Seq

    from nlora.cli.data import train_and_eval_rows
    from nlora.cli.models import load_model
    from nlora.cli.train import tokenize

    settings = task_settings("math", 150, args.tiny_model if args.tiny else None, args.tiny_data)
    settings = dataclasses.replace(settings, bf16=False)
    rows = train_and_eval_rows(settings)[0][: settings.per_device_train_batch_size]
    _, tokenizer = load_model(settings.model, settings.task)
    (examples,) = tokenize(settings, tokenizer, rows)
    batch = DataCollatorForSeq2Seq(tokenizer, padding=True)(examples)
    results = [first_step(method, settings, batch, args.lr) for method in METHODS]
    lora = next(r["update_norm"] for r in results if r["method"] == "lora")
    for row in results:
        row["ratio_to_lora"] = row["update_norm"] / lora if lora else math.nan
    write_results("first_step" + ("_tiny" if args.tiny else ""), {"machine": machine(), "lr": args.lr,
                                                                  "results": results})  # fmt: skip
    if args.tiny:
        return
    table = markdown(["method", "‖ΔW_eff‖ after one step", "× LoRA's", "first-batch loss"],
                     [[r["method"], f"{r['update_norm']:.4g}", f"{r['ratio_to_lora']:.1f}", f"{r['loss_before']:.3f}"]
                      for r in results])  # fmt: skip
    update_section(
        "first-step",
        f"Command: `python bench/first_step.py` (SmolLM2-135M, the math recipe's first batch of 4, r = 8 on every "
        f"linear layer, one AdamW step at lr {args.lr:g}, fp32) · machine: {machine()}\n\n{table}",
    )


if __name__ == "__main__":
    main()
