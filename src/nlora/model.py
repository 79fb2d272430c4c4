"""``NLoraModel``: PEFT's ``LoraModel`` with N attached to every layer, target checks and safe loading."""

from __future__ import annotations

import contextlib
import copy
import dataclasses

import torch
from torch import nn

from . import nystrom
from ._compat import (
    BaseTunerLayer,
    ExcludedModule,
    LoraLayer,
    LoraModel,
    empty_weights_active,
    gather_params_ctx,
    include_all_linear_layers,
    init_empty_weights,
)
from .config import NYSTROM_INITS, NLoraConfig
from .distributed import distributed_ready
from .files import FINGERPRINT_SUFFIX
from .layer import (
    base_fingerprint,
    dense_weight,
    factor_names,
    init_adapter,
    quantized,
    residual_holder,
    restore_base,
    weight_shape,
)

_BASE_PREFIX = "base_model.model."
_QUANTIZED_MODULE_HINTS = ("hqq", "auto_gptq", "gptqmodel", "awq", "torchao", "eetq", "aqlm", "optimum", "bitsandbytes")


def _supported_base_types() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, Conv1D, nn.Embedding)


def check_target(key: str, base_layer: nn.Module, config: NLoraConfig, r: int, shares_residual: bool = False) -> None:
    """Raise a one-sentence error if NLoRA cannot adapt ``base_layer`` (at ``key``) with rank ``r``.

    ``shares_residual``: the layer already holds the residual this adapter will share, so its factors come from
    that adapter's (checked) init, not from the residual weight now in the layer."""
    kind = type(base_layer).__name__
    weight = getattr(base_layer, "weight", None)
    other_quantizer = not quantized(base_layer) and (
        any(h in type(base_layer).__module__ for h in _QUANTIZED_MODULE_HINTS)
        or (weight is not None and not isinstance(weight, torch.Tensor))  # torch.ao's packed weight() method
        or (isinstance(weight, torch.Tensor) and not weight.dtype.is_floating_point)
    )
    if other_quantizer:
        raise ValueError(
            f"NLoRA cannot adapt module '{key}': its {kind} weight ({getattr(weight, 'dtype', 'packed')}, from "
            f"{type(base_layer).__module__}) is quantised or integer in a format nlora cannot read; quantise with "
            "bitsandbytes (4-bit or 8-bit) instead, or load the base model in fp32/bf16."
        )
    if not isinstance(base_layer, _supported_base_types()):
        raise ValueError(
            f"NLoRA cannot adapt module '{key}' of type {kind}; it supports nn.Linear, transformers Conv1D and "
            "nn.Embedding, so remove it from target_modules or add it to exclude_modules."
        )
    if config.init_lora_weights in NYSTROM_INITS and weight.device.type == "meta" and not distributed_ready():
        raise ValueError(
            f"NLoRA cannot compute a Nyström init for module '{key}': its base weight is on the meta device; load "
            "the base weights first, or, when only rank 0 holds them, initialise torch.distributed before "
            "get_peft_model and call nlora.broadcast_init_state(model) after loading rank 0's state dict."
        )
    out_features, in_features = weight_shape(base_layer)
    if not 0 < r <= min(out_features, in_features):
        raise ValueError(
            f"NLoRA rank r={r} is invalid for module '{key}' ({out_features}x{in_features}); use "
            f"1 <= r <= {min(out_features, in_features)} (set rank_pattern for this module or lower r)."
        )
    if config.train_intermediate_only and weight.device.type != "meta" and not shares_residual:
        with gather_params_ctx(weight, modifier_rank=None):  # ZeRO-3: read the full weight
            w = dense_weight(base_layer)
            if config.init_lora_weights == "nlora_reference":
                zero = not w[:, :r].any() or not w[:r, :].any()
            else:
                zero = not w.any()
        if zero:
            raise ValueError(
                f"IntTune cannot train module '{key}': its initial A or B factor is all zeros, so N would never get "
                "a gradient; add it to exclude_modules or use init_lora_weights='nlora'."
            )


