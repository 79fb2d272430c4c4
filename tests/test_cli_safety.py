"""The command line never loses a file and checks everything before it writes (each case runs ``python -m nlora``
in this process: exit code, the one error line, and the folders' content before and after)."""

import contextlib
import io
import json
from pathlib import Path

import pytest

from cli_fixtures import arithmetic_rows, make_tiny_model, sentiment_rows, write_jsonl
from nlora.cli import main


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    model = make_tiny_model(root / "tiny-llama")
    sft = write_jsonl(root / "arith.jsonl", arithmetic_rows(40))
    run = root / "run"
    rc, _, err = nlora("train", *train_args(model, sft, run))
    assert rc == 0, err
    return {"model": str(model), "sft": str(sft), "run": run, "root": root}


def train_args(model, data, out, *extra):
    return ["--model", str(model), "--data", str(data), "--output-dir", str(out), "--max-steps", "2", "--r", "4",
            "--save-steps", "0", "--max-eval-samples", "4", "--eval-before", "false", *extra]  # fmt: skip


def nlora(*args) -> tuple[int, str, str]:
    """``nlora ARGS`` in this process (exit code, stdout, stderr): what these tests check is the folders and the one
    error line, not the process boundary, which tests/test_cli.py covers (tracebacks, signals, exit codes); each
    subprocess paid the transformers import again."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


def one_line_error(rc: int, err: str, *fragments: str) -> None:
    """Exit code 2 and one ``nlora: error:`` line holding every fragment, no traceback."""
    assert rc == 2, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    line = [x for x in err.splitlines() if x.startswith("nlora: error: ")]
    assert len(line) == 1, err[-2000:]
    for fragment in fragments:
        assert fragment in line[0], line[0]


def content(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def user_folder(path: Path) -> Path:
    (path / "src").mkdir(parents=True)
    (path / "src" / "main.py").write_text("print('mine')\n")
    (path / "notes.txt").write_text("my notes\n")
    return path


# --- exports ------------------------------------------------------------------------------------------------------
def test_export_refuses_a_user_folder_and_the_source_adapter(assets, tmp_path):
    adapter = assets["run"] / "adapter"
    before = content(adapter)
    mine = user_folder(tmp_path / "mine")
    for out in (mine, adapter, adapter / "lora"):
        rc, _, err = nlora("export", "--adapter", adapter, "--out", out)
        one_line_error(rc, err, str(out))
    assert content(mine) == {"notes.txt": b"my notes\n", "src/main.py": b"print('mine')\n"}
    assert content(adapter) == before

    rc, _, err = nlora("export", "--adapter", adapter, "--out", mine, "--overwrite")  # never a folder of user files
    one_line_error(rc, err, "holds 'notes.txt', which nlora did not write")
    assert content(mine) == {"notes.txt": b"my notes\n", "src/main.py": b"print('mine')\n"}
    mine = tmp_path / "export"
    rc, _, err = nlora("export", "--adapter", adapter, "--out", mine)
    assert rc == 0, err
    assert (mine / "adapter_model.safetensors").exists() and (mine / "tokenizer_config.json").exists()
    rc, _, err = nlora("export", "--adapter", adapter, "--out", mine, "--merged")  # an export of ours: replaced
    assert rc == 0, err
    assert (mine / "model.safetensors").exists() and not (mine / "adapter_model.safetensors").exists()


def test_export_of_a_stock_lora_adapter_or_a_non_adapter_folder_is_refused(assets, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    lora = tmp_path / "lora"
    base = AutoModelForCausalLM.from_pretrained(assets["model"])
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(lora)
    rc, _, err = nlora("export", "--model", assets["model"], "--adapter", lora, "--out", tmp_path / "x")
    one_line_error(rc, err, "is a LORA adapter, not an NLoRA one")
    rc, _, err = nlora("export", "--adapter", assets["root"], "--out", tmp_path / "x")
    one_line_error(rc, err, "is not an adapter directory")
    rc, _, err = nlora("eval", "--adapter", assets["root"], "--model", assets["model"])
    one_line_error(rc, err, "is not an adapter directory")
    assert not (tmp_path / "x").exists()


def test_eval_and_export_of_an_adapter_without_tokenizer_files_use_the_base_tokenizer(assets, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):  # what save_pretrained alone writes
        (bare / name).write_bytes((assets["run"] / "adapter" / name).read_bytes())
    rc, _, err = nlora("eval", "--adapter", bare, "--model", assets["model"], "--data", assets["sft"], "--limit", "2",
                       "--max-new-tokens", "4", "--output-dir", tmp_path / "eval")  # fmt: skip
    assert rc == 0, err[-2000:]
    rc, _, err = nlora("export", "--adapter", bare, "--model", assets["model"], "--out", tmp_path / "exported")
    assert rc == 0, err[-2000:]


def test_export_lora_api_refuses_a_user_folder(assets, tmp_path):
    import warnings

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import nlora

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(assets["model"]), assets["run"] / "adapter")
    mine = user_folder(tmp_path / "mine")
    with pytest.raises(FileExistsError, match="which nlora did not write"):
        nlora.export_lora(model, mine)
    assert (mine / "notes.txt").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nlora.export_lora(model, tmp_path / "new")
        nlora.export_lora(model, tmp_path / "new")  # replacing an earlier export needs no flag


# --- training runs ------------------------------------------------------------------------------------------------
def test_overwrite_never_touches_a_folder_that_is_not_a_run(assets, tmp_path):
    mine = user_folder(tmp_path / "mine")
    for extra in ((), ("--overwrite",)):
        rc, _, err = nlora("train", *train_args(assets["model"], assets["sft"], mine, *extra))
        one_line_error(rc, err, "it is not an nlora run folder")
        assert content(mine) == {"notes.txt": b"my notes\n", "src/main.py": b"print('mine')\n"}


def test_overwrite_keeps_the_previous_run_until_the_new_adapter_exists(assets, tmp_path):
    run = tmp_path / "run"
    assert nlora("train", *train_args(assets["model"], assets["sft"], run))[0] == 0
    before = content(run)
    rc, _, err = nlora("train", *train_args(assets["model"], assets["sft"], run, "--overwrite", "--r", "500"))
    one_line_error(rc, err, "Rank 500 is too large")
    assert content(run) == before  # a refused overwrite changes nothing
    rc, _, err = nlora("train", *train_args(assets["model"], assets["sft"], run, "--overwrite", "--seed", "1"))
    assert rc == 0, err[-2000:]
    assert json.loads((run / "run_config.json").read_text())["seed"] == 1
    assert not list(tmp_path.glob(".run.previous-*")), "the previous run is removed once the new one is complete"


BAD_DATA = {
    "empty.jsonl": b"",
    "malformed.jsonl": b'{"question": "1+1", "answer": "2"}\n{"question": \n',
    "latin1.jsonl": '{"question": "caf\u00e9?", "answer": "2"}\n'.encode("latin-1"),
    "one-row.jsonl": b'{"question": "1+1", "answer": "2"}\n',
    "no-answer.jsonl": b'{"question": "1+1"}\n{"question": "2+2", "answer": "4"}\n',
}


@pytest.mark.parametrize(
    "case,fragments",
    [
        (lambda p, a: ["--data", p / "empty.jsonl"], ["has no rows"]),
        (lambda p, a: ["--data", p / "malformed.jsonl"], ["malformed.jsonl could not be read"]),
        (lambda p, a: ["--data", p / "latin1.jsonl"], ["latin1.jsonl is not UTF-8 text"]),
        (lambda p, a: ["--data", p / "one-row.jsonl"], ["too few to split off a held-out set"]),
        (lambda p, a: ["--data", p / "no-answer.jsonl"], ["has no value for 'answer'"]),
        (lambda p, a: ["--data", a["root"]], ["is a folder; give a .json/.jsonl/.csv/.parquet file"]),
        (lambda p, a: ["--data", p], ["The run folder", "lies inside the input"]),  # out/ is inside the data folder
        (lambda p, a: ["--response-field", "solution"], ["Field 'solution' is not a column"]),
        (lambda p, a: ["--target-modules", "nope"], ["--target-modules nope matches no module"]),
        (lambda p, a: ["--rank", "500"], ["Rank 500 is too large"]),
        (lambda p, a: ["--rank", "500", "--method", "lora"], ["Rank 500 is too large"]),
        (lambda p, a: ["--rank", "500", "--method", "pissa"], ["Rank 500 is too large"]),
        (lambda p, a: ["--learning-rate", "-1"], ["--learning-rate must be a positive number"]),
        (lambda p, a: ["--max-steps", "0"], ["--max-steps must be a positive number of steps or -1"]),
        (lambda p, a: ["--eval-fraction", "1.5"], ["--eval-fraction must lie strictly between 0 and 1"]),
        (lambda p, a: ["--lr-scheduler-type", "wavy"], ["argument --lr-scheduler-type: invalid choice: 'wavy'"]),
        (lambda p, a: ["--nystrom-core", "magic"], ["argument --nystrom-core: invalid choice: 'magic'"]),
        (lambda p, a: ["--max-steps", "many"], ["argument --max-steps: invalid int value: 'many'"]),
        (lambda p, a: ["--config", p / "broken.yaml"], ["broken.yaml is not valid YAML"]),
        (lambda p, a: ["--config", p / "broken.toml"], ["broken.toml is not valid TOML"]),
        (lambda p, a: ["--config", p / "unknown.yaml"], ["unknown settings ['rank_of_adapter']", "valid ones:"]),
        (lambda p, a: ["--lora-alpha", "nan"], ["--lora-alpha must be a finite number, got nan"]),
        (lambda p, a: ["--weight-decay", "nan"], ["--weight-decay must be a finite number"]),
        (lambda p, a: ["--lora-alpha", "inf"], ["--lora-alpha must be a finite number, got inf"]),
        (lambda p, a: ["--prompt-template", "Q: {question}"], ["--prompt-template must use the field {prompt}"]),
        (lambda p, a: ["--prompt-template", "{0} and {prompt}"], ["--prompt-template must use the field {prompt}"]),
        (lambda p, a: ["--prompt-template", "no question"], ["got []"]),
        (lambda p, a: ["--prompt-template", "{prompt"], ["--prompt-template is not a valid template"]),
        (lambda p, a: ["--config", p / "unknown.yaml", "--config", p / "broken.yaml"], ["give one --config file"]),
        (lambda p, a: ["--target-modules", "q_proj,,v_proj"], ["--target-modules has an empty name"]),
    ],
    ids=["empty", "malformed", "non-utf8", "one-row", "missing-value", "folder-as-data", "output-in-data",
         "missing-column",
         "bad-target", "rank-nlora", "rank-lora", "rank-pissa", "negative-lr", "zero-steps", "eval-fraction",
         "scheduler", "core", "non-int", "broken-yaml", "broken-toml", "unknown-key", "alpha-nan", "decay-nan",
         "alpha-inf", "template-field", "template-positional", "template-no-prompt", "template-broken",
         "two-configs", "empty-target"],
)  # fmt: skip
def test_a_failed_run_leaves_no_trace(assets, tmp_path, case, fragments):
    for name, data in BAD_DATA.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "broken.yaml").write_text("r: [8\nmethod: nlora\n")
    (tmp_path / "broken.toml").write_text("r = = 8\n")
    (tmp_path / "unknown.yaml").write_text("rank_of_adapter: 3\n")
    out = tmp_path / "out"
    rc, _, err = nlora("train", *train_args(assets["model"], assets["sft"], out, *case(tmp_path, assets)))
    one_line_error(rc, err, *fragments)
    assert not out.exists(), "a failed run must not leave files behind"


def test_the_fixed_retry_of_a_failed_run_starts_clean(assets, tmp_path):
    out = tmp_path / "out"
    rc, _, err = nlora("train", *train_args(assets["model"], assets["sft"], out, "--rank", "500"))
    one_line_error(rc, err, "Rank 500 is too large")
    rc, _, err = nlora("train", *train_args(assets["model"], assets["sft"], out))
    assert rc == 0, err[-2000:]
    assert (out / "adapter" / "adapter_model.safetensors").exists() and (out / ".nlora-run").exists()


def test_output_dir_that_is_a_file_and_compare_output_dir(assets, tmp_path):
    target = tmp_path / "a-file"
    target.write_text("keep me\n")
    rc, _, err = nlora("train", *train_args(assets["model"], assets["sft"], target))
    one_line_error(rc, err, "is a file, not a folder")
    assert target.read_text() == "keep me\n"
    out = tmp_path / "cmp"
    rc, _, err = nlora("compare", *train_args(assets["model"], assets["sft"], out), "--methods", "lora,nlora")
    assert rc == 0, err[-2000:]
    assert (out / "compare.md").exists() and (out / "compare.png").exists()


def test_string_labels_are_mapped_to_sorted_ids(assets, tmp_path):
    names = {0: "negative", 1: "positive"}
    data = write_jsonl(tmp_path / "cls.jsonl", [{**r, "label": names[r["label"]]} for r in sentiment_rows(40)])
    out = tmp_path / "cls"
    args = train_args(assets["model"], data, out, "--task", "classification")
    rc, _, err = nlora("train", *args)
    assert rc == 0, err[-2000:]
    assert json.loads((out / "run_config.json").read_text())["label_names"] == ["negative", "positive"]
    rc, _, err = nlora("export", "--adapter", out / "adapter", "--model", assets["model"], "--out", tmp_path / "m",
                       "--merged")  # fmt: skip
    assert rc == 0, err[-2000:]
    rc, _, err = nlora("train", *train_args(assets["model"], data, tmp_path / "three", "--task", "classification",
                                            "--num-labels", "3"))  # fmt: skip
    one_line_error(rc, err, "have 2 names ['negative', 'positive'] but --num-labels is 3")
    numbers = write_jsonl(tmp_path / "n.jsonl", [{"text": "a film", "label": 7}] * 20)
    rc, _, err = nlora("train", *train_args(assets["model"], numbers, tmp_path / "n", "--task", "classification"))
    one_line_error(rc, err, "Label 7 in 'label' is not a class id in 0..1")


# --- eval, compare and export outputs: the same rule as runs -----------------------------------------------------
def test_eval_never_writes_into_a_user_folder_an_input_or_next_to_its_data(assets, tmp_path):
    adapter = assets["run"] / "adapter"
    (tmp_path / "data").mkdir()
    data = write_jsonl(tmp_path / "data" / "predictions.jsonl", arithmetic_rows(8))  # named like eval's own output
    mine = user_folder(tmp_path / "mine")
    (mine / "score.json").write_text('{"mine": 1}\n')
    before = {"mine": content(mine), "adapter": content(adapter), "data": content(data.parent)}
    base = ["eval", "--adapter", adapter, "--data", data, "--limit", "2", "--max-new-tokens", "2"]
    for out, fragment in ((mine, "it is not an nlora eval folder"), (adapter, "lies inside the input"),
                          (data.parent, "contains or lies inside the input")):  # fmt: skip
        rc, _, err = nlora(*base, "--output-dir", out)
        one_line_error(rc, err, str(out), fragment)
    assert before == {"mine": content(mine), "adapter": content(adapter), "data": content(data.parent)}
    for _ in range(2):  # a new folder, then that folder of eval's own again: replaced as a whole
        rc, _, err = nlora(*base, "--output-dir", tmp_path / "eval")
        assert rc == 0, err[-2000:]
    assert sorted(content(tmp_path / "eval")) == [".nlora-eval", "predictions.jsonl", "score.json"]


def test_compare_never_replaces_a_users_tables(assets, tmp_path):
    mine = user_folder(tmp_path / "mine")
    (mine / "compare.md").write_text("my table\n")
    before = content(mine)
    rc, _, err = nlora("compare", *train_args(assets["model"], assets["sft"], mine), "--methods", "lora")
    one_line_error(rc, err, "it is not an nlora compare folder")
    assert content(mine) == before


def test_export_never_replaces_the_run_that_holds_its_adapter(assets, tmp_path):
    run = assets["run"]
    before = content(run)
    rc, _, err = nlora("export", "--adapter", run / "adapter", "--out", run, "--overwrite")
    one_line_error(rc, err, "contains or lies inside the input")
    assert content(run) == before


def test_target_modules_with_spaces_mean_the_same_modules(assets, tmp_path):
    trained = {}
    for name, targets in (("plain", "q_proj,v_proj"), ("spaced", "q_proj, v_proj")):
        args = train_args(assets["model"], assets["sft"], tmp_path / name, "--target-modules", targets)
        rc, _, err = nlora("train", *args)
        assert rc == 0, err[-2000:]
        trained[name] = json.loads((tmp_path / name / "summary.json").read_text())["trainable_params"]
    assert trained["spaced"] == trained["plain"] > 0


def test_all_linear_means_what_it_means_in_peft(assets, tmp_path):
    trained = {}
    for name, extra in (("default", ()), ("keyword", ("--target-modules", "all-linear"))):
        rc, _, err = nlora("train", *train_args(assets["model"], assets["sft"], tmp_path / name, *extra))
        assert rc == 0, err[-2000:]  # it was refused as "matches no module"
        trained[name] = json.loads((tmp_path / name / "summary.json").read_text())["trainable_params"]
    assert trained["keyword"] == trained["default"] > 0


@pytest.mark.parametrize("flags,fragment", [(["--methods", "lora,lora"], "--methods names a method twice"),
                                            (["--seeds", "0,0"], "--seeds names a seed twice")])  # fmt: skip
def test_compare_refuses_the_same_run_twice(assets, tmp_path, flags, fragment):
    rc, _, err = nlora("compare", *train_args(assets["model"], assets["sft"], tmp_path / "c"), *flags)
    one_line_error(rc, err, fragment)
    assert not (tmp_path / "c").exists()


# --- help and refusals found by trying each command as a new user ------------------------------------------------
def test_help_text_says_what_each_flag_does(capsys):
    assert main(["train", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--no_residual, --no-residual turn off --residual" in text
    assert "--no_eval_before, --no-eval-before turn off --eval-before" in text
    assert "EOS token) (default: )" not in text  # the default was stated twice


def test_prepare_takes_no_config_and_eval_refuses_an_adapter_of_the_other_task(assets, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("max_steps: 2\n")
    rc, _, err = nlora("prepare", "--config", config)
    one_line_error(rc, err, "nlora prepare takes no settings")
    data = write_jsonl(tmp_path / "s.jsonl", sentiment_rows(8))
    rc, _, err = nlora("eval", "--task", "classification", "--adapter", assets["run"] / "adapter", "--data", data,
                       "--output-dir", tmp_path / "eval")  # fmt: skip
    one_line_error(rc, err, "was trained for a generation task (sft) (CAUSAL_LM)", "--task classification")
    assert not (tmp_path / "eval").exists()


def test_folders_nlora_writes_are_readable_like_the_run_folder(assets, tmp_path):
    """mkdtemp made adapter/, merged/ and every export 0700: a serving user in the same group could not read them."""
    import os

    umask = os.umask(0)
    os.umask(umask)
    run = tmp_path / "run"
    rc, _, err = nlora("train", *train_args(assets["model"], assets["sft"], run, "--merge"))
    assert rc == 0, err[-2000:]
    rc, _, err = nlora("export", "--adapter", run / "adapter", "--out", tmp_path / "export")
    assert rc == 0, err[-2000:]
    for folder in (run, run / "adapter", run / "merged", tmp_path / "export"):
        assert folder.stat().st_mode & 0o777 == 0o777 & ~umask, folder


def test_a_replaced_run_kept_aside_goes_once_the_resumed_run_completes(assets, tmp_path):
    """--overwrite, Ctrl-C, then --resume: the previous run kept in .NAME.previous-PID is removed (and said so) when
    the resumed run completes; until then it stays."""
    import shutil

    run = tmp_path / "run"
    args = train_args(assets["model"], assets["sft"], run, "--max-steps", "4", "--save-steps", "2")
    rc, _, err = nlora("train", *args)
    assert rc == 0, err[-2000:]
    kept = tmp_path / ".run.previous-99999"  # what an interrupted --overwrite of an earlier run leaves
    shutil.copytree(run, kept)
    for name in ("checkpoint-4", "adapter", "summary.json"):  # this run was interrupted after step 2
        shutil.rmtree(run / name) if (run / name).is_dir() else (run / name).unlink()
    (run / "notes.txt").write_text("mine\n")  # resuming replaces nothing, so a file of the user's does not stop it
    rc, _, err = nlora("train", *args, "--resume")
    assert rc == 0, err[-2000:]
    assert not kept.exists() and f"removed {kept}" in err
    assert (run / "notes.txt").read_text() == "mine\n"
    assert (run / "adapter" / "adapter_model.safetensors").exists()


def test_export_to_the_current_folder_and_compare_resume_are_one_line(assets, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, _, err = nlora("export", "--adapter", assets["run"] / "adapter", "--out", ".")
    one_line_error(rc, err, ". names no folder of its own")  # was "PosixPath('.') has an empty name"
    rc, _, err = nlora("compare", *train_args(assets["model"], assets["sft"], tmp_path / "c"), "--resume")
    one_line_error(rc, err, "nlora compare resumes by itself")  # was silently ignored
    assert sorted(p.name for p in tmp_path.iterdir()) == []
