"""The ``nlora train`` recipe: one file, explicit settings, transformers ``Trainer`` underneath.

Mixed precision, gradient accumulation, checkpointing and distributed training (``accelerate launch``, DeepSpeed,
FSDP) come from Trainer/accelerate; this file only wires data, model, adapter and bookkeeping together.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from ..files import RUN_MARKER, OutputFolder, atomic_directory, write_atomic
from .settings import TrainSettings, recorded_settings

RUN_CONFIG = "run_config.json"


class RunError(ValueError):
    """A problem with the user's run settings or files (reported as one line, exit code 2)."""


def run_output(settings: TrainSettings) -> OutputFolder:
    """The run's output folder (a local data file or model folder inside it, or around it, is refused)."""
    return OutputFolder(settings.output_dir, RUN_MARKER, overwrite=settings.overwrite,
                        inputs=[settings.data, settings.model])  # fmt: skip


def check_run_dir(settings: TrainSettings) -> str | None:
    """Check the output folder without writing anything; return the checkpoint to resume from (if any)."""
    out = Path(settings.output_dir)
    if settings.resume:
        run_output(settings).check(resume=True)  # still a run folder, and only of nlora's files
        if not (out / RUN_CONFIG).exists() or not (out / RUN_MARKER).exists():
            raise RunError(f"Cannot resume: {out} holds no nlora run; start it without --resume.")
        recorded = recorded_settings(json.loads((out / RUN_CONFIG).read_text()))
        recorded.pop("label_names", None)  # derived from the data, not a setting
        recorded.pop("learning_rate_source", None)  # the rate itself is compared
        current = settings.comparable()
        differing = sorted(k for k in set(recorded) | set(current) if recorded.get(k) != current.get(k))
        if differing:
            raise RunError(
                f"Cannot resume {out}: it was started with different settings ({', '.join(differing)}); "
                "resume with the same settings or use another --output-dir."
            )
        if (out / "summary.json").exists() and (out / "adapter").is_dir():  # Trainer would take one step more
            raise RunError(
                f"Cannot resume {out}: that run is complete (its adapter and summary.json are saved); pass "
                "--overwrite to train it again, or raise --max-steps under another --output-dir."
            )
        return last_complete_checkpoint(out)
    if run_output(settings).check(resume=True) and not settings.overwrite:
        raise RunError(
            f"{out} holds another nlora run; pass --overwrite to replace it once this run has its adapter, "
            "--resume to continue it, or choose another --output-dir."
        )
    return None


class RunFolder:
    """The output folder, written only once every check has passed. With --overwrite the previous run is moved
    aside (never deleted) until this run has saved its adapter; if this run fails, it is put back."""

    def __init__(self, settings: TrainSettings, label_names: list[str] | None = None):
        self.folder = run_output(settings)
        self.out = self.folder.path
        self.settings, self.label_names = settings, label_names
        self.previous: Path | None = None
        self.created = False
        self.was_there = False  # an empty folder the user made: emptied, never removed, on failure

    def open(self) -> None:
        """Lock the folder (a second writer is refused), then move a replaced run aside and mark the folder."""
        self.folder.acquire(resume=self.settings.resume)
        if self.settings.resume:
            return
        if self.out.exists() and any(self.out.iterdir()):  # an nlora run: check_run_dir allowed --overwrite
            self.previous = self.out.with_name(f".{self.out.name}.previous-{os.getpid()}")
            os.replace(self.out, self.previous)
        self.was_there = self.out.is_dir()
        self.out.mkdir(parents=True, exist_ok=True)
        self.created = True
        self.folder.write_marker()
        recorded = {**self.settings.comparable(), "learning_rate_source": self.settings.learning_rate_source}
        if self.label_names:  # class id i is label_names[i] (also the model's id2label)
            recorded["label_names"] = self.label_names
        write_atomic(self.out / RUN_CONFIG, json.dumps(recorded, indent=2))

    def done(self) -> None:
        self.folder.release(finished=True)  # the replaced run (and any an interrupted command left) goes now

    def failed(self) -> None:
        """A crash: remove what this run wrote and put the previous run back."""
        try:
            if not self.created:
                return
            if self.was_there:  # it was empty: everything in it is ours
                for child in self.out.iterdir():
                    shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink()
                return
            shutil.rmtree(self.out, ignore_errors=True)
            if self.previous is not None:
                os.replace(self.previous, self.out)
        finally:
            self.folder.release(finished=False)

    def interrupted(self) -> None:
        if self.previous is not None:
            print(f"nlora: the previous run stays in {self.previous} until this run completes (--resume finishes it "
                  "and then removes it).", file=sys.stderr)  # fmt: skip
        self.folder.release(finished=False)


