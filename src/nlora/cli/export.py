"""The ``nlora export`` recipe: an NLoRA adapter as a vanilla PEFT LoRA adapter, or as a merged model."""

from __future__ import annotations

from pathlib import Path

from safetensors import safe_open

from ..files import ADAPTER_WEIGHTS, EXPORT_MARKER, OutputFolder
from .models import adapter_config, load_model
from .settings import ExportSettings, SettingsError


def _classifier_labels(adapter: str) -> int | None:
    """The number of outputs of a sequence-classification adapter's saved head (None for causal LMs)."""
    with safe_open(str(Path(adapter) / ADAPTER_WEIGHTS), framework="pt") as f:
        heads = [k for k in f.keys() if k.endswith(("classifier.weight", "score.weight", "out_proj.weight"))]
        return f.get_slice(heads[0]).get_shape()[0] if heads else None


def run_export(settings: ExportSettings) -> str:
    """Check everything, then write the export; return a one-line report."""
    import nlora

    if not settings.adapter or not settings.out:
        raise SettingsError("nlora export needs --adapter DIR and --out DIR.")
    config = adapter_config(settings.adapter)
    if config.get("peft_type") != "NLORA":
        raise ValueError(
            f"{settings.adapter} is a {config.get('peft_type')} adapter, not an NLoRA one; PEFT and vLLM load it "
            "as it is, so there is nothing to export."
        )
    inputs = [settings.adapter, settings.model]
    folder = OutputFolder(settings.out, EXPORT_MARKER, replace_own=True, inputs=inputs)
    folder.check()
    task = "classification" if config.get("task_type") == "SEQ_CLS" else "sft"
    model, tokenizer = load_model(
        settings.model,
        task=task,
        num_labels=_classifier_labels(settings.adapter) or 2,
        trust_remote_code=settings.trust_remote_code,
        adapter=settings.adapter,
    )
    if settings.merged:
        with folder.replacing() as tmp:
            model.merge_and_unload().save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        return f"nlora: wrote the merged model to {settings.out}"
    nlora.export_lora(model, settings.out, overwrite=settings.overwrite, tokenizer=tokenizer)
    base = model.peft_config["default"].base_model_name_or_path
    return f"nlora: wrote a vanilla LoRA adapter to {settings.out}; serve it on the base model {base}"
