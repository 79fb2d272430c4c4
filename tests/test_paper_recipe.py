"""examples/paper/run_paper_recipe.py runs end to end (both recipes, train + harness GSM8K) on a tiny model."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cli_fixtures import arithmetic_rows, make_tiny_model, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def test_paper_recipe_end_to_end_on_a_tiny_model(tmp_path):
    pytest.importorskip("lm_eval")
    model = make_tiny_model(tmp_path / "tiny")
    rows = [{"query": r["question"], "response": r["answer"] + " The answer is: 1"} for r in arithmetic_rows(30)]
    data = write_jsonl(tmp_path / "metamath-like.jsonl", rows)
    cmd = [sys.executable, str(ROOT / "examples" / "paper" / "run_paper_recipe.py"), "--model", str(model),
           "--data", str(data), "--methods", "nlora", "--max-steps", "2", "--eval-limit", "2",
           "--num-fewshot", "0", "--max-new-tokens", "4", "--output-dir", str(tmp_path / "paper"), "--",
           "--bf16", "false", "--gradient-checkpointing", "false", "--max-length", "200", "--rank", "8",
           "--per-device-train-batch-size", "2", "--gradient-accumulation-steps", "1", "--save-steps", "0"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "paper" / "results.json").read_text())
    assert [(r["recipe"], r["method"]) for r in results] == [("nlora", "nlora"), ("pissa", "nlora")]
    assert all("gsm8k exact_match,strict-match" in r for r in results)
    recorded = json.loads((tmp_path / "paper" / "pissa" / "nlora" / "run_config.json").read_text())
    assert recorded["learning_rate"] == 2e-5 and recorded["lora_alpha"] == 128 and recorded["r"] == 8
