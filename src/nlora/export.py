"""Exports to vanilla PEFT LoRA, and import of checkpoints saved by the authors' fork."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import save_file
from torch import nn

from ._compat import LoraLayer
from .card import export_card, write_card
from .config import INIT_ALIASES, NLoraConfig
from .files import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    EXPORT_MARKER,
    FINGERPRINT_SUFFIX,
    OutputFolder,
    read_adapter,
)
from .layer import adapter_param, factor_names

_BASE_PREFIX = "base_model.model."


def lora_factors(module: LoraLayer, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Vanilla LoRA factors ``(A', B')`` with ``B' @ A' == delta_W`` against the *original* base weight.

    Without a residual this is ``A' = A``, ``B' = s B N`` (rank r). With a residual the trained model is
    ``W - s B0 N0 A0 + s B N A``, so ``A' = [A; A0]`` and ``B' = [s B N, -s B0 N0]`` (rank 2r), as PEFT does for PiSSA.
    """
    name_A, name_B = factor_names(module)
    A, N, B = (adapter_param(module, c, adapter).detach().float() for c in (name_A, "lora_N", name_B))
    B_new, A_new = module.scaling[adapter] * (B @ N), A
    initial = getattr(module, "nlora_initial", {}).get(adapter)
    if initial is not None:
        factors, scaling0 = initial
        A0, B0 = factors.A.to(A.device), -scaling0 * (factors.B.to(B.device) @ factors.N.to(B.device))
        A_new, B_new = torch.cat([A, A0], dim=0), torch.cat([B_new, B0], dim=1)
    return A_new, B_new


