"""``nlora eval --harness``: lm-evaluation-harness's own GSM8K task on an NLoRA model, offline."""

import json

import pytest

from cli_fixtures import arithmetic_rows, make_tiny_model, write_jsonl
from nlora.cli import main

pytest.importorskip("lm_eval")


def test_harness_gsm8k_on_an_nlora_adapter_offline(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model = make_tiny_model(tmp_path / "tiny")
    data = write_jsonl(tmp_path / "arith.jsonl", arithmetic_rows(40))
    run = tmp_path / "run"
    args = ["--model", model, "--data", data, "--output-dir", run, "--max-steps", 2, "--r", 4, "--save-steps", 0]
    assert main(["train", *map(str, args), "--max-eval-samples", "4"]) == 0
    out = tmp_path / "harness"
    args = ["--harness", "gsm8k", "--model", model, "--adapter", run / "adapter", "--limit", 3, "--num-fewshot", 0,
            "--max-new-tokens", 8, "--output-dir", out]  # fmt: skip
    assert main(["eval", *map(str, args)]) == 0
    score = json.loads((out / "score.json").read_text())
    assert score["task"] == "gsm8k" and score["n"] == 3
    assert {"exact_match,strict-match", "exact_match,flexible-extract"} <= set(score)  # the harness's own names
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert {r["filter"] for r in records} == {"strict-match", "flexible-extract"} and len(records) == 6
    assert "#### " in records[0]["target"]  # GSM8K's held-out split, not the hub

    assert main(["eval", "--harness", "no_such_task", "--model", str(model), "--output-dir", str(tmp_path / "x")]) == 2
    assert "has no task 'no_such_task'" in capsys.readouterr().err
