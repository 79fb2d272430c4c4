"""Every saved NLoRA adapter and every export carries a model card that says how to load it without guessing."""

import copy

import pytest
from peft import get_peft_model

from conftest import make_config, train
from models import build
from nlora import export_lora


@pytest.mark.parametrize("mode,name", [("nlora", "NLoRA"), ("inttune", "IntTune"), ("slora", "SLoRA")])
def test_saved_adapter_and_export_explain_themselves(mode, name, tmp_path):
    base, x = build("llama")
    model = get_peft_model(copy.deepcopy(base), make_config("llama", mode))
    model.peft_config["default"].base_model_name_or_path = "org/tiny"  # what from_pretrained("org/tiny") records
    train(model, x, steps=1)
    model.save_pretrained(tmp_path / "adapter")
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert f"## nlora adapter: {name}" in card and "import nlora" in card and "KeyError: 'NLORA'" in card
    assert "Base model: `org/tiny`" in card and "nlora export --adapter" in card
    assert ("**residual** adapter" in card) == (mode in ("nlora", "inttune"))
    model.save_pretrained(tmp_path / "adapter")  # saved again: one nlora section, not two
    assert (tmp_path / "adapter" / "README.md").read_text().count("## nlora adapter") == 1
    export_lora(model, tmp_path / "lora")
    exported = (tmp_path / "lora" / "README.md").read_text()
    assert f"## LoRA exported by nlora from an {name} adapter" in exported and "`org/tiny`" in exported