def export_lora(
    model: nn.Module,
    out_dir: str | os.PathLike,
    adapter_name: str = "default",
    overwrite: bool = False,
    tokenizer=None,
) -> Path:
    """Write ``adapter_name`` of an NLoRA ``PeftModel`` as a vanilla PEFT LoRA adapter (``peft_type`` "LORA").

    Stock PEFT (without nlora) loads it onto the *original* base model (the one before any residual was subtracted)
    and reproduces the outputs: N and the scaling are folded into B, a residual adapter becomes rank 2r, and the
    export never contains base weights. For vLLM every module gets one rank from vLLM's set (zero-padded, exact),
    ``lora_alpha = r`` and no rank/alpha patterns; an adapter vLLM still cannot serve (``modules_to_save``,
    embeddings, ``lm_head``) is exported for PEFT with a warning that says why. Merged adapters must be unmerged.

    On a bitsandbytes base the delta is exact against the quantised model it was trained on
    (``quantized_residual="keep"``) or the residual model that :func:`nlora.save_residual_model` wrote; with
    ``"requantize"`` the rank-2r export applies to the original quantised model and is off by the rounding of the
    requantised residual.

    ``out_dir`` may be a new or empty folder, or an earlier export, replaced once the new export is complete; a
    folder holding files an export did not write is refused (``overwrite`` is accepted for compatibility and no
    longer needed). ``tokenizer`` is saved with the export.
    """
    from peft.utils import get_peft_model_state_dict

    from .serving import vllm_problems, vllm_rank

    config = model.peft_config[adapter_name]
    if not isinstance(config, NLoraConfig):
        raise TypeError(f"Adapter '{adapter_name}' is not an NLoRA adapter; save it with save_pretrained instead.")
    folder = OutputFolder(out_dir, EXPORT_MARKER, replace_own=True)
    folder.check()
    factors = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or adapter_name not in getattr(module, "lora_N", {}):
            continue
        if adapter_name in module.merged_adapters:
            raise ValueError(f"Adapter '{adapter_name}' is merged into '{name}'; call unmerge_adapter() before export.")
        factors[name] = (module, *lora_factors(module, adapter_name))
    if not factors:
        raise ValueError(f"Model has no NLoRA layers for adapter '{adapter_name}'; nothing to export.")

    largest = max(A.shape[0] for _, A, _ in factors.values())
    r = vllm_rank(largest) or largest  # zero rows of A / columns of B change nothing
    tensors = {}
    for name, (module, A, B) in factors.items():
        pad = r - A.shape[0]
        A, B = torch.cat([A, A.new_zeros(pad, A.shape[1])]), torch.cat([B, B.new_zeros(B.shape[0], pad)], dim=1)
        name_A, name_B = factor_names(module)
        suffix = "" if name_A.startswith("lora_embedding") else ".weight"
        tensors[f"{name}.{name_A}{suffix}"] = A.contiguous()
        tensors[f"{name}.{name_B}{suffix}"] = B.contiguous()
    # modules_to_save are stored the same way by PEFT: copy them over. save_embedding_layers=False: PEFT would
    # otherwise copy the (residual) embedding base weight, which the factors already correct for.
    state = get_peft_model_state_dict(model, adapter_name=adapter_name, save_embedding_layers=False)
    for key, value in state.items():
        if ".lora_" not in key and not key.endswith(FINGERPRINT_SUFFIX):
            tensors[key] = value.detach().contiguous()

    lora_config = LoraConfig(
        r=r,
        lora_alpha=r,
        target_modules=sorted(name.removeprefix(_BASE_PREFIX) for name in factors),
        modules_to_save=config.modules_to_save,
        fan_in_fan_out=config.fan_in_fan_out,
        task_type=config.task_type,
        base_model_name_or_path=config.base_model_name_or_path,
        lora_dropout=config.lora_dropout,
        bias="none",
        init_lora_weights=True,
    )
    with folder.replacing() as tmp:
        save_file({k: v.cpu() for k, v in tensors.items()}, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        lora_config.save_pretrained(str(tmp))
        write_card(tmp, export_card(config, r))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        problems = vllm_problems(tmp)
    if problems:
        warnings.warn(
            f"The LoRA export in {out_dir} loads in PEFT but vLLM will not serve it: {'; '.join(problems)}.",
            stacklevel=2,
        )
    return Path(out_dir)


def convert_reference_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, overwrite: bool = False) -> Path:
    """Turn an adapter saved by the authors' PEFT fork into an NLoRA adapter that ``PeftModel.from_pretrained`` loads.

    Their checkpoints say ``peft_type: LORA`` with ``init_lora_weights`` "n_lora" or "s_lora" and carry ``lora_N``
    tensors; stock PEFT would silently drop N. The weights keep their names; only the config changes.
    """
    folder = OutputFolder(dst, EXPORT_MARKER, replace_own=True, inputs=[src], what="converted adapter")
    folder.check()
    raw, tensors = read_adapter(src)
    init = raw.get("init_lora_weights")
    has_n = any(".lora_N." in k or k.endswith(".lora_N") for k in tensors)
    if raw.get("peft_type") != "LORA" or (init not in INIT_ALIASES and not has_n):
        raise ValueError(
            f"{src} is not a checkpoint of the authors' NLoRA fork (peft_type={raw.get('peft_type')!r}, "
            f"init_lora_weights={init!r}, lora_N tensors: {has_n}); nothing to convert."
        )
    if not has_n:
        raise ValueError(f"{src} has init_lora_weights={init!r} but no lora_N tensors; the checkpoint is incomplete.")
    if any("lora_embedding" in k for k in tensors):
        raise ValueError(f"{src} adapts embeddings, which the authors' fork could not save correctly; not converted.")
    known = {f.name for f in NLoraConfig.__dataclass_fields__.values() if f.init}
    kwargs = {k: v for k, v in raw.items() if k in known and k not in ("peft_type", "init_lora_weights", "revision")}
    kwargs["init_lora_weights"] = INIT_ALIASES.get(init, "nlora_reference" if init is None else init)
    for key in ("use_dora", "layer_replication", "lora_bias"):
        if kwargs.get(key):
            raise ValueError(f"{src} uses {key}, which NLoRA does not support; not converted.")
        kwargs.pop(key, None)
    config = NLoraConfig(**kwargs)
    with folder.replacing() as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        config.save_pretrained(str(tmp))
    return Path(dst)


__all__ = ["ADAPTER_CONFIG", "convert_reference_checkpoint", "export_lora", "lora_factors"]
