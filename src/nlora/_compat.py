"""The one place that touches PEFT internals. Checked against the PEFT version at import.

We rely on these private hooks of ``peft.tuners.lora``: ``LoraVariant`` (the variant protocol),
``LoraLayer.lora_variant`` / ``adapter_layer_names`` / ``frozen_peft_weight_names`` (per-adapter bookkeeping),
``LoraModel._create_and_replace`` and the state-dict hooks of ``BaseTuner``. They exist from PEFT 0.21.2 on.
"""

from __future__ import annotations

import logging

import peft
from packaging.version import Version

PEFT_MIN, PEFT_MAX = Version("0.21.2"), Version("0.22")

if not PEFT_MIN <= Version(peft.__version__) < PEFT_MAX:
    raise ImportError(
        f"nlora needs peft>={PEFT_MIN},<{PEFT_MAX} (it uses PEFT's LoRA-variant hooks), but peft {peft.__version__} "
        f"is installed; run: pip install 'peft>={PEFT_MIN},<{PEFT_MAX}'."
    )

from peft import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING  # noqa: E402
from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING  # noqa: E402
from peft.tuners.lora import LoraLayer, LoraModel  # noqa: E402
from peft.tuners.lora.layer import VARIANT_KWARG_KEYS, LoraVariant  # noqa: E402
from peft.tuners.lora.layer import Embedding as LoraEmbedding  # noqa: E402
from peft.tuners.lora.layer import Linear as LoraLinear  # noqa: E402
from peft.tuners.tuners_utils import (  # noqa: E402
    BaseTunerLayer,
    _ExcludedModule,
    _maybe_include_all_linear_layers,
    check_target_module_exists,
)
from peft.utils.integrations import gather_params_ctx, get_bnb_param_type, init_empty_weights  # noqa: E402
from peft.utils.other import transpose  # noqa: E402

__all__ = [
    "check_transformers_adapter_loads",
    "original_base_state_dicts",
    "PEFT_TYPE_TO_CONFIG_MAPPING",
    "PEFT_TYPE_TO_PREFIX_MAPPING",
    "PEFT_TYPE_TO_TUNER_MAPPING",
    "BaseTunerLayer",
    "ExcludedModule",
    "include_all_linear_layers",
    "LoraEmbedding",
    "LoraLayer",
    "LoraLinear",
    "LoraModel",
    "LoraVariant",
    "VARIANT_KWARG_KEYS",
    "check_target_module_exists",
    "get_bnb_param_type",
    "freeze_peft_weight",
    "gather_params_ctx",
    "empty_weights_active",
    "init_empty_weights",
    "move_adapter_to_base_device",
    "register_peft_type",
    "transpose",
]


ExcludedModule = _ExcludedModule
include_all_linear_layers = _maybe_include_all_linear_layers


def freeze_peft_weight(module: LoraLayer, adapter_name: str, weight_name: str) -> None:
    """Declare ``module.<weight_name>[adapter_name]`` frozen; PEFT re-applies it on every ``set_adapter``."""
    frozen = dict(module.frozen_peft_weight_names)  # copy: the class attribute is shared by all layers
    names = frozen.get(adapter_name, ())
    if weight_name not in names:
        frozen[adapter_name] = names + (weight_name,)
    module.frozen_peft_weight_names = frozen


def register_peft_type(peft_type, config_cls, model_cls, prefix: str) -> None:
    """Register a PEFT method whose type is not in PEFT's closed ``PeftType`` enum."""
    PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
    PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = model_cls
    PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = prefix


def _rederived_factors_only(record: logging.LogRecord) -> bool:
    """Drop transformers' load report when all it lists is an N-only checkpoint's re-derived A and B as MISSING."""
    message = record.getMessage()
    if "LOAD REPORT" not in message or "UNEXPECTED" in message or "MISMATCH" in message:
        return True
    missing = [line for line in message.splitlines() if "| MISSING" in line]
    return not missing or not all(any(f"{n}." in line for n in _FROZEN_FACTORS) for line in missing)


_FROZEN_FACTORS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")


