"""The ``nlora train`` recipe: one file, explicit settings, transformers ``Trainer`` underneath.

Mixed precision, gradient accumulation, checkpointing and distributed training (``accelerate launch``, DeepSpeed,
FSDP) come from Trainer/accelerate; this file only wires data, model, adapter and bookkeeping together.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from ..io import atomic_directory
from .settings import TrainSettings

RUN_CONFIG = "run_config.json"


class RunError(ValueError):
    """A problem with the user's run settings or files (reported as one line, exit code 2)."""


def prepare_output_dir(settings: TrainSettings) -> tuple[Path, str | None]:
    """Guard the output directory; return it and the checkpoint to resume from (if any)."""
    out = Path(settings.output_dir)
    previous = out / RUN_CONFIG
    if settings.resume:
        if not previous.exists():
            raise RunError(f"Cannot resume: {out} holds no run ({RUN_CONFIG} is missing); start it without --resume.")
        recorded = json.loads(previous.read_text())
        current = settings.comparable()
        differing = sorted(k for k in set(recorded) | set(current) if recorded.get(k) != current.get(k))
        if differing:
            raise RunError(
                f"Cannot resume {out}: it was started with different settings ({', '.join(differing)}); "
                "resume with the same settings or use another --output-dir."
            )
        return out, last_complete_checkpoint(out)
    if out.exists() and any(out.iterdir()):
        if not settings.overwrite:
            raise RunError(
                f"Output directory {out} already holds files of another run; pass --overwrite to replace it, "
                "--resume to continue it, or choose another --output-dir."
            )
        # keep a previous adapter until the new one replaces it atomically; clear the rest
        for child in out.iterdir():
            if child.name not in ("adapter", "merged"):
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    out.mkdir(parents=True, exist_ok=True)
    tmp = previous.with_suffix(".tmp")
    tmp.write_text(json.dumps(settings.comparable(), indent=2))
    os.replace(tmp, previous)
    return out, None


def last_complete_checkpoint(out: Path) -> str | None:
    """The highest ``checkpoint-N`` whose state, adapter and optimizer files were all written."""
    complete = []
    for path in out.glob("checkpoint-*"):
        needed = ("trainer_state.json", "adapter_model.safetensors", "optimizer.pt")
        if path.name.split("-")[-1].isdigit() and all((path / n).exists() for n in needed):
            complete.append((int(path.name.split("-")[-1]), path))
    return str(max(complete)[1]) if complete else None


def load_model_and_tokenizer(settings: TrainSettings):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from .assets import resolve_model

    path = resolve_model(settings.model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=settings.trust_remote_code)
    except OSError as err:
        raise RunError(
            f"Model '{settings.model}' could not be loaded ({err}); give a local folder or an offline name."
        ) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if settings.task == "sft":
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, trust_remote_code=settings.trust_remote_code
        )
    else:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=settings.num_labels, dtype=torch.float32, trust_remote_code=settings.trust_remote_code
        )
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def build_trainer(settings: TrainSettings, model, tokenizer, train_rows, eval_rows, callbacks):
    import torch
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding, Trainer, TrainingArguments

    from .data import tokenize_classification, tokenize_sft
    from .evaluate import classification_metrics

    tokenize = tokenize_sft if settings.task == "sft" else tokenize_classification
    train_set, eval_set = tokenize(train_rows, tokenizer, settings), tokenize(eval_rows, tokenizer, settings)
    if settings.task == "sft":
        collator, compute_metrics = DataCollatorForSeq2Seq(tokenizer, padding=True), None
    else:
        collator = DataCollatorWithPadding(tokenizer)
        compute_metrics = lambda p: classification_metrics(p.predictions, p.label_ids, settings.num_labels)  # noqa: E731
    args = TrainingArguments(
        output_dir=settings.output_dir,
        learning_rate=settings.learning_rate,
        lr_scheduler_type=settings.lr_scheduler_type,
        warmup_steps=settings.warmup_ratio,  # a float < 1 is a ratio in transformers 5
        weight_decay=settings.weight_decay,
        per_device_train_batch_size=settings.per_device_train_batch_size,
        per_device_eval_batch_size=settings.per_device_eval_batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        num_train_epochs=settings.num_train_epochs,
        max_steps=settings.max_steps,
        seed=settings.seed,
        data_seed=settings.seed,
        logging_steps=settings.logging_steps,
        eval_strategy="steps" if settings.eval_steps else "no",
        eval_steps=settings.eval_steps or None,
        save_strategy="steps" if settings.save_steps else "no",
        save_steps=settings.save_steps or 500,
        bf16=settings.bf16,
        gradient_checkpointing=settings.gradient_checkpointing,
        report_to=[],
        include_num_input_tokens_seen="non_padding",
        remove_unused_columns=False,
        disable_tqdm=False,
        ddp_find_unused_parameters=False,
        use_cpu=not torch.cuda.is_available(),  # also makes multi-process CPU runs use DDP (gloo)
    )
    return Trainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=collator,
        processing_class=tokenizer,
        compute_metrics=compute_metrics,
        callbacks=callbacks,
    )


