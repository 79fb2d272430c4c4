"""Attach and initialise the intermediate matrix N on a PEFT LoRA layer, and own its residual.

``init_adapter`` runs once per targeted layer right after PEFT has built ``lora_A`` / ``lora_B``. It adds
``lora_N``, computes the chosen init from the base weight (fp32, seeded forked RNG), optionally subtracts the
initial delta from the base weight (residual) and records what it did on the layer.
"""

from __future__ import annotations

import copy
import types
import zlib

import torch
from torch import nn

from . import nystrom
from ._compat import (
    LoraEmbedding,
    LoraLayer,
    freeze_peft_weight,
    gather_params_ctx,
    get_bnb_param_type,
    move_adapter_to_base_device,
)
from .config import NLoraConfig
from .variants import (
    SLoraEmbeddingVariant,
    SLoraLinearVariant,
    embedding_mixed_batch_forward,
    linear_mixed_batch_forward,
)

# bitsandbytes 4/8-bit weights count as bf16-precise for the fingerprint tolerance: their rounding moves ||W|| by
# about 0.5%, well inside bf16's 2 * 2^-7, while a residual or another checkpoint moves it by more.
QUANTIZED_EPS = torch.finfo(torch.bfloat16).eps


def factor_names(module: LoraLayer) -> tuple[str, str]:
    """Names of the A and B containers on this layer type."""
    if isinstance(module, LoraEmbedding):
        return "lora_embedding_A", "lora_embedding_B"
    return "lora_A", "lora_B"


def weight_matrix(base_layer: nn.Module) -> torch.Tensor:
    """The base weight as the ``out x in`` view the factors live in.

    transformers' Conv1D stores ``in x out`` (PEFT's fan_in_fan_out); embeddings are adapted transposed
    (``delta^T = B N A`` with A r x vocab and B dim x r, PEFT's layout).
    """
    if isinstance(base_layer, nn.Embedding) or type(base_layer).__name__ == "Conv1D":
        return base_layer.weight.T
    return base_layer.weight


def quantized(base_layer: nn.Module) -> str | None:
    """ "4bit" or "8bit" for a bitsandbytes layer, else None."""
    weight = getattr(base_layer, "weight", None)
    return get_bnb_param_type(weight) if weight is not None else None


def dense_weight(base_layer: nn.Module) -> torch.Tensor:
    """The ``out x in`` weight as a float tensor: :func:`weight_matrix`, or the dequantised bitsandbytes weight
    (never its packed bytes)."""
    kind = quantized(base_layer)
    if kind == "4bit":
        import bitsandbytes as bnb

        return bnb.functional.dequantize_4bit(base_layer.weight.data, base_layer.weight.quant_state).float()
    if kind == "8bit":  # not PEFT's dequantize_module_weight: it re-assigns the weight and loses its int8 state
        import bitsandbytes as bnb

        scales = getattr(base_layer.state, "SCB", None)
        scales = base_layer.weight.SCB if scales is None else scales
        return bnb.functional.int8_vectorwise_dequant(base_layer.weight.data, scales).float()
    return weight_matrix(base_layer)


def _requantize(base_layer: nn.Module, dense: torch.Tensor) -> None:
    """Replace a bitsandbytes weight by the quantisation of ``dense`` (as PEFT's OLoRA init does)."""
    old = base_layer.weight
    if quantized(base_layer) == "4bit":
        new = old.__class__(dense.to(old.quant_state.dtype if old.quant_state else torch.float32).cpu(),
                            requires_grad=False, quant_type=old.quant_type, quant_storage=old.quant_storage,
                            compress_statistics=old.compress_statistics, module=old.module)  # fmt: skip
    else:
        new = old.__class__(dense.to(torch.float16).cpu(), requires_grad=False, has_fp16_weights=old.has_fp16_weights)
        base_layer.state.reset_grads()  # the old int8 scales belong to the old weight
        base_layer.state.SCB = None
    base_layer.weight = new.to(old.device)


def precision_eps(base_layer: nn.Module) -> float:
    """The relative precision of the base weight, which the fingerprint tolerance scales with."""
    return QUANTIZED_EPS if quantized(base_layer) else torch.finfo(base_layer.weight.dtype).eps


