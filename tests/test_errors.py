"""Every error is one clear sentence and leaves the model as it was."""

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

from conftest import make_config, snapshot, train
from models import MLP, build, output
from nlora import NLoraConfig


def assert_unchanged(model, reference, x):
    assert [n for n, _ in model.named_modules()] == [n for n, _ in reference.named_modules()]
    torch.testing.assert_close(output(model, x), output(reference, x), atol=0, rtol=0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"r": 0}, "rank r=0 is invalid for module 'lin0'"),
        ({"r": 17}, r"rank r=17 is invalid for module 'lin0' \(32x16\)"),
        ({"rank_pattern": {"lin1": 9}}, "rank r=9 is invalid for module 'lin1'"),
        ({"target_modules": ["nope"]}, "Target modules"),
    ],
)
@pytest.mark.parametrize("init", ["nlora", "slora", "nlora_reference"])
def test_bad_targets_raise_before_touching_the_model(kwargs, match, init):
    base, x = build("mlp")
    reference = copy.deepcopy(base)
    config = NLoraConfig(**{"r": 4, "target_modules": ["lin0", "lin1"], "init_lora_weights": init, **kwargs})
    with pytest.raises(ValueError, match=match):
        get_peft_model(base, config)
    assert_unchanged(base, reference, x)


class WithConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.conv = nn.Conv2d(1, 2, 3)


def test_unsupported_layer_type_names_module_and_type():
    with pytest.raises(ValueError, match="cannot adapt module 'conv' of type Conv2d"):
        get_peft_model(WithConv(), NLoraConfig(r=2, target_modules=["lin", "conv"]))


@pytest.mark.parametrize("init", ["nlora", "slora"])
def test_quantised_or_integer_weight_is_refused_with_a_way_forward(init):
    model = MLP()
    model.lin0.weight = nn.Parameter(torch.zeros(32, 16, dtype=torch.int8), requires_grad=False)
    with pytest.raises(ValueError, match="quantised or integer .*load the base model in fp32/bf16"):
        get_peft_model(model, NLoraConfig(r=2, target_modules=["lin0", "lin1"], init_lora_weights=init))
    assert isinstance(model.lin1, nn.Linear) and not hasattr(model.lin1, "base_layer")


def test_torch_dynamic_int8_model_is_refused_with_bitsandbytes_named():
    model = torch.ao.quantization.quantize_dynamic(MLP(), {nn.Linear}, dtype=torch.qint8)
    with pytest.raises(ValueError, match=r"module 'lin0': its Linear weight \(packed, from torch\.ao\..*bitsandbytes"):
        get_peft_model(model, NLoraConfig(r=2, target_modules=["lin0", "lin1"]))


def test_quantised_cli_run_without_bitsandbytes_names_the_install(monkeypatch, capsys, tmp_path):
    import sys

    from nlora.cli import main

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what an install without the [quant] extra looks like
    assert main(["train", "--load-in-4bit", "--output-dir", str(tmp_path / "run")]) == 2
    assert 'pip install "nlora[quant]"' in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_inttune_with_zero_factors_is_refused():
    with pytest.raises(ValueError, match="B at zero, so N would never get a gradient"):
        NLoraConfig(init_lora_weights="slora", train_intermediate_only=True)
    with pytest.raises(ValueError, match="B at zero"):
        NLoraConfig(init_lora_weights=True, train_intermediate_only=True)
    base, x = build("mlp")
    with torch.no_grad():
        base.lin1.weight[:, :4] = 0  # the authors' B = W[:, :r] is then all zeros
    reference = copy.deepcopy(base)
    config = NLoraConfig(r=4, target_modules=["lin0", "lin1"], init_lora_weights="n_lora", train_intermediate_only=True)
    with pytest.raises(ValueError, match="IntTune cannot train module 'lin1'"):
        get_peft_model(base, config)
    assert_unchanged(base, reference, x)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"init_lora_weights": "pissa"}, "unknown init_lora_weights='pissa'"),
        ({"use_dora": True}, "does not support use_dora"),
        ({"nystrom_core": "svd"}, "nystrom_core must be one of"),
        ({"save_frozen_factors": False}, "only valid with train_intermediate_only"),
        ({"nystrom_core": "lstsq", "nystrom_oversample": 1.0, "nystrom_orthonormal": False}, "nystrom_oversample=0"),
        ({"nystrom_orthonormal": False}, "works only with nystrom_core='lstsq'"),  # default core: project
    ],
)
def test_bad_config_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NLoraConfig(**kwargs)


def _saved_adapter(tmp_path, mode="nlora", **overrides):
    base, x = build("mlp")
    model = get_peft_model(base, make_config("mlp", mode, **overrides))
    train(model, x)
    model.save_pretrained(tmp_path)
    return x


def assert_load_refused(path, x, match):
    """Loading ``path`` raises ``match`` and leaves the base model exactly as it was."""
    base, _ = build("mlp")
    reference = copy.deepcopy(base)
    with pytest.raises(ValueError, match=match):
        PeftModel.from_pretrained(base, path)
    assert_unchanged(base, reference, x)


def test_truncated_checkpoint_is_refused_before_the_model_is_touched(tmp_path):
    x = _saved_adapter(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-50])
    assert_load_refused(tmp_path, x, "not a readable safetensors file .* the adapter is damaged")


def test_checkpoint_with_nan_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    x = _saved_adapter(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = next(k for k in tensors if ".lora_N." in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    assert_load_refused(tmp_path, x, "corrupt: .*lora_N.*NaN")


@pytest.mark.parametrize("mode", ["nlora", "slora"])
def test_checkpoint_of_another_rank_is_refused(mode, tmp_path):
    import json

    x = _saved_adapter(tmp_path, mode)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["r"] = 2  # e.g. a config edited or copied from another run
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    assert_load_refused(tmp_path, x, "has shape .* but the model expects")


def test_checkpoint_missing_tensors_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    x = _saved_adapter(tmp_path, "slora")
    tensors = {k: v for k, v in load_file(tmp_path / "adapter_model.safetensors").items() if "lin1" not in k}
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    assert_load_refused(tmp_path, x, "incomplete: 3 adapter tensors are missing")


def test_pickled_adapter_is_not_loaded(tmp_path):
    base, x = build("mlp")
    model = get_peft_model(base, make_config("mlp", "slora"))
    model.save_pretrained(tmp_path, safe_serialization=False)
    with pytest.raises(FileNotFoundError, match="does not load pickled adapter_model.bin files"):
        PeftModel.from_pretrained(build("mlp")[0], tmp_path)


def test_loading_without_nlora_registered_fails_loudly(tmp_path):
    import subprocess
    import sys

    _saved_adapter(tmp_path)
    script = (
        "import sys; sys.path.insert(0, 'tests'); from models import build; from peft import PeftModel\n"
        f"PeftModel.from_pretrained(build('mlp')[0], {str(tmp_path)!r})"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode != 0 and "NLORA" in proc.stderr


def test_merged_adapter_cannot_be_deleted_and_stays_intact():
    base, x = build("mlp")
    model = get_peft_model(base, make_config("mlp", "slora"))
    train(model, x)
    model.merge_adapter()
    before = snapshot(model)
    with pytest.raises(ValueError):
        model.base_model.delete_adapter("default")
    assert all(torch.equal(v, snapshot(model)[k]) for k, v in before.items())
