"""End-to-end tests of the nlora command line on a tiny model and in-test data."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cli_fixtures import arithmetic_rows, make_tiny_model, sentiment_rows, write_jsonl
from nlora.cli import main


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    model = make_tiny_model(root / "tiny-llama")
    sft = write_jsonl(root / "arith.jsonl", arithmetic_rows(80))
    cls = root / "sentiment.csv"
    cls.write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in sentiment_rows(80)))
    return {"model": str(model), "sft": str(sft), "cls": str(cls), "root": root}


def base_args(tiny, out, *extra):
    return [
        "train",
        "--model",
        tiny["model"],
        "--data",
        tiny["sft"],
        "--output-dir",
        str(out),
        "--max-steps",
        "4",
        "--r",
        "4",
        "--max-length",
        "192",
        "--per-device-train-batch-size",
        "4",
        "--save-steps",
        "2",
        "--learning-rate",
        "1e-2",
        "--max-eval-samples",
        "8",
        *extra,
    ]


@pytest.mark.parametrize("method", ["lora", "pissa", "slora", "nlora", "nlora-reference", "inttune"])
def test_train_every_method_end_to_end(tiny, tmp_path, method, capsys):
    out = tmp_path / method
    assert main(base_args(tiny, out, "--method", method)) == 0
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all({"learning_rate", "grad_norm", "peak_memory_mb", "step_seconds"} <= set(r) for r in steps)
    assert all("tokens_per_s" in r for r in steps[1:])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["init_seconds"] > 0 and summary["before_loss"] > summary["after_loss"]
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == ("LORA" if method in ("lora", "pissa") else "NLORA")
    n_matrices = 2 * 7
    if method == "inttune":
        assert summary["trainable_params"] == n_matrices * 16
    assert "held-out loss" in capsys.readouterr().out


def test_classification_task_with_config_file_and_override(tiny, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"model: {tiny['model']}\ntask: classification\ndata: {tiny['cls']}\nmethod: slora\nr: 2\n"
        f"max_steps: 3\nsave_steps: 0\nmax_length: 32\nlearning_rate: 0.01\n"
    )
    out = tmp_path / "cls"
    assert main(["train", "--config", str(cfg), "--output-dir", str(out), "--method", "nlora"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "nlora" and 0 <= summary["after_accuracy"] <= 1
    assert {"after_f1", "after_mcc"} <= set(summary)


def test_merge_writes_a_merged_model(tiny, tmp_path):
    out = tmp_path / "m"
    assert main(base_args(tiny, out, "--merge", "--save-steps", "0")) == 0
    merged = load_file(out / "merged" / "model.safetensors")
    assert merged and not any("lora" in k for k in merged)


def test_resume_equals_an_uninterrupted_run(tiny, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(base_args(tiny, full, "--max-steps", "6", "--save-steps", "3")) == 0
    assert main(base_args(tiny, cut, "--max-steps", "6", "--save-steps", "3")) == 0
    # emulate a run killed after its step-3 checkpoint: everything later is lost
    for path in ("checkpoint-6", "adapter", "summary.json"):
        target = cut / path
        subprocess.run(["rm", "-rf", str(target)], check=True)
    assert main(base_args(tiny, cut, "--max-steps", "6", "--save-steps", "3", "--resume")) == 0
    a = load_file(full / "adapter" / "adapter_model.safetensors")
    b = load_file(cut / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)
    steps = [json.loads(x)["step"] for x in (cut / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert steps == [1, 2, 3, 4, 5, 6]
    resumed, whole = (json.loads((d / "summary.json").read_text()) for d in (cut, full))
    assert resumed["before_loss"] == whole["before_loss"]  # the resumed run still reports where it started
    # resuming the complete run again is refused; it used to train a 7th step and replace the adapter
    before = load_file(cut / "adapter" / "adapter_model.safetensors")
    assert main(base_args(tiny, cut, "--max-steps", "6", "--save-steps", "3", "--resume")) == 2
    after = load_file(cut / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert json.loads((cut / "summary.json").read_text())["steps"] == 6


@pytest.mark.parametrize("measure", [("--eval-before", "true"), ("--eval-steps", "1")])
def test_measuring_held_out_loss_does_not_change_the_training_of_a_seed(tiny, tmp_path, measure):
    # dropout draws from the global RNG; an evaluation must not move it (it did: a DataLoader iterator takes one
    # draw), or evaluating before or during training would train another model than the same seed without it
    runs = {}
    for name, flags in (("measured", measure), ("unmeasured", ("--eval-before", "false"))):
        out = tmp_path / name
        assert main(base_args(tiny, out, "--lora-dropout", "0.3", "--save-steps", "0", *flags)) == 0
        losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
        runs[name] = losses, load_file(out / "adapter" / "adapter_model.safetensors")
    assert runs["measured"][0] == runs["unmeasured"][0] and len(runs["measured"][0]) == 4
    assert all(torch.equal(runs["measured"][1][k], runs["unmeasured"][1][k]) for k in runs["measured"][1])


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes(tiny, tmp_path):
    out = tmp_path / "int"
    args = base_args(tiny, out, "--max-steps", "400", "--save-steps", "0", "--eval-before", "false")
    cmd = [sys.executable, "-c", "import sys; from nlora.cli import main; sys.exit(main(sys.argv[1:]))", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "continue with --resume" in err
    checkpoints = list(out.glob("checkpoint-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "optimizer.pt").exists()
    assert not (out / "adapter").exists()  # no half-trained adapter where a finished one would go
    assert main([*args, "--max-steps", "400", "--resume"]) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 400


def test_metrics_log_each_record_once_and_the_summary_names_agree(tiny, tmp_path):
    out = tmp_path / "m"
    assert main(base_args(tiny, out, "--max-steps", "4", "--save-steps", "0", "--eval-steps", "2")) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if r["step"] == 4]
    # the last step's training log, its evaluation, the end-of-training record and the final evaluation: only the
    # training log carries throughput (they used to repeat a stale step time and a tokens/s of 0)
    assert [("loss" in r, "tokens_per_s" in r, "step_seconds" in r) for r in last].count((True, True, True)) == 1
    assert all("tokens_per_s" not in r and "step_seconds" not in r for r in last if "loss" not in r)
    end = next(r for r in records if "train_runtime" in r and "loss" not in r)
    summary = json.loads((out / "summary.json").read_text())
    assert "train_loss" not in end and end["train_loss_mean"] == pytest.approx(summary["train_loss_mean"])
    assert summary["train_loss"] == next(r["loss"] for r in reversed(records) if "loss" in r)


def test_ctrl_c_during_the_final_evaluation_still_saves_the_adapter(tiny, tmp_path, monkeypatch, capsys):
    from transformers import Trainer

    evaluate = Trainer.evaluate

    def interrupted_evaluate(self, *args, **kwargs):
        if kwargs.get("metric_key_prefix") == "after":
            os.kill(os.getpid(), signal.SIGINT)  # the user presses Ctrl-C once the training steps are done
        return evaluate(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "evaluate", interrupted_evaluate)
    out = tmp_path / "late"
    assert main(base_args(tiny, out, "--max-steps", "2", "--save-steps", "0")) == 0
    assert "finishing the final evaluation and saving the adapter" in capsys.readouterr().err
    assert (out / "adapter" / "adapter_model.safetensors").exists() and (out / "summary.json").exists()


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda t, p: ["--data", str(p / "missing.jsonl")], "Data file .*missing.jsonl does not exist"),
        (
            lambda t, p: ["--prompt-field", "query"],
            r"Field 'query' is not a column of .*; its columns are \['answer', 'question'\]",
        ),
        (lambda t, p: ["--data", str(write_jsonl(p / "empty.jsonl", []))], "has no rows"),
        (
            lambda t, p: [
                "--data",
                str(write_jsonl(p / "hole.jsonl", arithmetic_rows(5) + [{"question": "x"}] + arithmetic_rows(5))),
            ],
            r"Row \d+ of .*hole.jsonl has no value for 'answer'",
        ),
        (lambda t, p: ["--method", "qlora"], "argument --method: invalid choice: 'qlora'"),
        (lambda t, p: ["--task", "ranking"], "argument --task: invalid choice: 'ranking'"),
        (lambda t, p: ["--r", "500"], r"Rank 500 is too large for module '.*' \(32x32\); use --rank 32 or less"),
        (lambda t, p: ["--target-modules", "nothing_here"], "--target-modules nothing_here matches no module"),
    ],
    ids=[
        "missing-file",
        "unknown-column",
        "empty",
        "row-missing-field",
        "unknown-method",
        "unknown-task",
        "rank-too-large",
        "no-target-match",
    ],
)
def test_bad_input_is_one_clear_line(tiny, tmp_path, capsys, mutate, match):
    import re

    out = tmp_path / "bad"
    assert main(base_args(tiny, out, *mutate(tiny, tmp_path))) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("nlora: error: ") and re.search(match, err), err
    assert not out.exists()  # a failed run leaves no trace


def test_output_dir_of_another_run_and_resume_mismatch_are_refused(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(base_args(tiny, out)) == 0
    before = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    assert main(base_args(tiny, out)) == 2
    assert "holds another nlora run; pass --overwrite" in capsys.readouterr().err
    assert main(base_args(tiny, out, "--resume", "--learning-rate", "0.5")) == 2
    assert "started with different settings (learning_rate)" in capsys.readouterr().err
    assert main(base_args(tiny, out, "--overwrite", "--r", "500")) == 2  # a failed overwrite keeps the good adapter
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == before


def test_eval_gsm8k_math_humaneval_classification(tiny, tmp_path):
    out = tmp_path / "train"
    assert main(base_args(tiny, out)) == 0
    adapter = str(out / "adapter")
    common = ["--model", tiny["model"], "--adapter", adapter, "--limit", "3", "--max-new-tokens", "6"]
    assert main(["eval", "--task", "gsm8k", "--data", tiny["sft"], *common, "--output-dir", str(tmp_path / "g")]) == 0
    score = json.loads((tmp_path / "g" / "score.json").read_text())
    preds = [json.loads(x) for x in (tmp_path / "g" / "predictions.jsonl").read_text().splitlines()]
    assert score["n"] == 3 and len(preds) == 3 and {"completion", "prediction", "gold", "correct"} <= set(preds[0])

    math_file = write_jsonl(tmp_path / "math.jsonl", [{"problem": "1+1?", "solution": "It is $\\boxed{2}$."}] * 3)
    assert main(["eval", "--task", "math", "--data", str(math_file), *common, "--output-dir", str(tmp_path / "m")]) == 0
    assert json.loads((tmp_path / "m" / "score.json").read_text())["n"] == 3

    assert main(["eval", "--task", "humaneval", *common, "--output-dir", str(tmp_path / "h")]) == 0
    h = [json.loads(x) for x in (tmp_path / "h" / "predictions.jsonl").read_text().splitlines()]
    assert len(h) == 3 and all(r["passed"] is False for r in h)  # a 2-layer random model writes no working code

    cls_out = tmp_path / "cls-train"
    assert (
        main(
            [
                "train",
                "--model",
                tiny["model"],
                "--task",
                "classification",
                "--data",
                tiny["cls"],
                "--output-dir",
                str(cls_out),
                "--max-steps",
                "2",
                "--save-steps",
                "0",
                "--r",
                "2",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "eval",
                "--task",
                "classification",
                "--model",
                tiny["model"],
                "--adapter",
                str(cls_out / "adapter"),
                "--data",
                tiny["cls"],
                "--limit",
                "16",
                "--output-dir",
                str(tmp_path / "c"),
            ]
        )
        == 0
    )
    assert {"accuracy", "f1", "mcc"} <= set(json.loads((tmp_path / "c" / "score.json").read_text()))


def compare_args(tiny, *extra) -> list[str]:
    """``base_args`` for ``nlora compare``: without the output folder and the learning rate."""
    args = base_args(tiny, "unused", "--save-steps", "0", *extra)[1:]
    for flag in ("--output-dir", "--learning-rate"):
        args = args[: args.index(flag)] + args[args.index(flag) + 2 :]
    return args


def test_compare_writes_table_and_png(tiny, tmp_path):
    args = compare_args(tiny)
    assert (
        main(["compare", *args, "--methods", "lora,nlora", "--seeds", "0,1", "--output-dir", str(tmp_path / "c")]) == 0
    )
    table = (tmp_path / "c" / "compare.md").read_text().splitlines()
    assert table[0].startswith("| method | learning rate | seeds | trainable params")
    # no --learning-rate: each method trains at its own recommended rate (nlora.rates)
    assert [[c.strip() for c in row.split("|")[1:3]] for row in table[2:]] == [["lora", "0.003"], ["nlora", "0.0003"]]
    assert all(" ± " in row for row in table[2:])  # two seeds: mean ± std
    assert (tmp_path / "c" / "compare.png").stat().st_size > 1000
    runs = json.loads((tmp_path / "c" / "compare.json").read_text())
    sources = {r["summary"]["learning_rate_source"] for r in runs}
    evidence = "selected on validation rows over 3 seeds"
    assert sources == {f"the {m} default for sft ({evidence}), docs/benchmarks.md §3" for m in ("lora", "nlora")}


def test_compare_at_one_shared_rate_warns_that_it_favours_some_methods(tiny, tmp_path, capsys):
    args = compare_args(tiny, "--max-steps", "1")
    shared = ["compare", *args, "--methods", "lora,inttune", "--learning-rate", "1e-3", "--output-dir"]
    assert main([*shared, str(tmp_path / "c")]) == 0
    warning = "one learning rate (0.001) for methods whose recommended rates differ 33x (lora 0.003, inttune 0.1)"
    assert warning in capsys.readouterr().err
    assert (tmp_path / "c" / "compare.md").read_text().startswith(f"**Warning:** {warning}")
    table = (tmp_path / "c" / "compare.md").read_text()
    assert "| lora | 0.001 |" in table and "| inttune | 0.001 |" in table


@pytest.mark.parametrize("merged", [False, True])
def test_export_command(tiny, tmp_path, merged):
    out = tmp_path / "t"
    assert main(base_args(tiny, out, "--save-steps", "0")) == 0
    target = tmp_path / "exported"
    args = ["export", "--model", tiny["model"], "--adapter", str(out / "adapter"), "--out", str(target)]
    assert main(args + (["--merged"] if merged else [])) == 0
    if merged:
        assert (target / "model.safetensors").exists()
    else:
        from nlora.serving import vllm_problems

        assert json.loads((target / "adapter_config.json").read_text())["peft_type"] == "LORA"
        assert vllm_problems(target) == []  # servable: one rank from vLLM's set, alpha = r, no patterns


def test_help_of_every_subcommand(capsys):
    proc = subprocess.run([sys.executable, "-m", "nlora", "train", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "usage: nlora train" in proc.stdout  # the module entry point, once
    for sub in ("train", "demo", "eval", "compare", "export", "prepare"):  # every subcommand, in this process
        assert main([sub, "--help"]) == 0
        assert f"usage: nlora {sub}" in capsys.readouterr().out


def test_example_configs_parse():
    from accelerate.commands.config.config_args import ClusterConfig

    from nlora.cli.settings import TrainSettings, train_settings

    root = Path(__file__).resolve().parents[1] / "examples"
    settings, _ = train_settings(["--config", str(root / "demo.yaml")])
    default = TrainSettings(output_dir="runs/demo")
    default.validate()  # resolves the method's learning rate
    assert settings.comparable() == default.comparable()
    for name in ("deepspeed_zero2.yaml", "deepspeed_zero3.yaml", "fsdp.yaml"):
        config = ClusterConfig.from_yaml_file(root / "accelerate" / name)
        assert config.num_processes == 2 and config.distributed_type in ("DEEPSPEED", "FSDP")


def test_config_files_are_typed_and_flags_override_them(tmp_path):
    from nlora.cli.settings import SettingsError, train_settings

    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("learning_rate: 5e-4\nmethod: inttune\ntarget_modules: [q_proj, v_proj]\nresidual: false\n")
    settings, _ = train_settings(["--config", str(yaml_file), "--method", "slora"])
    assert settings.learning_rate == 5e-4 and settings.method == "slora"  # PyYAML reads 5e-4 as a string
    assert settings.target_modules == "q_proj,v_proj" and settings.residual is False
    toml_file = tmp_path / "run.toml"
    toml_file.write_text('r = "16"\nmethod = "inttune"\n')
    settings, _ = train_settings([f"--config={toml_file}"])
    assert settings.r == 16 and settings.method == "inttune"
    bad = tmp_path / "bad.yaml"
    bad.write_text("rank_of_adapter: 3\n")
    with pytest.raises(SettingsError, match=r"unknown settings \['rank_of_adapter'\]; valid ones: model, task,"):
        train_settings(["--config", str(bad)])


def test_a_crash_mid_run_restores_the_folder_as_it_was(tiny, tmp_path, monkeypatch):
    import nlora.cli.train as recipe

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash during training")

    empty = tmp_path / "empty"
    empty.mkdir()
    run = tmp_path / "run"
    assert main(base_args(tiny, run, "--save-steps", "0")) == 0
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    monkeypatch.setattr(recipe, "_train", crash)
    assert main(base_args(tiny, empty)) == 2
    assert empty.is_dir() and not any(empty.iterdir())  # the user's empty folder stays, emptied of our files
    assert main(base_args(tiny, run, "--overwrite")) == 2
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before  # the previous run is back
    assert not list(tmp_path.glob(".run.previous-*"))


def test_the_command_line_makes_no_network_call(tmp_path):
    """A name that is no local folder must not become Hub requests: the socket layer refuses and records any
    connection attempt in a fresh process (huggingface_hub reads HF_HUB_OFFLINE when it is imported)."""
    script = f"""
