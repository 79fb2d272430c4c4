"""What the initialisation did, per layer: relative approximation error and whether W was changed."""

from __future__ import annotations

from torch import nn

from . import nystrom
from ._compat import LoraLayer
from .layer import adapter_param, factor_names, weight_matrix


def init_report(model: nn.Module, adapter_name: str = "default", compute_missing: bool = False) -> dict[str, dict]:
    """Per adapted layer: ``{"rank", "residual", "approx_error"}``.

    ``approx_error`` is ``||W - s B0 N0 A0||_F / ||W||_F`` of the initial factors. It is recorded for free when the
    init subtracts a residual; with ``compute_missing=True`` it is computed for the other layers from the current
    factors (one matrix product per layer).
    """
    report = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or adapter_name not in getattr(module, "lora_N", {}):
            continue
        error = getattr(module, "nlora_init_error", {}).get(adapter_name)
        residual = adapter_name in getattr(module, "nlora_initial", {})
        if error is None and compute_missing:
            name_A, name_B = factor_names(module)
            A, N, B = (adapter_param(module, c, adapter_name) for c in (name_A, "lora_N", name_B))
            factors = nystrom.Factors(A=A, N=N, B=B)
            w = weight_matrix(module.get_base_layer())
            error = nystrom.relative_error(w, factors, module.scaling[adapter_name])
        report[name] = {"rank": module.r[adapter_name], "residual": residual, "approx_error": error}
    return report
