"""The QNLoRA workflow for quantised training: decompose in full precision, save the residual base model, quantise it.

As PEFT recommends for PiSSA: the residual ``W - s*B*N*A`` is computed from the full-precision W (not from an
already quantised copy), saved as an ordinary transformers model next to the initial adapter, and the residual model
is then loaded in 4-bit or 8-bit for training. The base then holds ``quantise(W - s*B*N*A)``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from torch import nn

from ._compat import LoraModel
from .config import NLoraConfig
from .files import EXPORT_MARKER, OutputFolder
from .layer import base_fingerprint, quantized

ADAPTER_SUBDIR = "initial_adapter"


def save_residual_model(
    model: nn.Module, config: NLoraConfig, out_dir: str | os.PathLike, tokenizer=None, overwrite: bool = False
) -> Path:
    """Write ``out_dir`` (the residual base model, safetensors) and ``out_dir/initial_adapter`` (the initial factors).

    ``model`` must be the full-precision base model; it is consumed (it holds the residual weights afterwards).
    Then load ``out_dir`` with a ``BitsAndBytesConfig`` and ``PeftModel.from_pretrained(q, out_dir/"initial_adapter",
    is_trainable=True)``: the step-0 model is ``quantise(W - sBNA) + sBNA``. The initial adapter's config says
    ``residual=False`` (its base already holds the residual), so loading it never rewrites the quantised weights;
    it names ``out_dir`` (absolute) as its base model and records the residual weights' fingerprints, so a load on
    any other base (the original model included) is refused.
    """
    from peft import get_peft_model

    if not config.uses_residual:
        raise ValueError("save_residual_model needs a residual NLoRA config (init 'nlora', residual=True).")
    bad = next((n for n, m in model.named_modules() if quantized(m)), None)
    if bad is not None:
        raise ValueError(f"save_residual_model needs the full-precision model, but '{bad}' is already quantised.")
    folder = OutputFolder(out_dir, EXPORT_MARKER, replace_own=True, what="residual model")
    folder.check()
    peft_model = get_peft_model(model, config)
    untied = any(getattr(m, "nlora_untied", None) for m in peft_model.modules())
    for layer in peft_model.modules():  # the adapter names the residual base by its weights, and refuses any other
        if "default" in getattr(layer, "nlora_initial", {}):
            layer.nlora_fingerprint["default"] = base_fingerprint(layer.get_base_layer())
    reload_config = dataclasses.replace(
        config, residual=False, save_frozen_factors=True, base_model_name_or_path=str(Path(out_dir).resolve())
    )
    with folder.replacing() as tmp:
        peft_model.peft_config["default"] = reload_config
        peft_model.save_pretrained(tmp / ADAPTER_SUBDIR)
        base = LoraModel.unload(peft_model.base_model)  # PEFT's unload keeps the residual weights (ours adds W back)
        if untied:  # an adapted tied embedding got its own (residual) copy: keep the two apart on reload
            base.config.tie_word_embeddings = False
        base.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out_dir)