def base_fingerprint(base_layer: nn.Module) -> list[float]:
    """The base weight's checksum and precision: the first three numbers of :func:`nystrom.init_fingerprint`."""
    with gather_params_ctx(base_layer.weight, modifier_rank=None):
        return [*nystrom.weight_fingerprint(dense_weight(base_layer)), precision_eps(base_layer)]


def weight_shape(base_layer: nn.Module) -> tuple[int, int]:
    """``(out, in)`` of :func:`weight_matrix`, also for a DeepSpeed ZeRO-3 partitioned weight (local shape (0,))
    and a bitsandbytes layer (packed weight)."""
    if quantized(base_layer):
        return base_layer.out_features, base_layer.in_features
    weight = base_layer.weight
    shape = tuple(getattr(weight, "ds_shape", weight.shape))
    transposed = isinstance(base_layer, nn.Embedding) or type(base_layer).__name__ == "Conv1D"
    return (shape[1], shape[0]) if transposed else (shape[0], shape[1])


def layer_seed(init_seed: int, module_key: str) -> int:
    """A per-layer seed that depends only on the config seed and the module path (not on the adapter name)."""
    return zlib.crc32(f"{init_seed}:{module_key}".encode())


def adapter_param(module: LoraLayer, container: str, adapter: str) -> torch.Tensor:
    item = getattr(module, container)[adapter]
    return item.weight if isinstance(item, nn.Module) else item


def _assign(module: LoraLayer, container: str, adapter: str, value: torch.Tensor, materialize: bool) -> None:
    """Copy ``value`` into an adapter parameter. Meta parameters (low_cpu_mem_usage) are left for the state dict
    loader unless ``materialize`` (frozen factors that an N-only checkpoint does not carry)."""
    holder = getattr(module, container)
    owner, name = (holder[adapter], "weight") if isinstance(holder[adapter], nn.Module) else (holder, adapter)
    param = owner._parameters[name]
    if param.device.type == "meta":
        if materialize:  # bypass register_parameter, which init_empty_weights patches to create meta tensors
            # a contiguous copy: the residual record keeps the initial factors, which training must not change, and
            # a strided view (a slice of W) would take other kernels than the parameter a checkpoint loads into
            value = value.detach().to(param.dtype, copy=True, memory_format=torch.contiguous_format)
            owner._parameters[name] = nn.Parameter(value, requires_grad=param.requires_grad)
        return
    with torch.no_grad():
        param.copy_(value.to(device=param.device, dtype=param.dtype))


def _initial_factors(module: LoraLayer, adapter: str, config: NLoraConfig, key: str) -> nystrom.Factors:
    """The factors this config asks for, in fp32, before any scaling of the stored parameters."""
    r, scaling = module.r[adapter], module.scaling[adapter]
    out_features, in_features = (
        adapter_param(module, factor_names(module)[1], adapter).shape[0],
        adapter_param(module, factor_names(module)[0], adapter).shape[1],
    )
    generator = torch.Generator().manual_seed(layer_seed(config.init_seed, key))
    init = config.init_lora_weights
    is_embedding = isinstance(module, LoraEmbedding)

    if init in ("nlora", "nlora_reference"):
        base = module.get_base_layer()
        with gather_params_ctx(base.weight):  # ZeRO-3: gather the full weight (init is deterministic on every rank)
            w = dense_weight(base)
            if init == "nlora_reference":
                factors = nystrom.reference_factors(w, r)
            else:
                options = config.nystrom_options(r, tuple(w.shape))
                factors = nystrom.nystrom_factors(w, r, **options, scaling=scaling, generator=generator)
            if config.rederives_init:  # only a residual or an N-only checkpoint is ever checked against it
                module.nlora_fingerprint[adapter] = nystrom.init_fingerprint(w, factors, precision_eps(base))
            if config.intermediate_init == "zero":
                factors.N = torch.zeros_like(factors.N)
        return factors
    if init == "slora" and not is_embedding:
        return nystrom.slora_factors(out_features, in_features, r, generator)
    # Embeddings follow PEFT's convention (A = 0, B ~ N(0, 1)); True means N = I (LoRA at step 0).
    A = nystrom.kaiming_(torch.empty(r, in_features), generator)
    B = torch.zeros(out_features, r)
    N = torch.eye(r) if init is True else nystrom.kaiming_(torch.empty(r, r), generator)
    if is_embedding:
        A, B = torch.zeros(r, in_features), torch.randn(out_features, r, generator=generator)
    if init is False:  # non-identity start for tests
        A = nystrom.kaiming_(torch.empty(r, in_features), generator)
        B = nystrom.kaiming_(torch.empty(out_features, r), generator)
    return nystrom.Factors(A=A, N=N, B=B)