def run_train(settings: TrainSettings) -> dict[str, Any]:
    """Fine-tune, evaluate before/after on the held-out set, save the adapter (and merged model); return a summary."""
    import torch
    from accelerate import PartialState
    from peft import get_peft_model
    from transformers import set_seed

    from .callbacks import GracefulInterrupt, MetricsLogger, peak_memory_mb
    from .data import train_and_eval_rows
    from .methods import peft_config

    settings.validate()
    # sets up torch.distributed under torchrun / accelerate launch (gloo when there is no GPU)
    state = PartialState(cpu=not torch.cuda.is_available())
    if state.is_main_process:  # one process guards and prepares the output directory
        out, resume_from = prepare_output_dir(settings)
    state.wait_for_everyone()
    if not state.is_main_process:
        out = Path(settings.output_dir)
        resume_from = last_complete_checkpoint(out) if settings.resume else None
    set_seed(settings.seed)
    train_rows, eval_rows = train_and_eval_rows(settings)
    model, tokenizer = load_model_and_tokenizer(settings)

    started = time.perf_counter()
    try:
        model = get_peft_model(model, peft_config(settings))
    except ValueError as err:
        raise RunError(str(err)) from err
    init_seconds = time.perf_counter() - started
    trainable, total = model.get_nb_trainable_parameters()

    resume_step = int(resume_from.rsplit("-", 1)[-1]) if resume_from else 0
    metrics = MetricsLogger(out / "metrics.jsonl", resume_step=resume_step, writer=state.is_main_process)
    interrupt = GracefulInterrupt()
    trainer = build_trainer(settings, model, tokenizer, train_rows, eval_rows, [metrics, interrupt])
    before = trainer.evaluate(metric_key_prefix="before") if settings.eval_before and not resume_from else {}

    interrupt.install()
    try:
        result = trainer.train(resume_from_checkpoint=resume_from)
    finally:
        interrupt.uninstall()
    if interrupt.requested:
        checkpoint = last_complete_checkpoint(out)
        print(f"nlora: interrupted; checkpoint saved at {checkpoint}; continue with --resume.", file=sys.stderr)
        raise KeyboardInterrupt

    after = trainer.evaluate(metric_key_prefix="after")
    summary = {
        "method": settings.method,
        "model": settings.model,
        "data": settings.data,
        "seed": settings.seed,
        "trainable_params": trainable,
        "total_params": total,
        "init_seconds": init_seconds,
        "steps": trainer.state.global_step,
        "train_loss": _last_logged(trainer, "loss"),
        "step_seconds_median": statistics.median(metrics.step_seconds) if metrics.step_seconds else math.nan,
        "peak_memory_mb": peak_memory_mb(),
        "train_runtime": result.metrics.get("train_runtime"),
        **{k: v for k, v in before.items() if isinstance(v, (int, float))},
        **{k: v for k, v in after.items() if isinstance(v, (int, float))},
    }
    if trainer.is_world_process_zero():
        with atomic_directory(out / "adapter") as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        if settings.merge:
            with atomic_directory(out / "merged") as tmp:
                model.merge_and_unload().save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _last_logged(trainer, key: str) -> float:
    values = [entry[key] for entry in trainer.state.log_history if key in entry]
    return values[-1] if values else math.nan
