"""The one model loader of the command line: train, eval and export load base models, adapters and tokenizers here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..files import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from ..model import keep_trainable_on_cpu

TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")


def adapter_config(adapter: str | Path) -> dict[str, Any]:
    """The ``adapter_config.json`` of an adapter folder; a folder that is not an adapter gets one sentence."""
    path = Path(adapter)
    if not (path / ADAPTER_CONFIG).is_file() or not (path / ADAPTER_WEIGHTS).is_file():
        raise ValueError(f"{path} is not an adapter directory (it needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}).")
    try:
        return json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path / ADAPTER_CONFIG} is not valid JSON; the adapter directory is damaged.") from err


def base_model_name(model: str | None, adapter: str | None) -> str:
    """``model``, else the base model the adapter names."""
    if model is None and adapter:
        model = adapter_config(adapter).get("base_model_name_or_path")
    if not model:
        raise ValueError("No base model: pass --model (the adapter's config does not name its base model).")
    return model


def load_tokenizer(path: str, adapter: str | None = None, trust_remote_code: bool = False):
    """The adapter's tokenizer when it was saved next to it, else the base model's; pad token set."""
    from transformers import AutoTokenizer

    source = adapter if adapter and any((Path(adapter) / f).exists() for f in TOKENIZER_FILES) else path
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _quantized(kind: str) -> dict:
    """from_pretrained arguments of a bitsandbytes quantisation ("none": none)."""
    if kind == "none":
        return {}
    import torch
    from transformers import BitsAndBytesConfig

    if kind == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_compute_dtype=torch.float32)
    return {"quantization_config": config, "device_map": "cpu" if not torch.cuda.is_available() else {"": 0}}


def _ids(names: list[str]) -> list[tuple[str, int]]:
    return [(name, i) for i, name in enumerate(names)]


def load_model(
    model: str | None,
    task: str = "sft",
    num_labels: int = 2,
    trust_remote_code: bool = False,
    adapter: str | None = None,
    label_names: list[str] | None = None,
    trainable: bool = False,
    quantization: str = "none",
):
    """Base model (offline alias, folder or hub name) in fp32, plus ``adapter`` if given, and its tokenizer.

    ``task`` is "sft" (a causal LM) or "classification" (a sequence classifier with ``num_labels`` outputs, named by
    ``label_names`` when the data's labels are strings). ``quantization`` ("nf4", "fp4", "int8") loads the base
    through bitsandbytes.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    import nlora  # noqa: F401  (registers NLORA so that PeftModel loads NLoRA adapters)

    from .assets import resolve_model

    if adapter:
        adapter_config(adapter)  # a folder that is not an adapter: one sentence, before any model is loaded
    name = base_model_name(model, adapter)
    path = resolve_model(name)
    try:
        tokenizer = load_tokenizer(path, adapter, trust_remote_code)
        loading = {"dtype": torch.float32, "trust_remote_code": trust_remote_code, **_quantized(quantization)}
        if task == "sft":
            base = AutoModelForCausalLM.from_pretrained(path, **loading)
        else:
            names = {}
            if label_names:
                names = {
                    "id2label": dict(enumerate(label_names)),
                    "label2id": {n: i for i, n in enumerate(label_names)},
                }
            base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, **loading, **names)
            base.config.pad_token_id = tokenizer.pad_token_id
    except OSError as err:
        first = str(err).strip().splitlines()[0]
        raise ValueError(
            f"Model '{name}' could not be loaded ({first}); give a local folder or an offline name."
        ) from err
    if quantization != "none":
        keep_trainable_on_cpu(base)
    if adapter:
        from peft import PeftModel

        base = PeftModel.from_pretrained(base, adapter, is_trainable=trainable)
    return (base if trainable else base.eval()), tokenizer
