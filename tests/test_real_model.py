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