def last_complete_checkpoint(out: Path) -> str | None:
    """The highest ``checkpoint-N`` whose state, adapter and optimizer files were all written."""
    complete = []
    for path in out.glob("checkpoint-*"):
        needed = ("trainer_state.json", "adapter_model.safetensors", "optimizer.pt")
        if path.name.split("-")[-1].isdigit() and all((path / n).exists() for n in needed):
            complete.append((int(path.name.split("-")[-1]), path))
    return str(max(complete)[1]) if complete else None


def tokenize(settings: TrainSettings, tokenizer, *row_sets: list[dict]) -> tuple[list[dict] | None, ...]:
    """Tokenised examples of the task, one list per set of rows (None for an empty set)."""
    from .data import tokenize_classification, tokenize_sft

    encode = tokenize_sft if settings.task == "sft" else tokenize_classification
    return tuple(encode(rows, tokenizer, settings) if rows else None for rows in row_sets)


def _checkpointing_argument() -> str:
    """transformers 5 renamed TrainingArguments' gradient_checkpointing (the old name warns)."""
    import inspect

    from transformers import TrainingArguments

    parameters = inspect.signature(TrainingArguments).parameters
    return "activation_checkpointing" if "activation_checkpointing" in parameters else "gradient_checkpointing"


def build_trainer(settings: TrainSettings, model, tokenizer, train_set, eval_set, callbacks):
    import torch
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding, TrainingArguments

    from .metrics import classification_metrics
    from .trainer import SeedFaithfulTrainer

    if settings.task == "sft":
        collator, compute_metrics = DataCollatorForSeq2Seq(tokenizer, padding=True), None
    else:
        collator = DataCollatorWithPadding(tokenizer)
        compute_metrics = lambda p: classification_metrics(p.predictions, p.label_ids, settings.num_labels)  # noqa: E731
    checkpointing = _checkpointing_argument()
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
        **{checkpointing: settings.gradient_checkpointing},
        report_to=[],
        include_num_input_tokens_seen="non_padding",
        remove_unused_columns=False,
        disable_tqdm=False,
        ddp_find_unused_parameters=False,
        use_cpu=not torch.cuda.is_available(),  # also makes multi-process CPU runs use DDP (gloo)
    )
    return SeedFaithfulTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=collator,
        processing_class=tokenizer,
        compute_metrics=compute_metrics,
        callbacks=callbacks,
    )


def check_max_length(model, max_length: int) -> None:
    """--max-length may not exceed the positions the model has (an encoder's position table fails with a raw tensor
    message deep inside its forward)."""
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions and max_length > positions:
        raise RunError(f"--max-length {max_length} exceeds the {positions} positions of the model; set --max-length "
                       f"{positions} or less.")  # fmt: skip


def check_ranks(model, config) -> None:
    """Every method, stock LoRA and PiSSA included: the rank must fit each targeted module."""
    from ..layer import weight_shape
    from ..model import targeted_modules

    targets = targeted_modules(model, config)
    if not targets:
        wanted = config.target_modules
        wanted = ",".join(sorted(wanted)) if isinstance(wanted, (set, list, tuple)) else wanted
        raise RunError(f"--target-modules {wanted} matches no module of the model; check the module names.")
    if isinstance(config.target_modules, (set, list, tuple)):  # PEFT keeps a list that matches in part: not us
        for name in sorted(config.target_modules):
            if not any(key == name or key.endswith(f".{name}") for key in targets):
                raise RunError(f"--target-modules names '{name}', which matches no module of the model; check its "
                               "spelling or leave it out.")  # fmt: skip
    for key, (base, r) in targets.items():
        if getattr(base, "weight", None) is None or base.weight.dim() != 2:
            continue
        out_f, in_f = weight_shape(base)
        if r > min(out_f, in_f):
            raise RunError(
                f"Rank {r} is too large for module '{key}' ({out_f}x{in_f}); use --rank {min(out_f, in_f)} or less."
            )