def init_adapter(
    module: LoraLayer, adapter: str, config: NLoraConfig, key: str, untie: bool = False, created_empty: bool = False
) -> None:
    """Add ``lora_N`` for ``adapter`` to a freshly updated PEFT LoRA layer and initialise A, N, B (and W).

    ``untie``: the base weight is shared with another module (tied embeddings); this layer then gets a private copy,
    so that neither a residual nor a merge changes the other module. ``unload`` puts the shared weight back.
    ``created_empty``: PEFT created A and B on the meta device (no random draw to pay); they are materialised here
    and moved to the base layer's device and dtype.
    """
    name_A, name_B = factor_names(module)
    A_param = adapter_param(module, name_A, adapter)
    r = module.r[adapter]

    if not hasattr(module, "lora_N"):
        module.lora_N = nn.ModuleDict()
    if "lora_N" not in module.adapter_layer_names:
        module.adapter_layer_names = tuple(module.adapter_layer_names) + ("lora_N",)
    # created empty like A and B (no draw: every init below sets N), else where A lives (the loader fills meta ones)
    device = "meta" if created_empty else A_param.device
    module.lora_N[adapter] = nn.Linear(r, r, bias=False, device=device, dtype=A_param.dtype)
    module.lora_N[adapter].requires_grad_(A_param.requires_grad)
    if isinstance(module, LoraEmbedding):
        module.lora_variant[adapter] = SLoraEmbeddingVariant()
        module._mixed_batch_forward = types.MethodType(embedding_mixed_batch_forward, module)
    else:
        module.lora_variant[adapter] = SLoraLinearVariant()
        module._mixed_batch_forward = types.MethodType(linear_mixed_batch_forward, module)

    _register_records(module)
    if module.get_base_layer().weight.device.type == "meta":
        # another rank holds the weights (checked by NLoraModel): it initialises, nlora.broadcast_init_state syncs
        module.nlora_pending = getattr(module, "nlora_pending", set()) | {adapter}
        if config.train_intermediate_only:
            _freeze_factors(module, adapter)
        return
    holder = residual_holder(module) if config.uses_residual else None
    if holder is not None:  # the base is already residual: share that residual, never subtract a second time
        factors = _share_residual(module, adapter, holder)
    else:
        factors = _initial_factors(module, adapter, config, key)
    materialize = created_empty or not config.save_frozen_factors
    _assign(module, name_A, adapter, factors.A, materialize)
    _assign(module, name_B, adapter, factors.B, materialize)
    _assign(module, "lora_N", adapter, factors.N, materialize=created_empty)
    if created_empty:
        move_adapter_to_base_device(module, adapter)

    if untie and holder is None:
        _untie(module, adapter)
    if config.uses_residual and holder is None:
        _subtract_residual(module, adapter, factors)
    if config.train_intermediate_only:
        _freeze_factors(module, adapter)
        if holder is not None:
            _share_frozen_factors(module, adapter, holder)


def _share_frozen_factors(module: LoraLayer, adapter: str, holder: str) -> None:
    """IntTune adapters on one residual have the same frozen A and B (the fingerprints prove it): hold them once, so
    each further task adds only its r x r N. Shared only when the holder's factors are frozen and equal bit for bit."""
    pairs = [(adapter_param(module, c, adapter), adapter_param(module, c, holder)) for c in factor_names(module)]
    for mine, theirs in pairs:
        if theirs.requires_grad or "meta" in (mine.device.type, theirs.device.type):
            return
        if mine.shape != theirs.shape or mine.dtype != theirs.dtype or not torch.equal(mine, theirs):
            return
    for container, (_, theirs) in zip(factor_names(module), pairs):
        holder_dict = getattr(module, container)
        if isinstance(holder_dict[adapter], nn.Module):
            holder_dict[adapter]._parameters["weight"] = theirs
        else:
            holder_dict[adapter] = theirs


# Per-adapter records that PEFT's own delete_adapter drops with the adapter (it walks ``other_param_names``).
# ``nlora_initial`` / ``nlora_untied`` are not among them: removing those must first put the base weight back.
_DELETED_WITH_ADAPTER = ("nlora_fingerprint", "nlora_init_error")


