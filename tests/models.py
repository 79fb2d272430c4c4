"""Tiny deterministic models for the tests. This module never imports nlora (the export test runs it alone)."""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(16, 32)
        self.lin1 = nn.Linear(32, 8)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))


class EmbeddingModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.lin = nn.Linear(16, 8)

    def forward(self, x):
        return self.lin(self.emb(x))


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2))


def llama(tie_word_embeddings: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        tie_word_embeddings=tie_word_embeddings,
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def tied_llama():
    """lm_head shares embed_tokens' weight, as in SmolLM2, Llama-3.2-1B/3B, Qwen2.5-0.5B and Gemma."""
    model = llama(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# name -> (factory, targets, extra config, input factory)
MODELS = {
    "mlp": (MLP, ["lin0", "lin1"], {}, lambda g: torch.randn(4, 16, generator=g)),
    "gpt2": (gpt2, ["c_attn", "c_fc"], {"fan_in_fan_out": True}, lambda g: torch.randint(0, 64, (2, 8), generator=g)),
    "embedding": (EmbeddingModel, ["emb", "lin"], {}, lambda g: torch.randint(0, 50, (4, 6), generator=g)),
    "llama": (llama, LLAMA_TARGETS, {}, lambda g: torch.randint(0, 64, (2, 8), generator=g)),
    "tied_llama": (
        tied_llama,
        ["q_proj", "v_proj", "embed_tokens", "lm_head"],
        {},
        lambda g: torch.randint(0, 64, (2, 8), generator=g),
    ),
}


def build(name: str, seed: int = 0):
    """The base model ``name`` with weights fixed by ``seed``, in eval mode, and a fixed input batch."""
    factory, _, _, make_input = MODELS[name]
    torch.manual_seed(seed)
    model = factory().eval()
    return model, make_input(torch.Generator().manual_seed(123))


def output(model, x):
    out = model(x)
    return out.logits if hasattr(out, "logits") else out