def run_train(settings: TrainSettings) -> dict[str, Any]:
    """Fine-tune, evaluate before/after on the held-out set, save the adapter (and merged model); return a summary.

    Model, data, targets, ranks and the output folder are all checked before anything is written, so a failed
    run leaves no trace and its fixed retry starts clean.
    """
    import torch
    from accelerate import PartialState
    from peft import get_peft_model
    from transformers import set_seed

    from .data import train_and_eval_rows
    from .methods import peft_config
    from .models import load_model

    settings.validate()
    if Path(settings.output_dir).is_symlink():  # the folder a link points to is the run folder
        settings = dataclasses.replace(settings, output_dir=str(Path(settings.output_dir).resolve()))
    # sets up torch.distributed under torchrun / accelerate launch (gloo when there is no GPU)
    state = PartialState(cpu=not torch.cuda.is_available())
    out = Path(settings.output_dir)
    resume_from = check_run_dir(settings)
    set_seed(settings.seed)
    train_rows, eval_rows, validation_rows, label_names = train_and_eval_rows(settings)
    config = peft_config(settings)
    # QNLoRA: a residual init on a quantised base is computed from the full-precision weights first
    qnlora = settings.quantization != "none" and getattr(config, "uses_residual", False)
    model, tokenizer = load_model(
        settings.model, settings.task, settings.num_labels, settings.trust_remote_code, label_names=label_names,
        trainable=True, quantization="none" if qnlora else settings.quantization,
    )  # fmt: skip
    check_ranks(model, config)
    check_max_length(model, settings.max_length)
    started = time.perf_counter()
    if not qnlora:
        try:
            model = get_peft_model(model, config)
        except ValueError as err:
            raise RunError(str(err)) from err
    init_seconds = time.perf_counter() - started
    train_set, eval_set, validation_set = tokenize(settings, tokenizer, train_rows, eval_rows, validation_rows)

    # every check passed: from here on the run writes
    folder = RunFolder(settings, label_names)
    if state.is_main_process:
        folder.open()
    state.wait_for_everyone()
    try:
        if qnlora:
            started = time.perf_counter()
            model = quantized_residual_model(settings, state, model, config, tokenizer)
            init_seconds = time.perf_counter() - started
        trainable, total = model.get_nb_trainable_parameters()
        summary = _train(settings, state, model, tokenizer, train_set, eval_set, validation_set, resume_from, out)
    except KeyboardInterrupt:
        folder.interrupted()
        raise
    except BaseException:
        if state.is_main_process:
            folder.failed()
        raise
    summary.update(init_seconds=init_seconds, trainable_params=trainable, total_params=total,
                   label_names=label_names)  # fmt: skip
    if state.is_main_process:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        folder.done()
    return summary


RESIDUAL_BASE = "residual-base"


def quantized_residual_model(settings: TrainSettings, state, model, config, tokenizer):
    """Save the residual model of the full-precision ``model`` in the run folder (once), load it quantised and put
    the initial adapter on it, trainable (``nlora.save_residual_model``'s workflow)."""
    from peft import PeftModel

    from ..residual_model import ADAPTER_SUBDIR, save_residual_model
    from .models import load_model

    residual = Path(settings.output_dir) / RESIDUAL_BASE
    if state.is_main_process and not (residual / ADAPTER_SUBDIR).exists():
        save_residual_model(model, config, residual, tokenizer=tokenizer)
    state.wait_for_everyone()
    del model
    quantized, _ = load_model(str(residual), settings.task, settings.num_labels, settings.trust_remote_code,
                              trainable=True, quantization=settings.quantization)  # fmt: skip
    model = PeftModel.from_pretrained(quantized, residual / ADAPTER_SUBDIR, is_trainable=True)
    model.peft_config["default"].base_model_name_or_path = str(residual.resolve())  # the adapter belongs to this base
    return model


