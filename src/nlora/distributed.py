"""Distributed runs where only one rank holds the base weights (FSDP2 with rank-0 loading, large models).

The other ranks build the model on the meta device; ``get_peft_model`` then defers their Nyström init (it cannot
read W there). The weight-holding rank computes the factors and the residual as usual; the full state dict, which
carries the adapter and the residual base weights, goes to every rank with torch's
``set_model_state_dict(..., StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))``, and
:func:`broadcast_init_state` sends the per-layer records that are not parameters (the initial factors that
``unload`` and ``export_lora`` need, the approximation errors and the fingerprints).
"""

from __future__ import annotations

import torch.distributed as dist
from torch import nn

from ._compat import LoraLayer

# what init_adapter records on a layer besides parameters; everything here is plain tensors and floats
INIT_RECORDS = ("nlora_initial", "nlora_init_error", "nlora_fingerprint")


def distributed_ready() -> bool:
    """Whether a default process group exists (then a meta base weight means another rank holds the weights)."""
    return dist.is_available() and dist.is_initialized()


def broadcast_init_state(model: nn.Module, src: int = 0, group: dist.ProcessGroup | None = None) -> None:
    """Give every rank the init records of rank ``src`` (collective: call it on every rank, after
    ``get_peft_model``). Ranks whose init was deferred (meta base weights) are complete afterwards."""
    if not distributed_ready():
        raise RuntimeError("broadcast_init_state needs torch.distributed; call dist.init_process_group first.")
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    payload = [None]
    if dist.get_rank() == src:
        pending = [name for name, m in layers.items() if getattr(m, "nlora_pending", None)]
        if pending:
            raise ValueError(
                f"broadcast_init_state: rank {src} has no weights for '{pending[0]}' either; load the base model "
                "weights on that rank before get_peft_model."
            )
        payload = [{name: {a: getattr(m, a) for a in INIT_RECORDS if hasattr(m, a)} for name, m in layers.items()}]
    dist.broadcast_object_list(payload, src=src, group=group)
    if payload[0].keys() != layers.keys():
        raise ValueError(f"broadcast_init_state: rank {src} adapted other modules than this rank; same config?")
    for name, module in layers.items():
        for attr, value in payload[0][name].items():
            setattr(module, attr, value)
        module.nlora_pending = set()
