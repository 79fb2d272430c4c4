"""PEFT's conformance invariants, for every init mode on every model kind."""

import json
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from conftest import IDENTITY_AT_INIT, MODES, make_config, snapshot, train
from models import MODELS, build, output
from nlora.layer import factor_names

CASES = [(m, mode) for m in MODELS for mode in MODES]
ids = [f"{m}-{mode}" for m, mode in CASES]


def adapted(model_name, mode, **overrides):
    base, x = build(model_name)
    base_out = output(base, x).detach()
    model = get_peft_model(base, make_config(model_name, mode, **overrides))
    return model, x, base_out


@pytest.mark.parametrize("model_name,mode", CASES, ids=ids)
def test_step0_output(model_name, mode):
    model, x, base_out = adapted(model_name, mode)
    out = output(model, x)
    if mode in IDENTITY_AT_INIT:
        torch.testing.assert_close(out, base_out, atol=1e-5, rtol=0)
    else:  # nlora_reference adds s*C*U*R, by design of the authors' release
        assert (out - base_out).abs().max() > 1e-6


@pytest.mark.parametrize("model_name,mode", CASES, ids=ids)
def test_trainable_parameter_count(model_name, mode):
    model, _, _ = adapted(model_name, mode)
    expected = 0
    for module in model.modules():
        if hasattr(module, "lora_N") and "default" in module.lora_N:
            name_A, name_B = factor_names(module)
            r = module.r["default"]
            A = getattr(module, name_A)["default"]
            B = getattr(module, name_B)["default"]
            in_f = (A.weight if hasattr(A, "weight") else A).shape[1]
            out_f = (B.weight if hasattr(B, "weight") else B).shape[0]
            expected += r * r if mode == "inttune" else r * (in_f + out_f) + r * r
    trainable, _ = model.get_nb_trainable_parameters()
    assert expected > 0 and trainable == expected


@pytest.mark.parametrize("model_name,mode", CASES, ids=ids)
def test_training_changes_exactly_the_trainable_adapter_params(model_name, mode):
    model, x, _ = adapted(model_name, mode)
    before = snapshot(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    train(model, x)
    after = snapshot(model)
    for name, value in before.items():
        changed = not torch.equal(value, after[name])
        assert changed == (name in trainable), name
    if mode == "inttune":
        assert trainable and all(".lora_N." in n for n in trainable)
    else:
        assert {n.split(".lora_")[1].split(".")[0] for n in trainable} >= {"N"}


@pytest.mark.parametrize("model_name,mode", CASES, ids=ids)
def test_merge_unmerge_and_safe_merge(model_name, mode, clone):
    model, x, base_out = adapted(model_name, mode)
    train(model, x)
    out = output(model, x).detach()
    assert (out - base_out).abs().max() > 1e-4  # the adapter does something
    model.merge_adapter()
    torch.testing.assert_close(output(model, x), out, atol=1e-4, rtol=1e-4)
    model.unmerge_adapter()
    torch.testing.assert_close(output(model, x), out, atol=1e-4, rtol=1e-4)
    safe = clone(model)
    safe.base_model.merge_adapter(safe_merge=True)
    assert all(m.merged for m in safe.modules() if hasattr(m, "lora_N"))
    torch.testing.assert_close(output(safe, x), out, atol=1e-4, rtol=1e-4)
    merged = clone(model).merge_and_unload(safe_merge=True)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(output(merged, x), out, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("model_name,mode", CASES, ids=ids)
def test_disable_adapter_and_unload(model_name, mode, clone):
    model, x, base_out = adapted(model_name, mode)
    train(model, x)
    out = output(model, x).detach()
    with model.disable_adapter():
        disabled = output(model, x)
    # a residual adapter too: the base model the user started from (TRL's reference), not W - s*B0*N0*A0
    torch.testing.assert_close(disabled, base_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(output(model, x), out)  # adapter back on
    unloaded = clone(model).unload()  # residuals are added back: the original base model
    torch.testing.assert_close(output(unloaded, x), base_out, atol=1e-5, rtol=0)


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True], ids=["default", "low_cpu_mem"])
@pytest.mark.parametrize("model_name,mode", CASES, ids=ids)
def test_save_load_roundtrip(model_name, mode, low_cpu_mem_usage, tmp_path):
    model, x, _ = adapted(model_name, mode, nystrom_landmarks="random")
    train(model, x)
    out = output(model, x).detach()
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "NLORA"
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert any(".lora_N." in k for k in saved)

    base, _ = build(model_name)
    torch.manual_seed(54321)  # a different global RNG state must not matter
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(base, tmp_path, low_cpu_mem_usage=low_cpu_mem_usage)
    assert not [w for w in caught if "missing" in str(w.message).lower()]
    assert not any(p.device.type == "meta" for p in loaded.parameters())
    assert torch.equal(output(loaded, x), out)  # exactly: every init choice is re-derived deterministically
    assert loaded.get_nb_trainable_parameters()[0] == 0  # inference mode by default