import socket, sys
attempts = []
def refuse(self, address, *args):
    attempts.append(address)
    raise OSError("network is off in this test")
socket.socket.connect = refuse
socket.create_connection = lambda address, *a, **k: refuse(None, address)
from nlora.cli import main
rc = main(["eval", "--model", "some-org/some-model", "--data", "gsm8k", "--output-dir", {str(tmp_path / "out")!r}])
print("rc", rc, "attempts", len(attempts))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert "rc 2 attempts 0" in proc.stdout, proc.stdout + proc.stderr[-3000:]


def test_train_without_a_rate_uses_the_methods_rate_and_says_so(tiny, tmp_path, capsys):
    args = base_args(tiny, tmp_path / "it", "--method", "inttune", "--max-steps", "1", "--save-steps", "0")
    args = args[: args.index("--learning-rate")] + args[args.index("--learning-rate") + 2 :]
    assert main(args) == 0
    source = "the inttune default for sft (selected on validation rows over 3 seeds), docs/benchmarks.md §3"
    assert f"at learning rate 0.1 ({source})" in capsys.readouterr().out
    summary = json.loads((tmp_path / "it" / "summary.json").read_text())
    recorded = json.loads((tmp_path / "it" / "run_config.json").read_text())
    assert summary["learning_rate"] == recorded["learning_rate"] == 0.1
    assert summary["learning_rate_source"] == recorded["learning_rate_source"] == source
