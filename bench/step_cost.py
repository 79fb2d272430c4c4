"""Benchmark 2: training-step cost of SLoRA, NLoRA and IntTune against PEFT LoRA at the same rank.

Run:  python bench/step_cost.py            (SmolLM2-135M, batch 4 x 128 tokens, r = 8 and 32; ~10 min)
      python bench/step_cost.py --tiny     (a tiny random Llama; smoke test)

All four models live in one process and are stepped interleaved (LoRA, SLoRA, NLoRA, IntTune, LoRA, ...) after two
warm-up steps each; a step is forward + backward + AdamW step + zero_grad. Optimizer state is counted exactly
(AdamW keeps two fp32 tensors per trainable parameter); the memory column is the growth of peak RSS during one step.
"""

from __future__ import annotations

import argparse
import copy
import warnings

import torch
from common import interleaved, machine, markdown, median, peak_rss_delta, update_section, write_results
from peft import LoraConfig, get_peft_model

from nlora import NLoraConfig

warnings.filterwarnings("ignore")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = {
    "PEFT LoRA": lambda r: LoraConfig(r=r, lora_alpha=r, target_modules=TARGETS),
    "SLoRA": lambda r: NLoraConfig(r=r, lora_alpha=r, target_modules=TARGETS, init_lora_weights="slora"),
    "NLoRA": lambda r: NLoraConfig(r=r, lora_alpha=r, target_modules=TARGETS),
    "IntTune": lambda r: NLoraConfig(r=r, lora_alpha=r, target_modules=TARGETS, train_intermediate_only=True),
}


def load_base(tiny: bool):
    if tiny:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
        return LlamaForCausalLM(config), torch.randint(0, 128, (4, 32))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nlora.cli.assets import gsm8k_split, smollm2_path

    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    texts = [row["question"] + " " + row["answer"] for row in gsm8k_split("train")[:4]]
    ids = tokenizer(texts, max_length=128, truncation=True, padding="max_length", return_tensors="pt")["input_ids"]
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), ids


def make_step(model, batch):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, optimizer


def optimizer_state_mib(optimizer) -> float:
    return (
        sum(
            t.numel() * t.element_size()
            for s in optimizer.state.values()
            for t in s.values()
            if torch.is_tensor(t) and t.dim() > 0
        )
        / 2**20
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    base, batch = load_base(args.tiny)
    ranks = [4] if args.tiny else [8, 32]
    repeats = args.repeats or (2 if args.tiny else 12)
    rows = []
    for r in ranks:
        steps, optimizers, models = {}, {}, {}
        for name, make in METHODS.items():
            models[name] = get_peft_model(copy.deepcopy(base), make(r)).train()
            steps[name], optimizers[name] = make_step(models[name], batch)
            steps[name]()  # warm-up (allocates optimizer state)
            steps[name]()
        times = interleaved(steps, repeats)
        lora_time = median(times["PEFT LoRA"])
        lora_state = optimizer_state_mib(optimizers["PEFT LoRA"])
        for name in METHODS:
            _, memory = peak_rss_delta(steps[name])
            state = optimizer_state_mib(optimizers[name])
            t = median(times[name])
            trainable = models[name].get_nb_trainable_parameters()[0]
            rows.append(
                {
                    "r": r,
                    "method": name,
                    "trainable_params": trainable,
                    "step_seconds": t,
                    "step_over_lora": t / lora_time,
                    "tokens_per_s": batch.numel() / t,
                    "optimizer_state_mib": state,
                    "state_over_lora": state / lora_state,
                    "step_peak_rss_growth_mib": memory,
                }
            )
        del models, steps, optimizers
    payload = {
        "machine": machine(),
        "command": "python bench/step_cost.py" + (" --tiny" if args.tiny else ""),
        "batch": list(batch.shape),
        "repeats": repeats,
        "rows": rows,
    }
    write_results("step_cost" + ("_tiny" if args.tiny else ""), payload)
    if args.tiny:
        return
    table = markdown(
        [
            "r",
            "method",
            "trainable params",
            "step s (median)",
            "step / LoRA",
            "tokens/s",
            "optimizer state MiB",
            "state / LoRA",
            "peak RSS growth in a step, MiB",
        ],
        [
            [
                x["r"],
                x["method"],
                f"{x['trainable_params']:,}",
                x["step_seconds"],
                x["step_over_lora"],
                x["tokens_per_s"],
                x["optimizer_state_mib"],
                x["state_over_lora"],
                x["step_peak_rss_growth_mib"],
            ]
            for x in rows
        ],
    )
    update_section(
        "step-cost",
        f"Command: `{payload['command']}` · batch {payload['batch']} · {repeats} interleaved "
        f"steps per method · machine: {payload['machine']}\n\n{table}",
    )


if __name__ == "__main__":
    main()
