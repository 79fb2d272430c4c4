"""The ``nlora`` command line: train, eval, compare, export, demo and prepare."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from .settings import METHODS, add_arguments, from_args


def _cmd_train(args: argparse.Namespace) -> int:
    from .train import run_train

    settings = from_args(args)
    summary = run_train(settings)
    _print_summary(summary, settings.output_dir)
    return 0


def _print_summary(summary: dict, output_dir: str) -> None:
    keys = [k for k in summary if k.startswith(("before_", "after_"))]
    print(
        f"\nnlora: {summary['method']} on {summary['data']}: {summary['trainable_params']:,} trainable parameters, "
        f"init {summary['init_seconds']:.2f} s, {summary['steps']} steps"
    )
    for name in sorted(
        {k.split("_", 1)[1] for k in keys}
        - {"runtime", "samples_per_second", "steps_per_second", "model_preparation_time"}
    ):
        before, after = summary.get(f"before_{name}"), summary.get(f"after_{name}")
        if after is not None:
            first = f"{before:.4f} -> " if before is not None else ""
            print(f"  held-out {name}: {first}{after:.4f}")
    print(f"  adapter: {output_dir}/adapter   metrics: {output_dir}/metrics.jsonl   summary: {output_dir}/summary.json")


def _cmd_eval(args: argparse.Namespace) -> int:
    from .evaluation import EvalSettings, run_eval

    fields = {f.name for f in dataclasses.fields(EvalSettings)}
    settings = EvalSettings(**{k: v for k, v in vars(args).items() if k in fields and v is not None})
    score = run_eval(settings)
    print(json.dumps({"task": settings.task, **score}, indent=2))
    print(f"predictions: {settings.output_dir}/predictions.jsonl")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from .compare import run_compare

    settings = from_args(args)
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"Unknown method(s) {unknown}; choose from {', '.join(METHODS)}.")
    seeds = [int(s) for s in args.seeds.split(",")]
    table = run_compare(settings, methods, seeds, args.compare_dir)
    print(table.read_text())
    print(f"curves: {table.with_suffix('.png')}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    import nlora
    from nlora.io import atomic_directory

    from .evaluation import EvalSettings, load_for_eval

    model, tokenizer = load_for_eval(EvalSettings(model=args.model, adapter=args.adapter))
    if args.merged:
        with atomic_directory(args.out) as tmp:
            model.merge_and_unload().save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    else:
        nlora.export_lora(model, args.out)
    print(f"nlora: wrote {'merged model' if args.merged else 'vanilla LoRA adapter'} to {args.out}")
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from . import assets

    print(f"model smollm2-135m: {assets.smollm2_path()}")
    print(f"model minilm: {assets.minilm_path()}")
    print(f"data gsm8k: {len(assets.gsm8k_split('train'))} train / {len(assets.gsm8k_split('heldout'))} held-out")
    print(f"data vader-movies: {len(assets.vader_movie_rows())} rated sentences")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nlora", description="SLoRA / NLoRA / IntTune fine-tuning on PEFT.")
    sub = parser.add_subparsers(dest="command")

    train = sub.add_parser("train", help="fine-tune (no arguments: the offline demo)")
    add_arguments(train)
    train.set_defaults(func=_cmd_train)
    demo = sub.add_parser("demo", help="the offline demo: SmolLM2-135M on GSM8K with NLoRA, before/after numbers")
    add_arguments(demo)
    demo.set_defaults(func=_cmd_train)

    ev = sub.add_parser("eval", help="score a model/adapter: gsm8k, math, humaneval, classification")
    ev.add_argument("--task", default="gsm8k")
    ev.add_argument("--model", help="base model (default: the adapter's base_model_name_or_path)")
    ev.add_argument("--adapter", help="adapter directory (NLoRA or LoRA)")
    ev.add_argument("--data", help="local file or offline name (gsm8k, vader-movies)")
    ev.add_argument("--limit", type=int, help="evaluate the first N items (default 32)")
    ev.add_argument("--batch-size", type=int)
    ev.add_argument("--max-new-tokens", type=int)
    ev.add_argument("--max-length", type=int)
    ev.add_argument("--output-dir", help="where predictions.jsonl and score.json go")
    ev.add_argument("--prompt-field")
    ev.add_argument("--answer-field")
    ev.add_argument("--text-field")
    ev.add_argument("--label-field")
    ev.add_argument("--num-labels", type=int)
    ev.add_argument("--timeout", type=float, help="seconds per HumanEval program")
    ev.set_defaults(func=_cmd_eval)

    cmp = sub.add_parser("compare", help="several methods x seeds under one recipe: table + loss curves")
    add_arguments(cmp)
    cmp.add_argument("--methods", default="lora,slora,nlora,inttune", help=f"comma list of {', '.join(METHODS)}")
    cmp.add_argument("--seeds", default="0", help="comma list of seeds")
    cmp.add_argument("--compare-dir", default="runs/compare")
    cmp.set_defaults(func=_cmd_compare)

    exp = sub.add_parser("export", help="an adapter as vanilla PEFT LoRA, or a merged model")
    exp.add_argument("--adapter", required=True)
    exp.add_argument("--model", help="base model (default: the adapter's base_model_name_or_path)")
    exp.add_argument("--out", required=True)
    exp.add_argument("--merged", action="store_true", help="write the merged model instead of a LoRA adapter")
    exp.set_defaults(func=_cmd_export)

    prep = sub.add_parser("prepare", help="install/convert the offline model and data into the cache")
    prep.set_defaults(func=_cmd_prepare)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub downloads unless the user asks for them
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv or ["train"])
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as err:
        print(f"nlora: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
