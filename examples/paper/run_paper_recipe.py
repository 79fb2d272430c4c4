"""The paper's NLG set-up, one recipe for every method: MetaMathQA -> GSM8K (and MATH) through the harness.

GPU (needs the hub):  HF_HUB_OFFLINE=0 python examples/paper/run_paper_recipe.py --recipes nlora,pissa
Tiny smoke test:      python examples/paper/run_paper_recipe.py --model DIR --data FILE.jsonl --max-steps 2 ...

For each recipe (nlora_recipe.yaml: the authors' scripts; pissa_recipe.yaml: PiSSA's, which the paper's baselines
likely used) and each method, it runs ``nlora train --config RECIPE --method M`` and then
``nlora eval --harness gsm8k`` (and ``--harness TASK`` for each --math-harness task, e.g. minerva_math, when its
data is reachable), and writes ``results.md`` with one row per (recipe, method).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from nlora.cli import main as nlora

HERE = Path(__file__).parent
METHODS = "lora,pissa,slora,nlora,nlora-reference,inttune"


def metamath(out: Path, train_size: int, heldout_size: int) -> tuple[Path, Path]:
    """MetaMathQA's first ``train_size`` rows (the paper's split) and the next ``heldout_size`` as held-out set."""
    import datasets

    rows = datasets.load_dataset("meta-math/MetaMathQA", split=f"train[:{train_size + heldout_size}]").to_list()
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", rows[:train_size]), ("heldout", rows[train_size:])):
        with (out / f"metamath-{name}.jsonl").open("w") as handle:
            for row in part:
                handle.write(json.dumps({"query": row["query"], "response": row["response"]}) + "\n")
    return out / "metamath-train.jsonl", out / "metamath-heldout.jsonl"


def run(args: argparse.Namespace) -> Path:
    out = Path(args.output_dir)
    if args.data:
        train, heldout = Path(args.data), Path(args.eval_data or args.data)
    else:
        train, heldout = metamath(out / "data", args.train_size, 500)
    rows = []
    for recipe in args.recipes.split(","):
        for method in args.methods.split(","):
            run_dir = out / recipe / method
            flags = ["--config", str(HERE / f"{recipe}_recipe.yaml"), "--method", method, "--data", str(train),
                     "--eval-data", str(heldout), "--output-dir", str(run_dir), *args.train_flags]  # fmt: skip
            if args.model:
                flags += ["--model", args.model]
            if args.max_steps:
                flags += ["--max-steps", str(args.max_steps)]
            if (run_dir / "summary.json").exists():
                print(f"{recipe}/{method}: already trained, reusing {run_dir}")
            elif nlora(["train", *flags]) != 0:
                raise SystemExit(f"training {recipe}/{method} failed")
            summary = json.loads((run_dir / "summary.json").read_text())
            scores = {}
            for task in ["gsm8k", *filter(None, args.math_harness.split(","))]:
                eval_dir = run_dir / f"eval-{task}"
                eval_flags = ["--harness", task, "--adapter", str(run_dir / "adapter"), "--output-dir", str(eval_dir),
                              "--batch-size", str(args.eval_batch_size),
                              "--max-new-tokens", str(args.max_new_tokens)]  # fmt: skip
                if args.model:
                    eval_flags += ["--model", args.model]
                eval_flags += ["--limit", str(args.eval_limit or 10**9)]  # default: every problem
                if args.num_fewshot is not None:
                    eval_flags += ["--num-fewshot", str(args.num_fewshot)]
                if nlora(["eval", *eval_flags]) != 0:
                    raise SystemExit(f"evaluating {recipe}/{method} on {task} failed")
                score = json.loads((eval_dir / "score.json").read_text())
                scores.update({f"{task} {k}": v for k, v in score.items() if k.startswith("exact_match,")})
            rows.append({"recipe": recipe, "method": method, "held-out loss": summary.get("after_loss"),
                         "trainable": summary["trainable_params"], **scores})  # fmt: skip
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(f"{r.get(k):.4g}" if isinstance(r.get(k), float) else str(r.get(k, "–")) for k in keys)
              + " |" for r in rows]  # fmt: skip
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    return out / "results.md"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default="nlora,pissa", help="nlora (the authors' scripts), pissa, or both")
    parser.add_argument("--methods", default=METHODS)
    parser.add_argument("--model", help="any causal LM (default: the recipe's meta-llama/Llama-2-7b-hf)")
    parser.add_argument("--data", help="a local query/response JSONL instead of MetaMathQA from the hub")
    parser.add_argument("--eval-data", help="held-out query/response JSONL (default: MetaMathQA rows after train)")
    parser.add_argument("--train-size", type=int, default=100_000)
    parser.add_argument("--max-steps", type=int, help="cap the steps (smoke tests); default: one epoch")
    parser.add_argument("--math-harness", default="", help="extra harness tasks, e.g. minerva_math (needs its data)")
    parser.add_argument("--eval-limit", type=int, help="score the first N problems (default: all)")
    parser.add_argument("--eval-batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--num-fewshot", type=int, help="default: the harness task's (GSM8K: 5)")
    parser.add_argument("--output-dir", default="runs/paper")
    parser.add_argument("train_flags", nargs="*", help="after --: more `nlora train` flags, e.g. --bf16 false")
    print(run(parser.parse_args()).read_text())


if __name__ == "__main__":
    main()
