"""The real offline default: SmolLM2-135M-Instruct (from PyPI, converted once) on the offline GSM8K split.

Marked ``integration``: it is part of the default suite (about 1-2 minutes on 2 CPU cores, plus a one-time
~30 s model conversion into the cache); deselect it with ``-m 'not integration'``.
"""

import json

import pytest

from nlora.cli import main

pytestmark = pytest.mark.integration


def short_run(out, *extra) -> dict:
    """A few steps of the offline default (SmolLM2-135M on GSM8K); the run's summary."""
    args = ["train", "--output-dir", str(out), "--max-steps", "3", "--max-eval-samples", "8", "--save-steps", "0",
            "--per-device-train-batch-size", "2", "--max-length", "160", *extra]  # fmt: skip
    assert main(args) == 0
    return json.loads((out / "summary.json").read_text())


def test_offline_default_trains_and_held_out_loss_goes_down(tmp_path):
    out = tmp_path / "demo"
    summary = short_run(out)
    assert summary["model"] == "smollm2-135m" and summary["data"] == "gsm8k" and summary["method"] == "nlora"
    assert summary["after_loss"] < summary["before_loss"]
    assert (out / "adapter" / "adapter_model.safetensors").exists()


def test_real_smollm2_in_4bit_qnlora_lowers_held_out_loss(tmp_path):
    pytest.importorskip("bitsandbytes")
    summary = short_run(tmp_path / "q", "--load-in-4bit", "--learning-rate", "1e-3")
    assert summary["after_loss"] < summary["before_loss"]
    assert (tmp_path / "q" / "residual-base" / "initial_adapter").is_dir()


def test_real_smollm2_keep_adapter_trained_on_nf4_serves_on_bf16():
    """The QLoRA deployment on the real model: an NF4-trained default ('keep') adapter on the bf16 base is as far
    from the trained model as the precision change alone (it was a mean 7.4 logits away when the load subtracted a
    residual that training never had)."""
    import tempfile

    import torch
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from nlora import NLoraConfig
    from nlora.cli.assets import smollm2_path
    from nlora.model import keep_trainable_on_cpu

    pytest.importorskip("bitsandbytes")
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    x = torch.randint(0, 49152, (2, 32), generator=torch.Generator().manual_seed(0))

    def logits(model):
        with torch.no_grad():
            return model.eval()(input_ids=x).logits.float()

    model = get_peft_model(
        keep_trainable_on_cpu(AutoModelForCausalLM.from_pretrained(smollm2_path(), quantization_config=nf4)),
        NLoraConfig(r=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(3):
        model.train()(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    trained = logits(model)
    bf16 = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.bfloat16)
    with model.disable_adapter():
        gap = (logits(bf16) - logits(model)).abs().mean()  # NF4 vs bf16 base: what the precision alone changes
    with tempfile.TemporaryDirectory() as adapter:
        model.save_pretrained(adapter)
        served = logits(PeftModel.from_pretrained(bf16, adapter))
    assert (served - trained).abs().mean() < 1.2 * gap
