"""The real offline default: SmolLM2-135M-Instruct (from PyPI, converted once) on the offline GSM8K split.

Marked ``integration``: it is part of the default suite (about 1-2 minutes on 2 CPU cores, plus a one-time
~30 s model conversion into the cache); deselect it with ``-m 'not integration'``.
"""

import json

import pytest

from nlora.cli import main

pytestmark = pytest.mark.integration


def test_offline_default_trains_and_held_out_loss_goes_down(tmp_path):
    out = tmp_path / "demo"
    args = [
        "train",
        "--output-dir",
        str(out),
        "--max-steps",
        "3",
        "--max-eval-samples",
        "8",
        "--save-steps",
        "0",
        "--per-device-train-batch-size",
        "2",
        "--max-length",
        "160",
    ]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "smollm2-135m" and summary["data"] == "gsm8k" and summary["method"] == "nlora"
    assert summary["after_loss"] < summary["before_loss"]
    assert (out / "adapter" / "adapter_model.safetensors").exists()