def check_checkpoint_index(index: dict[str, tuple], targets: dict[str, tuple[nn.Module, int]], config) -> None:
    """Refuse a checkpoint (``{key: (shape, finite)}``) that does not fit the targeted modules, before injection."""
    expected = {}
    for key, (base, r) in targets.items():
        out_f, in_f = weight_shape(base)
        names = ("lora_embedding_A", "lora_embedding_B") if isinstance(base, nn.Embedding) else ("lora_A", "lora_B")
        suffix = "" if isinstance(base, nn.Embedding) else ".weight"
        expected[f"{key}.{names[0]}{suffix}"] = (r, in_f)
        expected[f"{key}.{names[1]}{suffix}"] = (out_f, r)
        expected[f"{key}.lora_N.weight"] = (r, r)
    found = {k.removeprefix("base_model.model."): v for k, v in index.items() if ".lora_" in k}
    for key, (shape, finite) in sorted(found.items()):
        if key not in expected:
            raise ValueError(
                f"The NLoRA checkpoint does not match the model: it has '{key}', which the model lacks; load it on "
                "the base model and target_modules it was trained with."
            )
        if shape != expected[key]:
            raise ValueError(
                f"The NLoRA checkpoint does not match the model: '{key}' has shape {shape} but the model expects "
                f"{expected[key]}; check r, rank_pattern and the base model."
            )
        if not finite:
            raise ValueError(f"The NLoRA checkpoint is corrupt: '{key}' contains NaN or inf values.")
    optional = set()
    if not config.save_frozen_factors:
        optional = {k for k in expected if not k.endswith(".lora_N.weight")}
    missing = sorted(k for k in expected if k not in found and k not in optional)
    if missing:
        raise ValueError(
            f"The NLoRA checkpoint is incomplete: {len(missing)} adapter tensors are missing (e.g. '{missing[0]}'); "
            "it was saved from a different model or the file is damaged."
        )


def keep_trainable_on_cpu(model: nn.Module) -> nn.Module:
    """Stop bitsandbytes' CPU 4-bit layers from repacking their weights for inference.

    bitsandbytes 0.50 repacks a CPU ``Linear4bit`` weight at its first forward in eval mode (Trainer's evaluation
    before training does that); backward through a repacked layer then gives no input gradient, so every adapter
    below it silently stops learning (seen here: 6 of 18 adapter tensors moved). Inference is slower without it.
    """
    for module in model.modules():
        if type(module).__name__ in ("Linear4bit", "LinearNF4", "LinearFP4") and hasattr(
            module, "support_avx512bf16_for_cpu"
        ):
            module.support_avx512bf16_for_cpu = False
    return model


def targeted_modules(model: nn.Module, config) -> dict[str, tuple[nn.Module, int]]:
    """``{key: (base layer, rank)}`` of every module a (N)LoRA config with explicit ``target_modules`` (a list, a
    regex or "all-linear") would adapt, found the way PEFT finds them, without touching the model."""
    from peft.utils.other import get_pattern_key

    from ._compat import check_target_module_exists

    config = include_all_linear_layers(copy.copy(config), model)  # resolves target_modules="all-linear"
    targets = {}
    for key, module in model.named_modules():
        parts = key.split(".")
        if not key or "base_layer" in parts or any(p.startswith(("lora_", "modules_to_save")) for p in parts):
            continue
        matched = check_target_module_exists(config, key)
        if not matched or isinstance(matched, ExcludedModule):
            continue
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        targets[key] = (base, config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), key), config.r))
    return targets


def shared_weights(model: nn.Module) -> set[int]:
    """ids of the parameters that more than one module holds (tied input and output embeddings)."""
    seen, shared = set(), set()
    for _, param in model.named_parameters(remove_duplicate=False):
        (shared if id(param) in seen else seen).add(id(param))
    return shared


