"""Many tasks on one base: IntTune adapters that share A and B against stock PEFT LoRA adapters, in one mixed batch.

Run:  python bench/many_tasks.py            (SmolLM2-135M, r = 8 on every linear layer, fp32; ~10 min here)
      python bench/many_tasks.py --tiny     (a tiny random Llama; smoke test)

A batch of 64 requests (32 prompt tokens each) spread over 1, 8 or 64 distinct tasks, through ``model(...,
adapter_names=[...])`` and ``generate(..., adapter_names=[...])``. IntTune: every task is an N-only adapter on the
same Nyström factors, so nlora computes ``x A^T`` and ``(.) B^T`` once per layer and each row's N in one batched
product; LoRA: PEFT's own mixed batch, which loops over the adapters of the batch. Measured in one process, the
variants interleaved: forward seconds per batch (median), generated tokens per second, and the memory each added
task costs (exact parameter count of new tensors, and the growth of resident memory).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
import warnings

import torch
from common import machine, markdown, update_section, write_results

warnings.filterwarnings("ignore")
BATCH, PROMPT, NEW_TOKENS, R = 64, 32, 8, 8
TASK_COUNTS = (1, 8, 64)


def rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096 / 2**20


def unique_numbers(model) -> int:
    """Numbers held by adapter tensors, each storage counted once (shared A and B count once)."""
    seen, total = set(), 0
    for name, param in model.named_parameters():
        if "lora_" in name and param.data_ptr() not in seen:
            seen.add(param.data_ptr())
            total += param.numel()
    return total


def build(kind: str, tasks: int, tiny: bool):
    """The base with ``tasks`` adapters of ``kind``; N (IntTune) or B (LoRA) randomised as if trained."""
    from peft import LoraConfig, get_peft_model

    from nlora import NLoraConfig

    torch.manual_seed(0)
    base = load_base(tiny)
    if kind == "inttune":
        config = NLoraConfig(r=R, lora_alpha=R, target_modules="all-linear", train_intermediate_only=True,
                             save_frozen_factors=False)  # fmt: skip
    else:
        config = LoraConfig(r=R, lora_alpha=R, target_modules="all-linear")
    model = get_peft_model(base, config, adapter_name="t0")
    sizes = [(unique_numbers(model), rss_mb())]
    for i in range(1, tasks):
        model.add_adapter(f"t{i}", config)
        if i == 1:
            sizes.append((unique_numbers(model), rss_mb()))
    generator = torch.Generator().manual_seed(1)
    for name, param in model.named_parameters():
        if ("lora_N" if kind == "inttune" else "lora_B") in name:
            param.data.normal_(generator=generator).mul_(0.01)
    sizes.append((unique_numbers(model), rss_mb()))
    return model.eval(), sizes


def load_base(tiny: bool):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if tiny:
        return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2))  # fmt: skip
    from nlora.cli.assets import smollm2_path

    return AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32)


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(kind: str, tasks: int, tiny: bool, repeats: int) -> dict:
    batch, prompt, new_tokens = (8, 8, 2) if tiny else (BATCH, PROMPT, NEW_TOKENS)
    model, sizes = build(kind, tasks, tiny)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, prompt), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    names = [f"t{i % tasks}" for i in range(batch)]
    with torch.inference_mode():
        model(input_ids=ids, attention_mask=mask, adapter_names=names)  # warm-up
        forward = timed(lambda: model(input_ids=ids, attention_mask=mask, adapter_names=names), repeats)
        generate = timed(lambda: model.generate(input_ids=ids, attention_mask=mask, adapter_names=names,
                                                max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                                pad_token_id=0), 1)  # fmt: skip
    layers = sum(1 for m in model.modules() if hasattr(m, "lora_A") and "t0" in getattr(m, "lora_A", {}))
    per_task = sizes[-1][0] - sizes[0][0]
    return {"kind": kind, "tasks": tasks, "forward_s": forward, "generate_tokens_per_s": batch * new_tokens / generate,
            "numbers_per_added_task": per_task / max(tasks - 1, 1), "layers": layers,
            "rss_mb_per_added_task": (sizes[-1][1] - sizes[0][1]) / max(tasks - 1, 1)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for tasks in (1, 4) if args.tiny else TASK_COUNTS:
        for kind in ("inttune", "lora"):
            rows.append(measure(kind, tasks, args.tiny, args.repeats))
            gc.collect()  # the previous model's memory back before the next one's RSS is read
    for row in rows:
        one = next(r for r in rows if r["kind"] == row["kind"] and r["tasks"] == 1)
        row["forward_vs_one_task"] = row["forward_s"] / one["forward_s"]
        row["numbers_per_task_vs_2r2L"] = row["numbers_per_added_task"] / (2 * R * R * row["layers"])
    write_results("many_tasks" + ("_tiny" if args.tiny else ""), {"machine": machine(), "rows": rows})
    if args.tiny:
        return
    table = markdown(
        ["adapters", "distinct tasks in the batch", "forward s / batch (median)", "× one task", "generate tokens/s",
         "numbers per added task", "× 2·r²·layers", "RSS MB per added task"],
        [[r["kind"], r["tasks"], f"{r['forward_s']:.3f}", f"{r['forward_vs_one_task']:.2f}",
          f"{r['generate_tokens_per_s']:.1f}", "–" if r["tasks"] == 1 else f"{r['numbers_per_added_task']:,.0f}",
          "–" if r["tasks"] == 1 else f"{r['numbers_per_task_vs_2r2L']:.2f}",
          "–" if r["tasks"] == 1 else f"{r['rss_mb_per_added_task']:.2f}"] for r in rows],
    )  # fmt: skip
    update_section(
        "many-tasks",
        f"Command: `python bench/many_tasks.py` (SmolLM2-135M fp32, r = {R} on all {rows[0]['layers']} linear layers, "
        f"a batch of {BATCH} requests of {PROMPT} tokens, {NEW_TOKENS} generated tokens) · machine: {machine()}"
        f"\n\n{table}",
    )


if __name__ == "__main__":
    main()
