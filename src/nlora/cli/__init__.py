"""The ``nlora`` command line: train, demo, eval, compare, export and prepare, one recipe module each."""

from __future__ import annotations

import os
import sys

from .settings import CompareSettings, EvalSettings, ExportSettings, SettingsError, parse, train_settings

COMMANDS = {
    "train": "fine-tune (no arguments: the offline demo)",
    "demo": "the offline demo: SmolLM2-135M on GSM8K with NLoRA, held-out loss before and after",
    "eval": "score a model or adapter: gsm8k, math, humaneval, classification",
    "compare": "several methods x seeds under one recipe: a table and loss curves in --output-dir",
    "export": "an NLoRA adapter as a vanilla PEFT LoRA adapter (vLLM-servable), or a merged model",
    "prepare": "install and convert the offline model and data into the cache",
}


def _train(argv: list[str], command: str) -> int:
    from accelerate import PartialState

    from .train import print_summary, run_train

    settings, _ = train_settings(argv, prog=f"nlora {command}")
    summary = run_train(settings)
    if PartialState().is_main_process:  # under torchrun every rank returns the summary: print it once
        print_summary(summary, settings.output_dir)
    return 0


def _eval(argv: list[str]) -> int:
    import json

    from .evaluate import run_eval

    (settings,) = parse((EvalSettings,), argv, "nlora eval")
    score = run_eval(settings)
    print(json.dumps({"task": settings.harness or settings.task, **score}, indent=2))
    print(f"predictions: {settings.output_dir}/predictions.jsonl")
    return 0


def _compare(argv: list[str]) -> int:
    from .compare import run_compare

    settings, (compare,) = train_settings(
        argv, prog="nlora compare", extra=(CompareSettings,), defaults={"output_dir": "runs/compare"}
    )
    if settings.resume:
        raise SettingsError(
            "nlora compare resumes by itself (the runs it finished are stored in OUTPUT_DIR/runs and reused); leave "
            "out --resume."
        )
    if compare.tune:
        from .compare import run_tuned_compare

        table = run_tuned_compare(settings, compare, settings.output_dir)
        print(table.read_text())
        print(f"plots: {table.with_suffix('.png')}")
        return 0
    table = run_compare(settings, compare.method_list(), compare.seed_list(), settings.output_dir)
    print(table.read_text())
    print(f"curves: {table.with_suffix('.png')}")
    return 0


def _export(argv: list[str]) -> int:
    from .export import run_export

    (settings,) = parse((ExportSettings,), argv, "nlora export")
    print(run_export(settings))
    return 0


def _prepare(argv: list[str]) -> int:
    from . import assets

    if any(token == "--config" or token.startswith("--config=") for token in argv):
        raise SettingsError("nlora prepare takes no settings, so no --config; run it as `nlora prepare`.")
    parse((), argv, "nlora prepare")
    print(f"model smollm2-135m: {assets.smollm2_path()}")
    print(f"model minilm: {assets.minilm_path()}")
    print(f"data gsm8k: {len(assets.gsm8k_split('train'))} train / {len(assets.gsm8k_split('heldout'))} held-out")
    print(f"data vader-movies: {len(assets.vader_movie_rows())} rated sentences")
    return 0


def _usage() -> str:
    lines = ["usage: nlora COMMAND [--help] [--config FILE] [flags]", "", "SLoRA / NLoRA / IntTune on PEFT.", ""]
    lines += [f"  {name:<9} {text}" for name, text in COMMANDS.items()]
    return "\n".join(lines)


def _offline_unless_asked() -> None:
    """No hub requests unless the user sets HF_HUB_OFFLINE=0: huggingface_hub read the variable when ``import nlora``
    imported PEFT, so its constant is set too (a relative path that is no folder would become Hub requests)."""
    if "HF_HUB_OFFLINE" in os.environ or "TRANSFORMERS_OFFLINE" in os.environ:
        return
    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True


def _quiet() -> None:
    """Without a GPU, DeepSpeed (imported by transformers' Trainer) warns on stdout that it falls back to the CPU,
    at every command; and PEFT calls a property transformers 5 deprecated. Neither is the user's to act on."""
    import warnings

    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; bad input is one line on stderr (``nlora: error: ...``) and exit code 2."""
    _offline_unless_asked()
    _quiet()
    argv = list(sys.argv[1:] if argv is None else argv) or ["train"]
    command, rest = argv[0], argv[1:]
    if command in ("-h", "--help"):
        print(_usage())
        return 0
    handlers = {"train": lambda a: _train(a, "train"), "demo": lambda a: _train(a, "demo"), "eval": _eval,
                "compare": _compare, "export": _export, "prepare": _prepare}  # fmt: skip
    if command not in handlers:
        print(f"nlora: error: unknown command '{command}'; choose one of {', '.join(COMMANDS)}.", file=sys.stderr)
        return 2
    finished = False
    try:
        code = handlers[command](rest)
        finished = True
        return code
    except KeyboardInterrupt:
        return 130
    except SystemExit as done:  # --help
        return int(done.code or 0)
    except (SettingsError, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, RuntimeError) as err:
        message = " ".join(str(err).split())  # one line, whatever the library wrote
        print(f"nlora: error: {message}", file=sys.stderr)
        return 2
    except OSError as err:  # the file system refused (read-only, permissions, disk full): name the path
        where = f"{err.filename}: " if err.filename else ""
        print(f"nlora: error: {where}{err.strerror or err}; check that path or choose another one.", file=sys.stderr)
        return 2
    finally:
        _end_distributed(finished)


def _end_distributed(finished: bool) -> None:
    """Under torchrun, leave together and close the process group: a rank that exits while another still writes
    the adapter tears down gloo's threads mid-use, and the C++ runtime aborts it (SIGABRT at exit, seen in CI).
    After a failure there is no barrier, since the other ranks may never reach it."""
    import torch.distributed as dist

    from ..distributed import distributed_ready

    if not distributed_ready():
        return
    if finished:
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