def check_transformers_adapter_loads() -> None:
    """Make transformers' ``model.load_adapter(dir)`` read an NLoRA adapter's config through ``NLoraConfig``.

    transformers builds the config with ``PeftConfig.from_pretrained`` (no checkpoint read) and loads the tensors
    with its own loader, so neither the shape and base-weight checks nor the residual's fingerprints would run;
    with the config read by ``NLoraConfig.from_pretrained`` they run at injection, before any weight is written.
    Other adapters go to transformers unchanged.
    """
    import functools
    import json
    from pathlib import Path

    from transformers.integrations.peft import PeftAdapterMixin

    original = PeftAdapterMixin.load_adapter
    if getattr(original, "_nlora_checked", False):
        return

    @functools.wraps(original)
    def load_adapter(self, peft_model_id=None, adapter_name=None, peft_config=None, *args, **kwargs):
        config_file = Path(str(peft_model_id)) / "adapter_config.json" if peft_model_id is not None else None
        if peft_config is None and config_file is not None and config_file.is_file():
            if json.loads(config_file.read_text(encoding="utf-8")).get("peft_type") == "NLORA":
                from .config import NLoraConfig
                from .files import FINGERPRINT_SUFFIX, read_adapter

                peft_config = NLoraConfig.from_pretrained(peft_model_id)
                if kwargs.get("adapter_state_dict") is None:  # the fingerprints were read with the config: do not
                    _, tensors = read_adapter(peft_model_id)  # let transformers report them as unexpected keys
                    kwargs["adapter_state_dict"] = {
                        k: v for k, v in tensors.items() if not k.endswith(FINGERPRINT_SUFFIX)
                    }
                if not peft_config.save_frozen_factors:  # N-only: A and B were re-derived and verified at injection
                    report = logging.getLogger("transformers.integrations.peft")
                    report.addFilter(_rederived_factors_only)
                    try:
                        return original(self, peft_model_id, adapter_name, peft_config, *args, **kwargs)
                    finally:
                        report.removeFilter(_rederived_factors_only)
        return original(self, peft_model_id, adapter_name, peft_config, *args, **kwargs)

    load_adapter._nlora_checked = True
    PeftAdapterMixin.load_adapter = load_adapter


def original_base_state_dicts() -> None:
    """Make PEFT's ``get_base_model_state_dict`` return the model the user started from, and
    ``set_base_model_state_dict`` take one: a residual layer's base holds ``W - s B0 N0 A0``, which is nlora's
    business (as ``disable_adapter()`` already gives the original model), not the user's."""
    import functools

    import peft
    import peft.utils
    from peft.utils import save_and_load

    original_get, original_set = save_and_load.get_base_model_state_dict, save_and_load.set_base_model_state_dict
    if getattr(original_get, "_nlora_original_base", False):
        return

    def residual_layers(model):
        from .layer import residual_holder

        for path, module in model.base_model.model.named_modules():
            if isinstance(module, LoraLayer) and residual_holder(module) is not None:
                key = save_and_load._peft_key_to_original_key(model, f"{path}.base_layer.weight")
                yield key, module

    @functools.wraps(original_get)
    def get_base_model_state_dict(model):
        from .layer import original_base_weight

        state = original_get(model)
        if not model._is_prompt_learning:
            for key, module in residual_layers(model):
                weight = original_base_weight(module)
                if key in state and weight is not None:
                    state[key] = weight
        return state

    @functools.wraps(original_set)
    def set_base_model_state_dict(model, state_dict, strict=True, *args, **kwargs):
        from .layer import quantized, residual_base_weight

        state = dict(state_dict)
        if not model._is_prompt_learning:
            for key, module in residual_layers(model):
                if key in state and not quantized(module.get_base_layer()):
                    state[key] = residual_base_weight(module, state[key])
        return original_set(model, state, strict, *args, **kwargs)

    get_base_model_state_dict._nlora_original_base = True
    for namespace in (save_and_load, peft.utils, peft):
        namespace.get_base_model_state_dict = get_base_model_state_dict
        namespace.set_base_model_state_dict = set_base_model_state_dict


def move_adapter_to_base_device(module: LoraLayer, adapter: str) -> None:
    """Move one adapter's parameters to the device and (floating) dtype of the layer's base weight, as PEFT's
    ``update_layer`` does for adapters it creates on a real device."""
    module._move_adapter_to_device_of_base_layer(adapter)


def empty_weights_active() -> bool:
    """Whether new parameters are being created on the meta device (inside ``init_empty_weights``, which
    ``PeftModel(..., low_cpu_mem_usage=True)`` enters without telling the tuner)."""
    import torch

    probe = torch.nn.Module()
    probe.register_parameter("p", torch.nn.Parameter(torch.empty(0)))  # no random draw, unlike a layer
    return probe.p.device.type == "meta"
