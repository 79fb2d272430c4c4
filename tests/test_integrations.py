"""The library inside other tools: TRL's SFTTrainer (the authors' example), and DDP through torchrun."""

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from cli_fixtures import arithmetic_rows, make_tiny_model, write_jsonl
from nlora import NLoraConfig


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def test_authors_example_with_trl_sft_trainer(tiny_dir, tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    base_model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    peft_config = NLoraConfig(
        task_type="CAUSAL_LM",
        target_modules=["q_proj", "o_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
        inference_mode=False,
        r=4,
        lora_alpha=4,
        lora_dropout=0,
        init_lora_weights="n_lora",
    )
    dataset = Dataset.from_list([{"text": r["question"] + " " + r["answer"]} for r in arithmetic_rows(32)])
    trainer = SFTTrainer(
        model=base_model,
        train_dataset=dataset,
        args=SFTConfig(
            output_dir=str(tmp_path / "trl"),
            max_length=64,
            max_steps=3,
            report_to=[],
            use_cpu=True,
            per_device_train_batch_size=4,
            learning_rate=1e-2,
            save_strategy="no",
        ),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if ".lora_N." in n}
    trainer.train()
    assert any((p != before[n]).any() for n, p in trainer.model.named_parameters() if n in before)
    trainer.model.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["peft_type"] == "NLORA"
    assert any(".lora_N." in k for k in load_file(tmp_path / "adapter" / "adapter_model.safetensors"))


def _losses(path):
    return [json.loads(x)["loss"] for x in open(path).read().splitlines() if '"loss"' in x]


def test_ddp_two_processes_match_one_process(tiny_dir, tmp_path):
    """2 CPU processes (gloo) with batch 2 each follow the loss trajectory of 1 process with batch 4."""
    data = write_jsonl(tmp_path / "arith.jsonl", arithmetic_rows(64))
    common = [
        "--model",
        str(tiny_dir),
        "--data",
        str(data),
        "--max-steps",
        "5",
        "--rank",
        "4",
        "--max-length",
        "192",
        "--learning-rate",
        "5e-3",
        "--save-steps",
        "0",
        "--eval-before",
        "false",
        "--max-eval-samples",
        "4",
        "--method",
        "nlora",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        [
            sys.executable,
            "-m",
            "nlora",
            "train",
            *common,
            "--per-device-train-batch-size",
            "4",
            "--output-dir",
            str(tmp_path / "one"),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--standalone",  # a free port, whatever else on the machine holds one
            "-m",
            "nlora",
            "train",
            *common,
            "--per-device-train-batch-size",
            "2",
            "--output-dir",
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("trainable parameters, init") == 1  # the end-of-run summary, from rank 0 only
    assert "Setting accelerator to CPU" not in one.stdout + two.stdout  # DeepSpeed's fallback notice, every command
    assert "FutureWarning" not in one.stderr  # nlora's own TrainingArguments use transformers 5's names
    a, b = _losses(tmp_path / "one" / "metrics.jsonl"), _losses(tmp_path / "two" / "metrics.jsonl")
    assert len(a) == len(b) == 5
    # Same samples in the same order; only the order of the gradient all-reduce differs (seen here: <= 2e-6).
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4, (a, b)


@pytest.mark.parametrize("argv", [["prepare", "--no-such-flag"], ["prepare", "--help"]])
def test_the_cli_closes_the_process_group_it_ran_under(argv, tmp_path):
    """A rank that exits with gloo's group still open can abort at exit (SIGABRT, seen in CI): every command, failed
    or not, leaves with the group destroyed."""
    import torch.distributed as dist

    from nlora.cli import main

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        main(argv)
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
