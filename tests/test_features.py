"""Multi-adapter use, mixed batches, IntTune freezing and N-only checkpoints, compile, Trainer, half precision."""

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from conftest import make_config, snapshot, tiny_training_args, train
from models import build, output
from nlora import NLoraConfig, init_report


@pytest.mark.parametrize("model_name", ["mlp", "gpt2", "embedding"])
def test_two_adapters_switch_mix_and_delete(model_name):
    base, x = build(model_name)
    base_out = output(base, x).detach()
    model = get_peft_model(base, make_config(model_name, "slora", init_lora_weights=False))
    model.add_adapter("other", make_config(model_name, "nlora", residual=False, init_lora_weights="nlora"))
    model.eval()
    out_default = output(model, x).detach()
    model.set_adapter("other")
    out_other = output(model, x).detach()
    assert (out_default - out_other).abs().max() > 1e-4
    # a second adapter gets its own N (the authors' fork created N for the first adapter only)
    assert all({"default", "other"} <= set(m.lora_N) for m in model.modules() if hasattr(m, "lora_N"))
    # mixed batch: each row uses its own adapter
    names = ["default", "other", "__base__", "default"][: x.shape[0]]
    mixed = model(x, adapter_names=names)
    mixed = mixed.logits if hasattr(mixed, "logits") else mixed
    for i, name in enumerate(names):
        expected = {"default": out_default, "other": out_other, "__base__": base_out}[name]
        torch.testing.assert_close(mixed[i], expected[i], atol=1e-5, rtol=1e-5)
    model.delete_adapter("other")
    assert all("other" not in m.lora_N for m in model.modules() if hasattr(m, "lora_N"))
    model.set_adapter("default")
    torch.testing.assert_close(output(model, x), out_default)


def test_a_residual_adapter_is_joined_only_by_the_same_init():
    base, _ = build("mlp")
    model = get_peft_model(base, make_config("mlp", "nlora"))
    before = snapshot(model)
    with pytest.raises(ValueError, match="only with the very same init settings"):
        model.add_adapter("other", make_config("mlp", "slora"))
    assert "other" not in model.peft_config
    assert all(torch.equal(v, snapshot(model)[k]) for k, v in before.items())


def test_delete_residual_adapter_restores_base_weights():
    base, x = build("mlp")
    base_out = output(base, x).detach()
    model = get_peft_model(base, make_config("mlp", "nlora"))
    train(model, x)
    model.base_model.delete_adapter("default")
    torch.testing.assert_close(output(model.base_model.model, x), base_out, atol=1e-5, rtol=0)


def test_inttune_freezing_survives_set_adapter_enable_and_reload(tmp_path):
    base, x = build("llama")
    model = get_peft_model(base, make_config("llama", "inttune"))
    only_n = lambda m: {n for n, p in m.named_parameters() if p.requires_grad}  # noqa: E731
    assert only_n(model) and all(".lora_N." in n for n in only_n(model))
    model.set_adapter("default")
    with model.disable_adapter():
        pass
    model.base_model.enable_adapter_layers()
    assert all(".lora_N." in n for n in only_n(model)) and only_n(model)
    train(model, x)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(build("llama")[0], tmp_path, is_trainable=True)
    trainable = only_n(reloaded)
    assert trainable and all(".lora_N." in n for n in trainable)


@pytest.mark.parametrize("model_name", ["mlp", "gpt2", "embedding", "llama"])
def test_inttune_n_only_checkpoint_roundtrip_and_checksum(model_name, tmp_path):
    base, x = build(model_name)
    model = get_peft_model(base, make_config(model_name, "inttune", save_frozen_factors=False))
    train(model, x)
    out = output(model, x).detach()
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert {k for k in saved if ".lora_" in k} and all(".lora_N." in k or "fingerprint" in k for k in saved)
    for low_cpu in (False, True):
        loaded = PeftModel.from_pretrained(build(model_name)[0], tmp_path, low_cpu_mem_usage=low_cpu)
        torch.testing.assert_close(output(loaded, x), out, atol=1e-6, rtol=0)

    other_base, _ = build(model_name, seed=1)  # A and B re-derived from a different base cannot match
    reference = copy.deepcopy(other_base)
    with pytest.raises(ValueError, match="trained on another base model"):
        PeftModel.from_pretrained(other_base, tmp_path)
    torch.testing.assert_close(output(other_base, x), output(reference, x))  # the refused load was rolled back
    assert not any("lora_" in n for n, _ in other_base.named_parameters())


def test_zero_intermediate_start_is_identity_without_touching_w_and_trains():
    base, x = build("mlp")
    base_out = output(base, x).detach()
    w_before = base.lin0.weight.detach().clone()
    model = get_peft_model(base, make_config("mlp", "inttune", intermediate_init="zero"))
    assert torch.equal(model.base_model.model.lin0.base_layer.weight, w_before)
    torch.testing.assert_close(output(model, x), base_out, atol=1e-6, rtol=0)
    train(model, x)
    assert (output(model, x) - base_out).abs().max() > 1e-4


