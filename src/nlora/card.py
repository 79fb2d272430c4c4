"""Model cards: the ``README.md`` that tells a reader of an adapter folder what it is and how to load it, also in a
process that never imported nlora (where PEFT's only message is ``KeyError: 'NLORA'``)."""

from __future__ import annotations

import os
from pathlib import Path

from .files import write_atomic

MARKER = "<!-- nlora model card -->"


def method_name(config) -> str:
    """SLoRA, NLoRA, IntTune or nlora_reference, as the config says."""
    if getattr(config, "train_intermediate_only", False):
        return "IntTune"
    return {"nlora": "NLoRA", "nlora_reference": "nlora_reference (the authors' init)", "slora": "SLoRA"}.get(
        config.init_lora_weights, "SLoRA"
    )


def adapter_card(config) -> str:
    """The nlora section of an NLoRA adapter's card."""
    base = config.base_model_name_or_path or "the base model it was trained on"
    residual = (
        "It is a **residual** adapter: loading it subtracts its initial delta from the base weights, so it needs "
        "nlora and this very base model (nlora refuses any other checkpoint by the weight fingerprints it saved). "
        if config.uses_residual
        else ""
    )
    return f"""{MARKER}
## nlora adapter: {method_name(config)}

A PEFT adapter of type `NLORA` (`delta_W = s * B @ N @ A` with a trainable r x r matrix N; arXiv 2502.14482).
Stock PEFT cannot read it on its own (it fails with `KeyError: 'NLORA'`): install nlora and import it first.

```python
# pip install nlora
import nlora  # registers the NLORA adapter type with PEFT
from peft import PeftModel
model = PeftModel.from_pretrained(base_model, "path/to/this/folder")
```

Base model: `{base}`. {residual}For a plain LoRA adapter that stock PEFT and vLLM load without nlora, run
`nlora export --adapter path/to/this/folder --out path/to/lora` (or `nlora.export_lora(model, out_dir)`).
"""


def export_card(config, rank: int) -> str:
    """The card of a vanilla LoRA export."""
    base = config.base_model_name_or_path or "the base model the NLoRA adapter was trained on"
    return f"""{MARKER}
## LoRA exported by nlora from an {method_name(config)} adapter

A plain PEFT LoRA adapter (`peft_type: LORA`, rank {rank}, `lora_alpha = r`): stock PEFT and vLLM load it without
nlora. It reproduces the NLoRA model on the base model `{base}` (for an adapter trained on a residual base saved by
nlora, that residual base; a residual adapter is exported at twice its rank so that it applies to the original).
"""


def write_card(folder: str | os.PathLike, text: str) -> None:
    """Add ``text`` to ``folder/README.md`` once (PEFT may have written its own card there first); atomic."""
    path = Path(folder) / "README.md"
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    if MARKER in old:
        return
    write_atomic(path, f"{old.rstrip()}\n\n{text}" if old.strip() else text)
