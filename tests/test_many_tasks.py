"""Many IntTune tasks on one base: shared frozen factors, one batched mixed-task forward, loading N-only checkpoints."""

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model

from models import LLAMA_TARGETS, llama
from nlora import NLoraConfig

TASKS = [f"task{i}" for i in range(6)]


def inttune(**overrides) -> NLoraConfig:
    return NLoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, train_intermediate_only=True,
                       save_frozen_factors=False, **overrides)  # fmt: skip


def many_tasks(tasks=TASKS, dtype=torch.float32):
    """A tiny Llama with one IntTune adapter per task, each with its own (random) N, as if trained."""
    torch.manual_seed(0)
    base = llama().to(dtype)
    original = copy.deepcopy(base)
    model = get_peft_model(base, inttune(), adapter_name=tasks[0])
    for name in tasks[1:]:
        model.add_adapter(name, inttune())
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        for N in getattr(module, "lora_N", {}).values():
            N.weight.data.normal_(generator=generator).mul_(0.3)
    return model.eval(), original.eval()


def layers(model):
    return [m for m in model.modules() if hasattr(m, "lora_N") and hasattr(m, "lora_A")]


def test_tasks_share_one_A_and_B_per_layer():
    model, _ = many_tasks()
    for layer in layers(model):
        first = TASKS[0]
        for name in TASKS[1:]:
            assert layer.lora_A[name].weight is layer.lora_A[first].weight
            assert layer.lora_B[name].weight is layer.lora_B[first].weight
            assert layer.lora_N[name].weight is not layer.lora_N[first].weight
    factors = {id(p) for layer in layers(model) for c in ("lora_A", "lora_B") for p in getattr(layer, c).parameters()}
    assert len(factors) == 2 * len(layers(model))  # one A and one B per layer, whatever the number of tasks


def test_adapters_that_must_not_share_keep_their_own_factors():
    torch.manual_seed(0)
    model = get_peft_model(llama(), NLoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS), adapter_name="a")
    # a full NLoRA adapter trains its A and B: an IntTune adapter on the same residual must not share them
    model.add_adapter("b", inttune())
    layer = layers(model)[0]
    assert layer.lora_A["b"].weight is not layer.lora_A["a"].weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_task_batch_equals_each_task_alone_and_base_rows_are_the_base(dtype):
    model, original = many_tasks(dtype=dtype)
    torch.manual_seed(2)
    ids = torch.randint(0, 64, (9, 7))
    names = ["task0", "task3", "__base__", "task5", "task3", "task1", "__base__", "task2", "task4"]
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
        for i, name in enumerate(names):
            if name == "__base__":
                alone = original(input_ids=ids[i : i + 1]).logits  # the model the user started from
            else:
                model.set_adapter(name)
                alone = model(input_ids=ids[i : i + 1]).logits
            tol = 1e-5 if dtype == torch.float32 else 0.03 * alone.abs().max().item()
            torch.testing.assert_close(mixed[i : i + 1].float(), alone.float(), atol=tol, rtol=0)


def test_mixed_batch_through_generate():
    model, _ = many_tasks()
    ids = torch.randint(0, 64, (3, 5), generator=torch.Generator().manual_seed(3))
    names = ["task1", "task4", "task1"]
    with torch.no_grad():
        # min_new_tokens: a row that meets EOS early would be padded in the batch and stop short alone
        mixed = model.generate(input_ids=ids, adapter_names=names, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        for i, name in enumerate(names):
            model.set_adapter(name)
            alone = model.generate(input_ids=ids[i : i + 1], max_new_tokens=4, min_new_tokens=4, do_sample=False)
            assert torch.equal(mixed[i : i + 1], alone)


def test_n_only_checkpoints_load_into_the_shared_factors_and_a_wrong_base_is_refused(tmp_path):
    model, _ = many_tasks(TASKS[:3])
    for name in TASKS[:3]:
        model.save_pretrained(tmp_path / "saved", selected_adapters=[name])
    torch.manual_seed(0)
    base = llama()
    loaded = PeftModel.from_pretrained(base, tmp_path / "saved" / "task1", adapter_name="task1")
    for name in ("task0", "task2"):
        loaded.load_adapter(tmp_path / "saved" / name, adapter_name=name)
    for layer in layers(loaded):
        assert layer.lora_A["task0"].weight is layer.lora_A["task1"].weight is layer.lora_A["task2"].weight
    ids = torch.randint(0, 64, (3, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, adapter_names=["task2", "task0", "task1"]).logits,
                                   model(input_ids=ids, adapter_names=["task2", "task0", "task1"]).logits,
                                   atol=1e-5, rtol=0)  # fmt: skip
    torch.manual_seed(5)
    other = llama()  # the same architecture, other weights: its Nyström factors differ
    with pytest.raises(ValueError, match="fingerprint|different base|weights"):
        PeftModel.from_pretrained(other, tmp_path / "saved" / "task1")


@pytest.mark.parametrize("model_name", ["embedding", "gpt2", "tied_llama"])
def test_base_rows_of_a_mixed_batch_are_the_original_model_on_every_layer_kind(model_name):
    """Embeddings, GPT-2's Conv1D and tied embeddings: a '__base__' row never sees the residual W - s B0 N0 A0."""
    from conftest import make_config
    from models import build, output

    base, x = build(model_name)
    model = get_peft_model(copy.deepcopy(base), make_config(model_name, "nlora")).eval()
    for module in model.modules():  # as if trained: the adapter is no longer the identity
        for N in getattr(module, "lora_N", {}).values():
            N.weight.data.mul_(1.5)
    rows = x.shape[0]
    names = ["__base__" if i % 2 else "default" for i in range(rows)]
    with torch.no_grad():
        mixed = model(x, adapter_names=names)
        mixed = mixed.logits if hasattr(mixed, "logits") else mixed
        expected_base = output(base, x)
        adapted = output(model, x)
    for i, name in enumerate(names):
        want = expected_base if name == "__base__" else adapted
        torch.testing.assert_close(mixed[i], want[i], atol=1e-5, rtol=1e-5)
