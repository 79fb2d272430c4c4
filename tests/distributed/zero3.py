"""DeepSpeed ZeRO-3 on CPU (2 processes, gloo) against one plain process, for every init.

Run by tests/test_engines.py as ``torchrun --nproc_per_node 2 tests/distributed/zero3.py MODEL_DIR OUT_DIR``.
For each init: the adapter and residual base gathered on each rank equal a 1-process run bit for bit, the loss of
a few steps matches, an unconsolidated save is refused, and the consolidated adapter is saved for the reload check.
"""

import json
import os
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from peft import get_peft_model
from transformers import AutoModelForCausalLM
from transformers.integrations import HfDeepSpeedConfig

import nlora  # noqa: F401
from nlora import NLoraConfig

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
INITS = {
    "nlora": {},
    "nlora_reference": {"init_lora_weights": "nlora_reference"},
    "slora": {"init_lora_weights": "slora"},
    "inttune": {"train_intermediate_only": True},
}
STEPS = 3
DS = {
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 1,
    "train_batch_size": 4,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "zero_allow_untested_optimizer": True,
}


def config(name):
    return NLoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, **INITS[name])


def batch():
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(0))
    return ids


def one_process(model_dir, name):
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), config(name))
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids, losses = batch(), []
    for _ in range(STEPS):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    with torch.no_grad():
        logits = model.eval()(input_ids=ids).logits
    return state, losses, logits


def main(model_dir, out_dir):
    # gloo runs every collective on the CPU. Without this, DeepSpeed JIT-compiles its optional shared-memory kernel
    # under a file lock in TORCH_EXTENSIONS_DIR, and a first build that was killed leaves the lock behind: every later
    # run then waits on it forever (test_engines.py proves the run no longer touches it).
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    report = {}
    for name in INITS:
        expected_state, expected_losses, expected_logits = one_process(model_dir, name)
        keep = HfDeepSpeedConfig(DS)  # noqa: F841  (transformers holds a weak reference)
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        partitioned = base.model.layers[0].self_attn.q_proj.weight
        assert partitioned.numel() == 0 and tuple(partitioned.ds_shape) == (32, 32), "not partitioned"
        model = get_peft_model(base, config(name))
        params = dict(model.named_parameters())
        with deepspeed.zero.GatheredParameters(list(params.values())):
            mismatched = [n for n, p in params.items() if not torch.equal(p.detach(), expected_state[n])]
        assert not mismatched, f"{name}: initial parameters differ from one process: {mismatched[:3]}"

        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=DS)
        ids, losses = batch()[2 * rank : 2 * rank + 2], []
        for _ in range(STEPS):
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            losses.append(mean.item() / dist.get_world_size())
        diff = max(abs(a - b) for a, b in zip(losses, expected_losses))
        assert diff < 1e-5, f"{name}: loss trajectory {losses} vs one process {expected_losses}"

        try:
            engine.module.save_pretrained(Path(out_dir) / "refused")
            raise AssertionError(f"{name}: saving without the consolidated state dict was not refused")
        except ValueError as err:
            refusal = str(err)
        state = engine._zero3_consolidated_16bit_state_dict()  # every rank takes part
        if rank == 0:
            engine.module.save_pretrained(Path(out_dir) / name, state_dict=state)
            torch.save(expected_logits, Path(out_dir) / f"{name}.one_process_logits.pt")
        report[name] = {"losses": losses, "one_process": expected_losses, "refusal": refusal}
        del engine, model, base, keep
    if rank == 0:
        (Path(out_dir) / "report.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()  # an open gloo group can abort the interpreter's exit (SIGABRT)


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main(*sys.argv[1:3])