class NLoraModel(LoraModel):
    """The tuner behind ``get_peft_model(model, NLoraConfig(...))``; see :class:`nlora.NLoraConfig`."""

    prefix: str = "lora_"

    # --- injection ---------------------------------------------------------------------------------------
    def inject_adapter(self, model: nn.Module, adapter_name: str, **kwargs) -> None:
        config = self.peft_config[adapter_name]
        if not isinstance(config, NLoraConfig):
            raise TypeError(f"NLoraModel needs an NLoraConfig, got {type(config).__name__}; use peft.LoraConfig apart.")
        if config.uses_residual and config.quantized_residual == "keep" and self._any_quantized_target(model, config):
            # 'keep' leaves the 4/8-bit weights as they are and starts N at zero: that is a non-residual adapter, and
            # its saved config must say so, or a load on a full-precision copy of the base would subtract B0 N0 A0
            index = config.__dict__.get("_checkpoint_index")
            config = self.peft_config[adapter_name] = dataclasses.replace(config, intermediate_init="zero")
            if index is not None:
                config._checkpoint_index = index
        self._check_residual_neighbours(model, adapter_name, config)
        verified = {}
        if kwargs.get("state_dict") is None:
            # before any module is replaced, so that errors leave the model as it was
            targets = self._check_all_targets(model, config)
            index = config.__dict__.pop("_checkpoint_index", None)
            if index is not None:
                check_checkpoint_index(index, targets, config)
            recorded = config.__dict__.pop("_checkpoint_fingerprints", None) or {}
            verified = check_base_fingerprints(model, targets, recorded)
        self._shared_weights = shared_weights(model)
        keep_trainable_on_cpu(model)
        super().inject_adapter(model, adapter_name, **kwargs)
        for key, live in verified.items():  # a later save of this adapter records the base it was verified on
            layer = model.get_submodule(key)
            layer.nlora_fingerprint.setdefault(adapter_name, live)

    def _any_quantized_target(self, model: nn.Module, config: NLoraConfig) -> bool:
        config = self._prepare_adapter_config(copy.copy(config), self.get_model_config(model))
        return any(quantized(base) for base, _ in targeted_modules(model, config).values())

    def _check_all_targets(self, model: nn.Module, config: NLoraConfig) -> dict[str, tuple[nn.Module, int]]:
        """Check every module the config targets; return ``{key: (base layer, rank)}``."""
        config = self._prepare_adapter_config(copy.copy(config), self.get_model_config(model))
        targets = targeted_modules(model, config)
        for key, (base, r) in targets.items():
            layer = model.get_submodule(key)
            shares = config.uses_residual and isinstance(layer, LoraLayer) and residual_holder(layer) is not None
            check_target(key, base, config, r, shares_residual=shares)
        return targets

    def _create_and_replace(self, lora_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        # PEFT builds lora_A / lora_B; it does not know our init names, so it gets a neutral copy.
        peft_view = copy.copy(lora_config)
        peft_view.init_lora_weights = False
        # init_adapter overwrites every factor: PEFT's Kaiming draw of A and B (as long as the slicing init itself)
        # is skipped by creating them empty. Under low_cpu_mem_usage (already empty: the loader fills them) and on a
        # base on meta (another rank's weights) the adapter stays as PEFT made it.
        base_weight = getattr(target.get_base_layer() if isinstance(target, LoraLayer) else target, "weight", None)
        empty = base_weight is not None and base_weight.device.type != "meta" and not empty_weights_active()
        with init_empty_weights() if empty else contextlib.nullcontext():
            super()._create_and_replace(peft_view, adapter_name, target, target_name, parent, current_key, **kwargs)
        module = target if isinstance(target, LoraLayer) else getattr(parent, target_name)
        base = module.get_base_layer()
        untie = id(getattr(base, "weight", None)) in getattr(self, "_shared_weights", set())
        init_adapter(module, adapter_name, lora_config, current_key, untie=untie, created_empty=empty)

    def _check_residual_neighbours(self, model: nn.Module, adapter_name: str, config: NLoraConfig) -> None:
        """Refuse, before injection, an adapter that would sit next to a residual one (or a residual one next to any
        adapter) unless both have the very same init settings: then they share the one residual. The adapters
        present are read off the layers, so transformers' ``add_adapter`` (a new tuner per adapter) is checked too.
        """
        layers = [layer for layer in model.modules() if isinstance(layer, LoraLayer)]
        present = {name for layer in layers for c in ("lora_A", "lora_embedding_A") for name in getattr(layer, c, {})}
        present.discard(adapter_name)
        known = {**getattr(model, "peft_config", {}), **self.peft_config}
        others = {name: known.get(name) for name in sorted(present)}
        residual = config.uses_residual or any(getattr(c, "uses_residual", True) for c in others.values())
        clash = next((name for name, c in others.items() if not config.shares_residual_with(c)), None)
        if residual and clash is not None:
            raise ValueError(
                "A residual NLoRA adapter (init 'nlora' with residual=True) changes the base weight, so another "
                f"adapter may join it only with the very same init settings (adapter '{clash}' differs); pass the "
                "same NLoraConfig, or use residual=False or intermediate_init='zero'."
            )

    # --- removal restores the base weights ----------------------------------------------------------------
    def _tuner_layers(self):
        return [m for m in self.model.modules() if isinstance(m, LoraLayer)]

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        for layer in self._tuner_layers():
            restore_base(layer, adapter_name)

    def unload(self) -> nn.Module:
        """Remove all adapters and give back the base model with its original weights (residuals added back)."""
        for layer in self._tuner_layers():
            if layer.merged:
                layer.unmerge()
            for adapter in {*getattr(layer, "nlora_initial", {}), *getattr(layer, "nlora_untied", {})}:
                restore_base(layer, adapter)
        return super().unload()

    def merge_and_unload(self, *args, **kwargs) -> nn.Module:
        """PEFT's merge; a tied layer that got its own weight copy stays untied, and the config says so."""
        untied = any(getattr(layer, "nlora_untied", None) for layer in self._tuner_layers())
        model = super().merge_and_unload(*args, **kwargs)
        if untied:  # else save_pretrained / from_pretrained would tie the merged weights back together
            config = getattr(model, "config", None)
            for cfg in {id(c): c for c in (config, getattr(config, "get_text_config", lambda: None)())}.values():
                if cfg is not None and getattr(cfg, "tie_word_embeddings", False):
                    cfg.tie_word_embeddings = False
        return model

    def add_weighted_adapter(self, *args, **kwargs):
        raise NotImplementedError(
            "NLoRA adapters cannot be combined with add_weighted_adapter; export them with nlora.export_lora and "
            "combine the vanilla LoRA adapters instead."
        )

    @classmethod
    def _convert_state_dict_for_initial_model(cls, *args, **kwargs):
        raise NotImplementedError(
            "path_initial_model_for_weight_conversion does not know lora_N; use nlora.export_lora(model, out_dir)."
        )

    # --- save / load ---------------------------------------------------------------------------------------
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        to_return = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        empty = next((k for k, v in to_return.items() if v.numel() == 0), None)
        if empty is not None:  # DeepSpeed ZeRO-3 partitions: the local shard of a parameter is a (0,) tensor
            raise ValueError(
                f"Cannot save adapter '{adapter_name}': '{empty}' is an empty shard of a DeepSpeed ZeRO-3 partitioned "
                "parameter; pass the consolidated state dict, e.g. save_pretrained(dir, "
                "state_dict=engine._zero3_consolidated_16bit_state_dict()) or accelerator.get_state_dict(model)."
            )
        if not getattr(config, "save_frozen_factors", True):  # IntTune N-only: A and B are re-derived at load
            frozen = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")
            to_return = {k: v for k, v in to_return.items() if not any(f".{n}." in k for n in frozen)}
        if isinstance(config, NLoraConfig):  # residual, N-only, or made for a residual base
            for name, module in model.named_modules():
                recorded = getattr(module, "nlora_fingerprint", {}).get(adapter_name)
                if recorded is not None:
                    to_return[f"{name}.{FINGERPRINT_SUFFIX}"] = torch.tensor(recorded, dtype=torch.float64)
        return to_return

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        # the checkpoint's own fingerprints (not the live config's: load_adapter into an existing slot keeps that)
        recorded = {
            k.removesuffix(f".{FINGERPRINT_SUFFIX}").removeprefix(_BASE_PREFIX): v.tolist()
            for k, v in state_dict.items()
            if k.endswith(f".{FINGERPRINT_SUFFIX}")
        }
        state_dict = {k: v for k, v in state_dict.items() if not k.endswith(f".{FINGERPRINT_SUFFIX}")}
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        try:
            _check_fingerprints(model, adapter_name, recorded, factors_needed=not config.save_frozen_factors)
            remapped = _validate_and_complete(model, adapter_name, remapped, bool(recorded))
        except ValueError:
            _rollback(model, adapter_name)
            raise
        return remapped


def check_base_fingerprints(
    model: nn.Module, targets: dict[str, tuple[nn.Module, int]], recorded: dict
) -> dict[str, list[float]]:
    """Refuse a base model other than the one an adapter's fingerprints name, before anything is written; return
    the base fingerprints ``{key: [norm, sum, eps]}`` of the modules that were checked.

    A layer whose weight is already residual (another adapter's) is identified by that adapter's record of the
    weight it started from, not by its current (residual) weight."""
    live = {}
    for key, (base, _) in targets.items():
        saved = recorded.get(key)
        if saved is None:
            continue
        layer = model.get_submodule(key)
        holder = residual_holder(layer) if isinstance(layer, LoraLayer) else None
        live[key] = layer.nlora_fingerprint[holder][:3] if holder is not None else base_fingerprint(base)
        if not nystrom.same_base(saved, live[key]):
            raise ValueError(_OTHER_BASE.format(key=key))
    return live


_OTHER_BASE = (
    "The NLoRA adapter was trained on another base model: the weight of '{key}' does not match the fingerprint "
    "recorded in the checkpoint; load it on the base model it names (base_model_name_or_path in its "
    "adapter_config.json; for a residual base, the folder save_residual_model or `nlora train` wrote)."
)


def _check_fingerprints(model: nn.Module, adapter_name: str, recorded: dict, factors_needed: bool) -> None:
    """Refuse a base model other than the one the checkpoint was trained from, and an N-only checkpoint whose
    frozen factors this base does not reproduce."""
    for name, module in model.named_modules():
        live = getattr(module, "nlora_fingerprint", {}).get(adapter_name)
        saved = recorded.get(name.removeprefix(_BASE_PREFIX))
        if live is None or saved is None:
            continue
        key = name.removeprefix(_BASE_PREFIX)
        if not nystrom.same_base(saved, live):
            raise ValueError(_OTHER_BASE.format(key=key))
        if factors_needed and not nystrom.same_factors(saved, live):
            raise ValueError(
                f"The N-only checkpoint's frozen factors for '{key}' do not come out the same from this copy of the "
                "base weight (a lower-precision dtype rotates them); load the base in the dtype it was trained in, "
                "or save with save_frozen_factors=True."
            )


def _adapter_params(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """Every adapter parameter of ``adapter_name`` in ``model``, by its state-dict key."""
    params = {}
    for module_name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        for container in (*factor_names(module), "lora_N"):
            holder = getattr(module, container, {})
            if adapter_name not in holder:
                continue
            item = holder[adapter_name]
            suffix = f"{container}.{adapter_name}" + (".weight" if isinstance(item, nn.Module) else "")
            params[f"{module_name}.{suffix}"] = item.weight if isinstance(item, nn.Module) else item
    return params


def _validate_and_complete(model, adapter_name, remapped, verified: bool) -> dict[str, torch.Tensor]:
    """Refuse a checkpoint that does not fit the model before anything is loaded; fill in re-derived factors."""
    expected = _adapter_params(model, adapter_name)
    prefix = "base_model.model."
    if not any(k.startswith(prefix) for k in expected) and any(k.startswith(prefix) for k in remapped):
        remapped = {k.removeprefix(prefix): v for k, v in remapped.items()}
    adapter_keys = {k for k in remapped if f".{adapter_name}." in k or k.endswith(f".{adapter_name}")}
    lora_keys = {k for k in adapter_keys if ".lora_" in k}
    unexpected = sorted(k for k in lora_keys if k not in expected)
    if unexpected:
        raise ValueError(
            f"The NLoRA checkpoint does not match the model: it has {len(unexpected)} adapter tensors the model lacks "
            f"(e.g. '{unexpected[0]}'); load it on the base model it was trained on."
        )
    for key, value in remapped.items():
        if key in expected and tuple(value.shape) != tuple(expected[key].shape):
            raise ValueError(
                f"The NLoRA checkpoint does not match the model: '{key}' has shape {tuple(value.shape)} but the model "
                f"expects {tuple(expected[key].shape)}; check r, rank_pattern and the base model."
            )
        if key in expected and value.is_floating_point() and not torch.isfinite(value).all():
            raise ValueError(f"The NLoRA checkpoint is corrupt: '{key}' contains NaN or inf values.")
    missing = sorted(k for k in expected if k not in remapped)
    frozen_only = all(
        any(f".{n}." in k for n in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")) for k in missing
    )
    if missing and not (verified and frozen_only):
        raise ValueError(
            f"The NLoRA checkpoint is incomplete: {len(missing)} adapter tensors are missing (e.g. '{missing[0]}'); "
            "it was saved from a different model or the file is damaged."
        )
    for key in missing:  # N-only IntTune checkpoint: A and B were re-derived from the (verified) base weight
        remapped[key] = expected[key].detach().clone()
    return remapped


def _rollback(model: nn.Module, adapter_name: str) -> None:
    """After a refused load, take the just-injected adapter out again so the base model is as it was."""
    tuner = getattr(model, "base_model", model)
    if not isinstance(tuner, NLoraModel) or adapter_name not in tuner.peft_config:
        return
    if len(tuner.peft_config) == 1:
        tuner.unload()
    else:
        tuner.delete_adapter(adapter_name)