def _train(settings, state, model, tokenizer, train_set, eval_set, validation_set, resume_from, out: Path) -> dict:
    from .callbacks import GracefulInterrupt, MetricsLogger

    resume_step = int(resume_from.rsplit("-", 1)[-1]) if resume_from else 0
    metrics = MetricsLogger(out / "metrics.jsonl", resume_step=resume_step, writer=state.is_main_process)
    interrupt = GracefulInterrupt()
    trainer = build_trainer(settings, model, tokenizer, train_set, eval_set, [metrics, interrupt])
    before = trainer.evaluate(metric_key_prefix="before") if settings.eval_before and not resume_from else {}
    if resume_from:  # the step-0 numbers of the run being resumed are in its metrics
        before = _logged_before(out / "metrics.jsonl")

    interrupt.install()
    try:
        result = trainer.train(resume_from_checkpoint=resume_from)
        if interrupt.requested:
            checkpoint = last_complete_checkpoint(out)
            print(f"nlora: interrupted; checkpoint saved at {checkpoint}; continue with --resume.", file=sys.stderr)
            raise KeyboardInterrupt
        interrupt.finishing = True
        return _finish(settings, trainer, metrics, model, tokenizer, validation_set, result, before, out)
    finally:
        interrupt.uninstall()


def _logged_before(metrics: Path) -> dict[str, float]:
    """The ``before_*`` evaluation a run logged at step 0 (what a resumed run reports as its start)."""
    found = {}
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            found |= {k: v for k, v in json.loads(line).items() if k.startswith("before_")}
    return found


def _finish(settings, trainer, metrics, model, tokenizer, validation_set, result, before, out: Path) -> dict:
    """The final evaluation, the summary and the saved adapter (a Ctrl-C meanwhile waits for them)."""
    from .callbacks import peak_memory_mb

    after = trainer.evaluate(metric_key_prefix="after")
    if validation_set is not None:  # for choosing settings on rows that the reported numbers do not use
        after |= trainer.evaluate(validation_set, metric_key_prefix="validation")
    summary = {
        "method": settings.method,
        "model": settings.model,
        "data": settings.data,
        "seed": settings.seed,
        "learning_rate": settings.learning_rate,
        "learning_rate_source": settings.learning_rate_source,
        "steps": trainer.state.global_step,
        "train_loss": _last_logged(trainer, "loss"),  # the last logged step's; the run's mean is train_loss_mean
        "train_loss_mean": result.training_loss,
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
    return summary


def print_summary(summary: dict, output_dir: str) -> None:
    """The before/after numbers of a run, for the terminal."""
    keys = [k for k in summary if k.startswith(("before_", "after_"))]
    print(
        f"\nnlora: {summary['method']} on {summary['data']}: {summary['trainable_params']:,} trainable parameters, "
        f"init {summary['init_seconds']:.2f} s, {summary['steps']} steps at learning rate "
        f"{summary['learning_rate']:g} ({summary['learning_rate_source']})"
    )
    skip = {"runtime", "samples_per_second", "steps_per_second", "model_preparation_time"}
    for name in sorted({k.split("_", 1)[1] for k in keys} - skip):
        before, after = summary.get(f"before_{name}"), summary.get(f"after_{name}")
        if after is not None:
            first = f"{before:.4f} -> " if before is not None else ""
            print(f"  held-out {name}: {first}{after:.4f}")
    print(f"  adapter: {output_dir}/adapter   metrics: {output_dir}/metrics.jsonl   summary: {output_dir}/summary.json")


def _last_logged(trainer, key: str) -> float:
    values = [entry[key] for entry in trainer.state.log_history if key in entry]
    return values[-1] if values else math.nan
