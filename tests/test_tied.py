"""Tied input/output embeddings: the adapted end gets its own copy of the shared weight."""

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model

from conftest import make_config, train
from models import build, output


@pytest.mark.parametrize("targets", [["embed_tokens"], ["lm_head"], ["embed_tokens", "lm_head", "q_proj"]])
@pytest.mark.parametrize("mode", ["nlora", "inttune", "nlora_reference", "slora"])
def test_tied_model_is_unchanged_at_step_0_and_comes_back_tied(targets, mode, tmp_path):
    base, x = build("tied_llama")
    reference = output(copy.deepcopy(base), x)
    model = get_peft_model(base, make_config("tied_llama", mode, target_modules=targets))
    inner = model.base_model.model
    if mode != "nlora_reference":
        torch.testing.assert_close(output(model, x), reference, atol=1e-5, rtol=0)
    shared = [inner.lm_head, inner.model.embed_tokens]
    untouched = [m for m, name in zip(shared, ["lm_head", "embed_tokens"]) if name not in targets]
    for module in untouched:  # the other end still holds the original, unmodified weight
        torch.testing.assert_close(module.weight, build("tied_llama")[0].lm_head.weight, atol=0, rtol=0)

    train(model, x)
    trained = output(model, x).detach()
    merged = copy.deepcopy(model).merge_and_unload()
    torch.testing.assert_close(output(merged, x), trained, atol=1e-5, rtol=1e-5)
    assert merged.config.tie_word_embeddings is False
    merged.save_pretrained(tmp_path / "merged")
    reloaded = type(merged).from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(output(reloaded, x), trained, atol=1e-5, rtol=1e-5)

    model.save_pretrained(tmp_path / "adapter")
    again = PeftModel.from_pretrained(build("tied_llama")[0], tmp_path / "adapter")
    torch.testing.assert_close(output(again, x), trained, atol=1e-5, rtol=1e-5)

    unloaded = model.unload()
    assert unloaded.lm_head.weight is unloaded.model.embed_tokens.weight
    torch.testing.assert_close(output(unloaded, x), reference, atol=1e-5, rtol=0)


@pytest.mark.integration
def test_real_smollm2_with_lm_head_target_is_unchanged_at_step_0():
    from transformers import AutoModelForCausalLM

    from nlora import NLoraConfig
    from nlora.cli.assets import smollm2_path

    base = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32).eval()
    assert base.lm_head.weight is base.model.embed_tokens.weight
    x = torch.randint(0, base.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = base(x).logits
        model = get_peft_model(base, NLoraConfig(r=8, target_modules=["q_proj", "v_proj", "lm_head"]))
        logits = model(x).logits
        assert (logits - reference).abs().max() < 1e-3  # it moved by up to 24 before the fix
        assert (logits.argmax(-1) == reference.argmax(-1)).float().mean() == 1.0
        unloaded = model.unload()
        assert unloaded.lm_head.weight is unloaded.model.embed_tokens.weight
        torch.testing.assert_close(unloaded(x).logits, reference, atol=1e-4, rtol=1e-5)  # one fp32 rounding of W
