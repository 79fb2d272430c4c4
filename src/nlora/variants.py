"""SLoRA as a PEFT ``LoraVariant``: the forward and merge maths of ``delta_W = s * B @ N @ A``.

PEFT's LoRA layers call these hooks for every adapter that has a variant attached, so Linear, GPT-2 ``Conv1D``
(``fan_in_fan_out``) and Embedding layers get N in forward, merge, unmerge and mixed batches.
"""

from __future__ import annotations

import torch

from ._compat import VARIANT_KWARG_KEYS, LoraEmbedding, LoraLinear, LoraVariant, transpose


class SLoraLinearVariant(LoraVariant):
    """``h = W x + s * B N A dropout(x)`` for ``nn.Linear`` and ``Conv1D`` layers."""

    def supports_lora_conversion(self) -> bool:
        # PEFT's convert_to_lora reads get_delta_weight, which knows nothing of N; nlora.export_lora is exact.
        return False

    @staticmethod
    def init(module: LoraLinear, adapter_name: str, **kwargs) -> None:
        """Nothing to do: ``nlora.layer.init_adapter`` creates and initialises N."""

    @staticmethod
    def delta_weight(module: LoraLinear, adapter: str) -> torch.Tensor:
        """``s * B @ N @ A`` in fp32, laid out like the base weight."""
        A = module.lora_A[adapter].weight.float()
        N = module.lora_N[adapter].weight.float()
        B = module.lora_B[adapter].weight.float()
        return transpose(B @ (N @ A), module.fan_in_fan_out) * module.scaling[adapter]

    @classmethod
    def merge_safe(cls, module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        delta = cls.delta_weight(module, active_adapter).to(orig_weight.device)
        return (orig_weight.float() + delta).to(orig_weight.dtype)  # add in fp32, round once

    @classmethod
    def merge_unsafe(cls, module, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data.copy_(cls.merge_safe(module, active_adapter, orig_weight.data))

    @classmethod
    def unmerge(cls, module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        delta = cls.delta_weight(module, active_adapter).to(orig_weight.device)
        return (orig_weight.float() - delta).to(orig_weight.dtype)

    @staticmethod
    def forward(module: LoraLinear, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs):
        lora_A = module.lora_A[active_adapter]
        lora_N = module.lora_N[active_adapter]
        lora_B = module.lora_B[active_adapter]
        dropout = module.lora_dropout[active_adapter]
        return result + lora_B(lora_N(lora_A(dropout(x)))) * module.scaling[active_adapter]


class SLoraEmbeddingVariant(SLoraLinearVariant):
    """The same for ``nn.Embedding``: PEFT stores ``A`` as r x vocab and ``B`` as dim x r, ``delta = (B N A)^T``."""

    @staticmethod
    def delta_weight(module: LoraEmbedding, adapter: str) -> torch.Tensor:
        A = module.lora_embedding_A[adapter].float()
        N = module.lora_N[adapter].weight.float()
        B = module.lora_embedding_B[adapter].float()
        return (B @ (N @ A)).T * module.scaling[adapter]

    @staticmethod
    def forward(module: LoraEmbedding, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs):
        after_A = module._embed(
            x,
            module.lora_embedding_A[active_adapter].T,
            input_fn=module.input_fns.get(active_adapter),
            output_fn=module.output_fns.get(active_adapter),
        )
        after_N = module.lora_N[active_adapter](after_A.to(module.lora_N[active_adapter].weight.dtype))
        out = (after_N @ module.lora_embedding_B[active_adapter].T) * module.scaling[active_adapter]
        embed_scale = module._get_embed_scale()
        if embed_scale is not None:
            out = out * embed_scale.to(out.dtype)
        return result + out.to(result.dtype)


def embedding_mixed_batch_forward(self: LoraEmbedding, x: torch.Tensor, *args, adapter_names: list[str], **kwargs):
    """Mixed-batch forward for embeddings that honours N (PEFT's own version ignores variants), and gives
    ``"__base__"`` rows of a residual layer the original weight back."""
    result = self.base_layer(x, *args, **kwargs)
    for adapter in set(adapter_names):
        if adapter == "__base__" or adapter not in self.lora_embedding_A:
            continue
        rows = [i for i, name in enumerate(adapter_names) if name == adapter]
        result[rows] = self.lora_variant[adapter].forward(self, adapter, x[rows], result[rows])
    return _add_back_residual_for_base_rows(self, x, result, adapter_names)


def _add_back_residual_for_base_rows(module, x: torch.Tensor, result: torch.Tensor, adapter_names: list[str]):
    """``"__base__"`` rows of a residual layer: ``W - s B0 N0 A0`` plus ``s B0 N0 A0``, the original weight."""
    rows = [i for i, name in enumerate(adapter_names) if name == "__base__"]
    holder = next(iter(getattr(module, "nlora_initial", {})), None)
    if not rows or holder is None:
        return result
    factors, scale = module.nlora_initial[holder]
    A, N, B = (t.to(result.device) for t in (factors.A, factors.N, factors.B))
    if isinstance(module, LoraEmbedding):  # the factors describe W^T: rows of (B N A)^T picked by the token ids
        delta = torch.nn.functional.embedding(x[rows], A.T) @ (B @ N).T
    else:
        delta = x[rows].to(A.dtype) @ (B @ N @ A).T
    result[rows] = result[rows] + (scale * delta).to(result.dtype)
    return result


def _shared_factor_group(module: LoraLinear, names: list[str]) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """A, B and the scaling when every adapter in ``names`` is an N-only adapter on the same A and B objects (IntTune
    adapters that share a layer's frozen factors) with one scaling and no active dropout; else None."""
    if not names or any(n not in module.lora_A or n not in getattr(module, "lora_N", {}) for n in names):
        return None
    A, B = module.lora_A[names[0]].weight, module.lora_B[names[0]].weight
    if any(module.lora_A[n].weight is not A or module.lora_B[n].weight is not B for n in names):
        return None
    if len({module.scaling[n] for n in names}) != 1:
        return None
    if module.training and any(not isinstance(module.lora_dropout[n], torch.nn.Identity) for n in names):
        return None
    return A, B, module.scaling[names[0]]


def linear_mixed_batch_forward(self: LoraLinear, x: torch.Tensor, *args, adapter_names: list[str], **kwargs):
    """PEFT's mixed batch (``adapter_names=[...]``) with what PEFT cannot know about NLoRA layers:

    - IntTune adapters sharing the layer's A and B: ``x A^T`` and ``(.) B^T`` are computed once for the whole batch,
      and each row's own N is applied in one batched product (PEFT loops over the adapters);
    - rows named ``"__base__"`` on a residual layer get the original weight back (``W - s B0 N0 A0 + s B0 N0 A0``),
      as a disabled adapter does.
    """
    names = sorted(set(adapter_names) - {"__base__"})
    group = _shared_factor_group(self, names)
    if group is None:
        result = type(self)._mixed_batch_forward(self, x, *args, adapter_names=adapter_names, **kwargs)
    else:
        A, B, scaling = group
        result = self.base_layer(x, *args, **{k: v for k, v in kwargs.items() if k not in VARIANT_KWARG_KEYS})
        index = {name: i for i, name in enumerate(names)}
        rows = [i for i, name in enumerate(adapter_names) if name != "__base__"]
        if rows:
            every = len(rows) == len(adapter_names)  # no "__base__" row: no gather and scatter copies
            part = x if every else x[rows]
            stacked = torch.stack([self.lora_N[n].weight for n in names])  # k x r x r
            which = torch.tensor([index[adapter_names[i]] for i in rows], device=x.device)
            after_A = part.to(A.dtype) @ A.T  # m x ... x r, once for every task
            N = stacked[which].transpose(1, 2)  # m x r x r (row i applies its own N^T)
            after_N = torch.bmm(after_A.reshape(len(rows), -1, after_A.shape[-1]), N).reshape(after_A.shape)
            delta = ((after_N @ B.T) * scaling).to(result.dtype)
            if every:
                result += delta
            else:
                result[rows] += delta
    return _add_back_residual_for_base_rows(self, x, result, adapter_names)