def _register_records(module: LoraLayer) -> None:
    """Create the per-adapter record dicts where PEFT's adapter bookkeeping sees them, and make the
    disabled-adapter forward give the original base model (not the residual one)."""
    for name in _DELETED_WITH_ADAPTER:
        if not hasattr(module, name):
            setattr(module, name, {})
    missing = tuple(n for n in _DELETED_WITH_ADAPTER if n not in module.other_param_names)
    if missing:
        module.other_param_names = tuple(module.other_param_names) + missing
    if not getattr(module, "nlora_hooked", False):
        module.register_forward_hook(_add_back_residual_when_disabled, with_kwargs=True)
        module.nlora_hooked = True


def residual_holder(module: LoraLayer) -> str | None:
    """The adapter whose initial delta this layer's base weight currently has subtracted, if any."""
    return next(iter(getattr(module, "nlora_initial", {})), None)


def _share_residual(module: LoraLayer, adapter: str, holder: str) -> nystrom.Factors:
    """A second residual adapter on an already residual layer: it starts from the same initial state."""
    factors, scaling = module.nlora_initial[holder]
    if module.scaling[adapter] != scaling or module.r[adapter] != factors.A.shape[0]:
        raise ValueError(  # NLoraModel refuses such configs before injection; this guards other callers
            f"NLoRA adapter '{adapter}' cannot share the residual of adapter '{holder}': their rank or scaling "
            "differ; give it the same config or use residual=False."
        )
    module.nlora_initial[adapter] = (factors, scaling)
    for name in _DELETED_WITH_ADAPTER:
        if holder in getattr(module, name):
            getattr(module, name)[adapter] = getattr(module, name)[holder]
    return nystrom.Factors(A=factors.A.clone(), N=factors.N.clone(), B=factors.B.clone())


def _add_back_residual_when_disabled(self: LoraLayer, args: tuple, kwargs: dict, result: torch.Tensor):
    """Forward hook: with adapters disabled, add the residual's initial delta back, so that ``disable_adapter()``
    (TRL's reference model) is the model the user started from, not ``W - s B0 N0 A0``."""
    holder = residual_holder(self) if self.disable_adapters else None
    if holder is None:
        return None
    x = args[0] if args else kwargs["x"] if "x" in kwargs else kwargs["input"]
    factors, scaling = self.nlora_initial[holder]
    A, N, B = (t.to(result.device) for t in (factors.A, factors.N, factors.B))
    if isinstance(self, LoraEmbedding):  # the factors describe W^T: rows of (B N A)^T picked by the token ids
        delta = torch.nn.functional.embedding(x, A.T) @ (B @ N).T
    else:
        delta = x.to(A.dtype) @ (B @ N @ A).T
    return result + (scaling * delta).to(result.dtype)


def _freeze_factors(module: LoraLayer, adapter: str) -> None:
    """IntTune: A and B stay frozen (PEFT re-applies this on every set_adapter)."""
    for container in factor_names(module):
        freeze_peft_weight(module, adapter, container)
        adapter_param(module, container, adapter).requires_grad_(False)


def _untie(module: LoraLayer, adapter: str) -> None:
    """Give this layer a private copy of its shared base weight; keep the shared one to put back on unload."""
    base = module.get_base_layer()
    original = base.weight
    # bypass register_parameter, which init_empty_weights (low_cpu_mem_usage) patches to create meta tensors
    base._parameters["weight"] = nn.Parameter(original.detach().clone(), requires_grad=original.requires_grad)
    module.nlora_untied = getattr(module, "nlora_untied", {})
    module.nlora_untied[adapter] = original


