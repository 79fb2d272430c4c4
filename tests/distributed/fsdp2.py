"""FSDP2 (``fully_shard``) on CPU, 2 processes over gloo, against one plain process.

Run by tests/test_engines.py as ``torchrun --nproc_per_node 2 tests/distributed/fsdp2.py MODEL_DIR OUT_DIR``.
1. Every rank loads the weights, wraps after get_peft_model, trains a few AdamW steps: the full state dict equals
   one process; rank 0 saves the adapter from it.
2. Only rank 0 loads the weights, rank 1 builds on meta: after set_model_state_dict(broadcast_from_rank0=True) and
   nlora.broadcast_init_state, every rank holds the 1-process init (parameters and init records) bit for bit.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from peft import get_peft_model
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import AutoConfig, AutoModelForCausalLM

import nlora
from nlora import NLoraConfig

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
STEPS = 3
FULL = StateDictOptions(full_state_dict=True)  # every rank gets the full dict (cpu_offload: rank 0 only)


def peft_model(model_dir, meta=False, **config):
    if meta:
        with torch.device("meta"):
            base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=torch.float32)
    else:
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return get_peft_model(base, NLoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, **config))


def shard(model):
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def train(model, ids):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(STEPS):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


def records(model):
    out = {}
    for name, module in model.named_modules():
        for adapter, (factors, scaling) in getattr(module, "nlora_initial", {}).items():
            out[f"{name}.{adapter}"] = (factors.A, factors.N, factors.B, scaling)
    return out


def main(model_dir, out_dir):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(0))

    # 1. weights on every rank, wrap after get_peft_model, train, full state dict == one process
    reference = peft_model(model_dir)
    train(reference, ids)
    expected = reference.state_dict()
    model = shard(peft_model(model_dir))
    train(model, ids[2 * rank : 2 * rank + 2])
    full = get_model_state_dict(model, options=FULL)
    assert full.keys() == expected.keys(), sorted(set(full) ^ set(expected))[:6]
    for key, value in full.items():
        torch.testing.assert_close(value, expected[key], atol=1e-5, rtol=1e-5, msg=key)
    if rank == 0:
        torch.save(reference.eval()(input_ids=ids).logits.detach(), Path(out_dir) / "one_process_logits.pt")
        model.save_pretrained(Path(out_dir) / "adapter", state_dict=full)

    # 2. only rank 0 holds the weights
    for config in ({}, {"train_intermediate_only": True}, {"init_lora_weights": "nlora_reference"}):
        reference = peft_model(model_dir, **config)
        model = peft_model(model_dir, meta=rank != 0, **config)
        if rank != 0:
            assert all(getattr(m, "nlora_pending", None) for m in model.modules() if hasattr(m, "lora_N"))
        model = shard(model)
        if rank != 0:
            model.to_empty(device="cpu")
        state = get_model_state_dict(reference, options=FULL) if rank == 0 else {}
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        nlora.broadcast_init_state(model)
        full = get_model_state_dict(model, options=FULL)
        for key, value in reference.state_dict().items():
            assert torch.equal(full[key], value), f"{config}: {key} differs on rank {rank}"
        mine, theirs = records(model), records(reference)
        assert mine.keys() == theirs.keys()
        for key in mine:
            assert all(torch.equal(a, b) for a, b in zip(mine[key][:3], theirs[key][:3])), key
        assert not any(getattr(m, "nlora_pending", None) for m in model.modules())
        grads = model(input_ids=ids).logits.sum()  # the synced model runs
        assert torch.isfinite(grads)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
