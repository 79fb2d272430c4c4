"""What vLLM's LoRA loader accepts, checked on an exported adapter directory.

Mirrors vLLM's documented rules for PEFT LoRA adapters (``vllm.lora.peft_helper.PEFTHelper`` and the
``--max-lora-rank`` choices): one rank for every module from the allowed set, no ``modules_to_save``, no DoRA, no
bias, and no ``rank_pattern`` / ``alpha_pattern`` (vLLM reads one ``r`` and one ``lora_alpha``, so per-module
ranks or scalings would be applied wrongly). Embedding and ``lm_head`` adapters are refused too: vLLM dropped
LoRA on embeddings and the output layer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import safe_open

from .files import ADAPTER_CONFIG, ADAPTER_WEIGHTS

VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
_OUTPUT_LAYER_NAMES = ("lm_head", "embed_out", "output_layer")


def vllm_rank(rank: int) -> int | None:
    """The smallest rank vLLM serves that holds ``rank`` (zero-padded), or None when ``rank`` is too large."""
    return next((r for r in VLLM_LORA_RANKS if r >= rank), None)


def vllm_problems(adapter_dir: str | os.PathLike, max_lora_rank: int | None = None) -> list[str]:
    """Every reason vLLM would refuse the LoRA adapter in ``adapter_dir`` (empty when it would load it).

    ``max_lora_rank`` is the server's ``--max-lora-rank``; None checks against the largest one vLLM allows.
    """
    path = Path(adapter_dir)
    config = json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    problems = []
    if config.get("peft_type") != "LORA":
        problems.append(f"peft_type is {config.get('peft_type')!r}, vLLM loads only 'LORA' adapters")
    r = config.get("r")
    limit = max_lora_rank or VLLM_LORA_RANKS[-1]
    if r not in VLLM_LORA_RANKS:
        problems.append(f"r={r} is not one of vLLM's ranks {VLLM_LORA_RANKS}")
    if isinstance(r, int) and r > limit:
        problems.append(f"r={r} is greater than max_lora_rank={limit}")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            problems.append(f"{key} is set, vLLM applies one r and one lora_alpha to every module")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save={config['modules_to_save']}: vLLM only supports modules_to_save being None")
    if config.get("use_dora"):
        problems.append("vLLM does not support DoRA")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        problems.append("vLLM serves adapters without bias only (bias='none', lora_bias=False)")
    with safe_open(str(path / ADAPTER_WEIGHTS), framework="pt") as f:
        for key in f.keys():
            adapted_output = ".lora_" in key and any(f".{n}." in key for n in _OUTPUT_LAYER_NAMES)
            if "lora_embedding_" in key or adapted_output:
                problems.append(f"'{key}' adapts an embedding or output layer, which vLLM does not serve")
                break
            if ".lora_A." in key and f.get_slice(key).get_shape()[0] != r:
                problems.append(f"'{key}' has rank {f.get_slice(key).get_shape()[0]}, not the config's r={r}")
                break
    return problems