def _subtract_residual(module: LoraLayer, adapter: str, factors: nystrom.Factors) -> None:
    """``W <- W - s B0 N0 A0`` in fp32 and keep (A0, N0, B0) so the change can be undone or exported."""
    base = module.get_base_layer()
    scaling = module.scaling[adapter]
    with gather_params_ctx(base.weight, modifier_rank=0), torch.no_grad():
        w = dense_weight(base)
        residual = w.float()  # the weight itself when it is fp32: updated in place, no extra copy
        norm_sq = factors.weight_norm_sq
        if norm_sq is None:
            norm_sq = torch.linalg.matrix_norm(residual).item() ** 2
        device = residual.device
        residual.addmm_(factors.B.to(device), (factors.N @ factors.A).to(device), alpha=-scaling)
        if factors.captured_energy is not None:  # projection: the error needs no second pass over W
            error_sq = max(norm_sq - factors.captured_energy, 0.0)
        else:
            error_sq = torch.linalg.matrix_norm(residual).item() ** 2
        module.nlora_init_error[adapter] = (error_sq / max(norm_sq, 1e-30)) ** 0.5
        if quantized(base):  # QNLoRA: the base becomes quantise(W - s B N A); the original codes stay for unload
            module.nlora_quantized_original = getattr(module, "nlora_quantized_original", {})
            module.nlora_quantized_original[adapter] = (base.weight, copy.copy(getattr(base, "state", None)))
            _requantize(base, residual)
        elif residual.data_ptr() != w.data_ptr():
            w.copy_(residual)
    module.nlora_initial = getattr(module, "nlora_initial", {})
    module.nlora_initial[adapter] = (factors, scaling)


def restore_base(module: LoraLayer, adapter: str) -> None:
    """Undo what ``init_adapter`` did to the base weight for ``adapter``: the residual, and any untying.

    A residual shared with other adapters stays until the last of them goes."""
    initial = getattr(module, "nlora_initial", {}).pop(adapter, None)
    base = module.get_base_layer()
    original = getattr(module, "nlora_untied", {}).pop(adapter, None)
    quantized_original = getattr(module, "nlora_quantized_original", {}).pop(adapter, None)
    heir = residual_holder(module)
    if initial is not None and heir is not None:  # the remaining adapter now owns what is to be put back
        if original is not None:
            module.nlora_untied[heir] = original
        if quantized_original is not None:
            module.nlora_quantized_original[heir] = quantized_original
        return
    if original is not None:  # the shared weight was never modified: put it back and the model is tied again
        base._parameters["weight"] = original
        return
    if initial is None:
        return
    if quantized_original is not None:  # the very codes (and int8 scales) the model had: no second rounding
        base._parameters["weight"], state = quantized_original
        if state is not None:
            base.state = state
        return
    factors, scaling = initial
    with gather_params_ctx(base.weight, modifier_rank=0), torch.no_grad():
        w = dense_weight(base)
        w32 = w.float()
        w32.addmm_(factors.B.to(w32.device), (factors.N @ factors.A).to(w32.device), alpha=scaling)
        if quantized(base):  # a quantised base whose original codes were not kept (rank-0-only init)
            _requantize(base, w32)
        elif w32.data_ptr() != w.data_ptr():
            w.copy_(w32)


def _stored_layout(base_layer: nn.Module, matrix: torch.Tensor) -> torch.Tensor:
    """An ``out x in`` matrix in the layout ``base_layer.weight`` is stored in (inverse of :func:`weight_matrix`)."""
    transposed = isinstance(base_layer, nn.Embedding) or type(base_layer).__name__ == "Conv1D"
    return matrix.T if transposed else matrix


def original_base_weight(module: LoraLayer, residual: torch.Tensor | None = None) -> torch.Tensor | None:
    """The base weight the user started from, ``W_res + s B0 N0 A0``, in the stored layout and dtype, for a layer
    whose base is residual (None otherwise, and for quantised bases, whose state holds packed codes). ``residual``:
    another residual weight (stored layout) to add the initial delta to, instead of the layer's own."""
    holder = residual_holder(module)
    base = module.get_base_layer()
    if holder is None or quantized(base):
        return None
    factors, scaling = module.nlora_initial[holder]
    w = weight_matrix(base) if residual is None else _stored_layout(base, residual)
    delta = factors.B.float() @ (factors.N.float() @ factors.A.float())
    return _stored_layout(base, w.float() + scaling * delta.to(w.device)).to(base.weight.dtype)


def residual_base_weight(module: LoraLayer, original: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`original_base_weight`: what this layer's base holds for the original ``original``."""
    holder = residual_holder(module)
    base = module.get_base_layer()
    factors, scaling = module.nlora_initial[holder]
    w = _stored_layout(base, original).float()
    delta = factors.B.float() @ (factors.N.float() @ factors.A.float())
    return _stored_layout(base, w - scaling * delta.to(w.device)).to(original.dtype)
