"""One recipe, six methods: the PEFT config of each. LoRA and PiSSA are stock PEFT, so baselines are the real thing."""

from __future__ import annotations

from peft import LoraConfig, TaskType

from ..config import NLoraConfig
from .settings import NYSTROM_KNOBS, TrainSettings


def peft_config(settings: TrainSettings) -> LoraConfig:
    """The adapter config of ``settings.method`` with the shared rank, alpha, dropout and targets."""
    task_type = TaskType.CAUSAL_LM if settings.task == "sft" else TaskType.SEQ_CLS
    named = settings.target_modules not in (None, "all-linear")  # PEFT's keyword, also when given by name
    targets = settings.target_modules.split(",") if named else "all-linear"
    shared = {
        "r": settings.r,
        "lora_alpha": settings.lora_alpha if settings.lora_alpha is not None else settings.r,
        "lora_dropout": settings.lora_dropout,
        "target_modules": targets,
        "task_type": task_type,
    }
    method = settings.method
    if method == "lora":
        return LoraConfig(**shared)
    if method == "pissa":  # full SVD: exact and reproducible on reload (pissa_niter_K is not, see the notes)
        return LoraConfig(init_lora_weights="pissa", **shared)
    nystrom = {
        **{knob: getattr(settings, knob) for knob in NYSTROM_KNOBS},
        "residual": settings.residual,
        "init_seed": settings.seed,
    }
    if method == "slora":
        return NLoraConfig(init_lora_weights="slora", init_seed=settings.seed, **shared)
    if method == "nlora":
        return NLoraConfig(init_lora_weights="nlora", **nystrom, **shared)
    if method == "nlora-reference":
        return NLoraConfig(init_lora_weights="nlora_reference", **shared)
    if method == "inttune":
        return NLoraConfig(init_lora_weights="nlora", train_intermediate_only=True, **nystrom, **shared)
    raise ValueError(f"Unknown method '{method}'.")