def test_init_report_records_approximation_error_per_layer():
    base, _ = build("llama")
    model = get_peft_model(base, make_config("llama", "nlora"))
    report = init_report(model)
    assert len(report) == 2 * 7
    assert all(v["residual"] and 0 < v["approx_error"] < 1 for v in report.values())
    ref = get_peft_model(build("llama")[0], make_config("llama", "nlora_reference"))
    computed = init_report(ref, compute_missing=True)
    assert all(v["approx_error"] is not None and not v["residual"] for v in computed.values())


def test_torch_compile_matches_eager():
    base, x = build("mlp")
    model = get_peft_model(base, make_config("mlp", "nlora"))
    train(model, x)
    eager = output(model, x)
    compiled = torch.compile(model, backend="aot_eager")
    torch.testing.assert_close(compiled(x), eager, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["slora", "nlora"])
def test_half_precision_forward_and_merge(dtype, mode):
    base, x = build("llama")
    base = base.to(dtype)
    base_out = output(base, x).float().detach()
    model = get_peft_model(base, make_config("llama", mode))  # adapters autocast to fp32
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if ".lora_" in n)
    torch.testing.assert_close(output(model, x).float(), base_out, atol=0.05, rtol=0.05)
    train(model, x)
    out = output(model, x).float().detach()
    assert torch.isfinite(out).all()
    model.merge_adapter()
    assert all(m.get_base_layer().weight.dtype == dtype for m in model.modules() if hasattr(m, "lora_N"))
    torch.testing.assert_close(output(model, x).float(), out, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("mode", ["nlora", "nlora_reference", "inttune", "slora"])
@pytest.mark.parametrize("autocast", [True, False])
def test_adapter_creation_draws_nothing_and_follows_the_base_dtype(mode, autocast):
    """The factors are set by nlora's init: PEFT's Kaiming draw of A and B (for the slicing init, longer than the init
    itself) is skipped, so the global RNG is untouched, and the adapter still gets the base's device and dtype."""
    base, x = build("llama")
    base = base.to(torch.bfloat16)
    torch.manual_seed(7)
    expected = torch.rand(4)
    torch.manual_seed(7)
    model = get_peft_model(base, make_config("llama", mode), autocast_adapter_dtype=autocast)
    assert torch.equal(torch.rand(4), expected)  # nothing drawn from the global RNG
    adapters = {n: p for n, p in model.named_parameters() if ".lora_" in n}
    assert adapters and not any(p.device.type == "meta" for p in adapters.values())
    assert {p.dtype for p in adapters.values()} == {torch.float32 if autocast else torch.bfloat16}
    assert all(p.is_contiguous() for p in adapters.values())
    trainable = {n for n, p in adapters.items() if p.requires_grad}
    assert trainable and all(".lora_N." in n for n in trainable) == (mode == "inttune")
    assert torch.isfinite(output(model, x).float()).all()


def test_authors_quickstart_works_with_one_change():
    from peft import TaskType

    base, x = build("llama")
    peft_config = NLoraConfig(  # was: LoraConfig(..., init_lora_weights='n_lora')
        task_type=TaskType.CAUSAL_LM,
        target_modules=["q_proj", "o_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
        inference_mode=False,
        r=8,
        lora_alpha=8,
        lora_dropout=0,
        init_lora_weights="n_lora",
    )
    assert peft_config.init_lora_weights == "nlora_reference"
    model = get_peft_model(base, peft_config)
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    w = q.base_layer.weight
    torch.testing.assert_close(q.lora_N["default"].weight, w[:8, :8])
    assert NLoraConfig(init_lora_weights="s_lora").init_lora_weights == "slora"


def test_transformers_trainer_trains_and_saves(tmp_path):
    from datasets import Dataset
    from transformers import Trainer

    base, _ = build("llama")
    model = get_peft_model(base, make_config("llama", "inttune"))
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}
    ids = torch.randint(0, 64, (16, 12), generator=torch.Generator().manual_seed(0))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = tiny_training_args(tmp_path, logging_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    result = trainer.train()
    assert result.global_step == 4
    for n, p in model.named_parameters():
        if n in frozen_before:
            assert torch.equal(p, frozen_before[n]), n
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("mode", ["nlora", "slora"])
def test_low_cpu_mem_usage_injection_then_state_dict_load(mode):
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    base, x = build("llama")
    trained = train(get_peft_model(base, make_config("llama", mode)), x)
    out = output(trained, x).detach()
    state = get_peft_model_state_dict(trained)
    model = get_peft_model(build("llama")[0], make_config("llama", mode), low_cpu_mem_usage=True)
    assert any(p.device.type == "meta" for n, p in model.named_parameters() if ".lora_" in n)
    set_peft_model_state_dict(model, state, low_cpu_mem_usage=True)
    assert not any(p.device.type == "meta" for p in model.parameters())
    torch.testing.assert_close(output(model.eval(), x), out, atol=1e-6, rtol=0)


def test_reload_with_is_trainable_makes_a_n_and_b_trainable(tmp_path):
    base, x = build("mlp")
    get_peft_model(base, make_config("mlp", "nlora")).save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(build("mlp")[0], tmp_path, is_trainable=True)
    kinds = {n.split(".lora_")[1].split(".")[0] for n, p in loaded.named_parameters() if p.requires_grad}
    assert kinds == {"A", "B", "N"}
