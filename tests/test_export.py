"""Exports load in stock PEFT (in a process that never imports nlora) and reproduce the outputs."""

import json
import subprocess
import sys
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from conftest import make_config, train
from models import build, output
from nlora import convert_reference_checkpoint, export_lora
from nlora.serving import VLLM_LORA_RANKS, vllm_problems, vllm_rank

STOCK_PEFT = """
import sys, torch
sys.path.insert(0, "tests")
from models import build, output
from peft import PeftModel
root = __import__("pathlib").Path(sys.argv[1])
for adapter_dir in sorted(root.glob("*/*")):  # <model>/<mode>
    base, x = build(adapter_dir.parent.name)
    model = PeftModel.from_pretrained(base, adapter_dir)
    torch.save(output(model, x).detach(), adapter_dir / "stock_peft_output.pt")
assert "nlora" not in sys.modules, "the stock-PEFT check imported nlora"
"""
EXPORT_MODES = ["slora", "nlora", "nlora_reference", "inttune"]


def test_export_loads_in_stock_peft_with_the_same_outputs(tmp_path):
    expected = {}
    for model_name in MODEL_FIRST_TARGET:
        for mode in EXPORT_MODES:
            base, x = build(model_name)
            config = make_config(model_name, mode, rank_pattern={MODEL_FIRST_TARGET[model_name]: 2})
            model = get_peft_model(base, config)
            train(model, x)
            model.eval()
            expected[model_name, mode] = output(model, x).detach()
            out = tmp_path / model_name / mode
            servable = model_name in ("mlp", "gpt2", "llama")  # the others adapt embeddings / lm_head
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                export_lora(model, out)
            vllm_warnings = [str(w.message) for w in caught if "vLLM will not serve it" in str(w.message)]
            assert vllm_problems(out) == [] if servable else vllm_warnings, (model_name, mode, vllm_problems(out))
            assert not vllm_warnings if servable else "embedding or output layer" in vllm_warnings[0]
            exported = json.loads((out / "adapter_config.json").read_text())
            assert exported["peft_type"] == "LORA" and exported["r"] == exported["lora_alpha"] == 8  # 2r, vLLM's set
            assert not exported["rank_pattern"] and not exported["alpha_pattern"] and exported["bias"] == "none"
            weights = load_file(out / "adapter_model.safetensors")
            assert not any(".lora_N" in k for k in weights)
            assert all(".lora_" in k for k in weights), "an export never holds base weights"
    # one stock-PEFT process (never importing nlora) for every model and mode: its imports are the slow part
    proc = subprocess.run([sys.executable, "-c", STOCK_PEFT, str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for (model_name, mode), logits in expected.items():
        stock = torch.load(tmp_path / model_name / mode / "stock_peft_output.pt", weights_only=True)
        torch.testing.assert_close(stock, logits, atol=1e-4, rtol=1e-4, msg=f"{model_name} {mode}")


MODEL_FIRST_TARGET = {"mlp": "lin0", "gpt2": "c_fc", "embedding": "emb", "llama": "q_proj", "tied_llama": "q_proj"}


def test_export_of_a_merged_adapter_is_refused(tmp_path):
    base, x = build("mlp")
    model = get_peft_model(base, make_config("mlp", "slora"))
    model.merge_adapter()
    with pytest.raises(ValueError, match="call unmerge_adapter"):
        export_lora(model, tmp_path / "lora")
    assert not (tmp_path / "lora").exists()


def _authors_checkpoint(tmp_path, mode="nlora_reference"):
    """What the authors' fork writes: our weights, their config (peft_type LORA, init 'n_lora'/'s_lora')."""
    base, x = build("llama")
    model = get_peft_model(base, make_config("llama", mode))
    train(model, x)
    model.eval()
    expected = output(model, x).detach()
    model.save_pretrained(tmp_path / "ours")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    keep = ("r", "lora_alpha", "target_modules", "lora_dropout", "bias", "task_type", "fan_in_fan_out")
    config = {k: config[k] for k in keep} | {
        "peft_type": "LORA",
        "init_lora_weights": {"nlora_reference": "n_lora", "slora": "s_lora"}[mode],
    }
    (theirs / "adapter_config.json").write_text(json.dumps(config))
    save_file(load_file(tmp_path / "ours" / "adapter_model.safetensors"), theirs / "adapter_model.safetensors")
    return theirs, x, expected


@pytest.mark.parametrize("mode", ["nlora_reference", "slora"])
def test_convert_reference_checkpoint(mode, tmp_path):
    theirs, x, expected = _authors_checkpoint(tmp_path, mode)
    convert_reference_checkpoint(theirs, tmp_path / "converted")
    config = json.loads((tmp_path / "converted" / "adapter_config.json").read_text())
    assert config["peft_type"] == "NLORA" and config["init_lora_weights"] == mode
    loaded = PeftModel.from_pretrained(build("llama")[0], tmp_path / "converted")
    torch.testing.assert_close(output(loaded, x), expected, atol=1e-6, rtol=0)


def test_converting_something_else_is_refused(tmp_path):
    base, _ = build("mlp")
    from peft import LoraConfig

    get_peft_model(base, LoraConfig(r=2, target_modules=["lin0"])).save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="not a checkpoint of the authors' NLoRA fork"):
        convert_reference_checkpoint(tmp_path / "plain", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_vllm_check_mirrors_vllms_rules(tmp_path):
    base, x = build("llama")
    model = get_peft_model(
        base, make_config("llama", "slora", r=12, target_modules=["q_proj"], modules_to_save=["lm_head"])
    )
    with pytest.warns(UserWarning, match=r"vLLM will not serve it: modules_to_save=\['lm_head'\]"):
        export_lora(model, tmp_path / "lora")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["r"] == 16  # rank 12 zero-padded to vLLM's next rank
    assert vllm_problems(tmp_path / "lora", max_lora_rank=8) == [
        "r=16 is greater than max_lora_rank=8",
        "modules_to_save=['lm_head']: vLLM only supports modules_to_save being None",
    ]
    config.update(r=12, rank_pattern={"q_proj": 4}, bias="all", modules_to_save=None)
    (tmp_path / "lora" / "adapter_config.json").write_text(json.dumps(config))
    problems = vllm_problems(tmp_path / "lora")
    assert problems[0] == f"r=12 is not one of vLLM's ranks {VLLM_LORA_RANKS}"
    assert any("rank_pattern" in p for p in problems) and any("bias" in p for p in problems)
    assert any("has rank 16, not the config's r=12" in p for p in problems)
    assert [vllm_rank(r) for r in (1, 8, 9, 300, 512, 513)] == [8, 8, 16, 320, 512, None]
