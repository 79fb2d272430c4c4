"""A tiny offline model + tokenizer on disk and small datasets, for end-to-end CLI tests."""

from __future__ import annotations

import json
import random
from pathlib import Path


def arithmetic_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        rows.append({"question": f"What is {a} plus {b}?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}"})
    return rows


def sentiment_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    good, bad = ["great", "lovely", "superb", "fine"], ["awful", "dull", "bad", "poor"]
    rows = []
    for _ in range(n):
        label = rng.randint(0, 1)
        rows.append({"text": f"a {rng.choice(good if label else bad)} film", "label": label})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_tiny_model(directory: Path, hidden: int = 32) -> Path:
    """A 2-layer Llama (causal LM; also loads as a sequence classifier) with a byte-level BPE tokenizer.

    bitsandbytes' CPU 4-bit kernels need in_features >= 64 (one quantisation block): use ``hidden=64`` for them.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = [r["question"] + " " + r["answer"] for r in arithmetic_rows(200)] + [r["text"] for r in sentiment_rows(50)]
    texts += [
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request. ### Instruction: ### Response: Let's think step by step. def return"
    ]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<pad>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
