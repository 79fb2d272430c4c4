"""NLoRA on bitsandbytes 4-bit (NF4, FP4, double quantisation) and 8-bit bases, on CPU."""

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

from nlora import NLoraConfig, save_residual_model
from nlora.model import keep_trainable_on_cpu

bnb = pytest.importorskip("bitsandbytes")

TARGETS = ["q_proj", "v_proj", "down_proj"]
QUANTS = {
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
    "fp4-double": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": True},
    "int8": {"load_in_8bit": True},
}
MODES = {
    "slora": {"init_lora_weights": "slora"},
    "nlora": {},  # quantized_residual="keep": the quantised weights stay, N starts at 0
    "qnlora": {"quantized_residual": "requantize"},
    "nlora_reference": {"init_lora_weights": "nlora_reference"},
    "inttune": {"train_intermediate_only": True},
}
UNCHANGED_AT_STEP_0 = {"slora", "nlora", "inttune"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    # 64 wide: bitsandbytes' CPU 4-bit kernels need in_features >= one quantisation block (64)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    path = tmp_path_factory.mktemp("llama64")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def load(path, quant=None):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if quant is None:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    config = BitsAndBytesConfig(bnb_4bit_compute_dtype=torch.float32, **QUANTS[quant])
    model = AutoModelForCausalLM.from_pretrained(path, device_map="cpu", quantization_config=config)
    return keep_trainable_on_cpu(model)


X = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))


def logits(model):
    """Eval-mode logits (bitsandbytes' int8 layers compute differently in train and eval mode)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(input_ids=X).logits
    return out if not was_training else (model.train(), out)[1]


def base_bytes(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer.weight" in n}


def train(model, steps=3):
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        model(input_ids=X, labels=X).loss.backward()
        opt.step()
        opt.zero_grad()
    return model


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("quant", QUANTS)
def test_every_init_trains_saves_and_reloads_on_a_quantised_base(model_dir, quant, mode, tmp_path):
    base = load(model_dir, quant)
    reference = logits(base)
    model = get_peft_model(base, NLoraConfig(r=4, target_modules=TARGETS, **MODES[mode]))
    assert type(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer).__module__.startswith(
        "bitsandbytes"
    )
    if mode in UNCHANGED_AT_STEP_0:  # the quantised model exactly, never further from full precision
        torch.testing.assert_close(logits(model), reference, atol=1e-5, rtol=0)
    before = base_bytes(model)
    adapter_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    train(model)
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, adapter_before[n])]
    assert len(changed) == len(adapter_before), "every trainable adapter parameter moves"
    assert all(torch.equal(before[n], p) for n, p in base_bytes(model).items()), "training never touches the base"
    trained = logits(model)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(load(model_dir, quant), tmp_path)
    torch.testing.assert_close(logits(reloaded), trained, atol=1e-5, rtol=0)
    if mode == "qnlora":  # the base bytes are those of quantise(W - sBNA), not the loaded ones
        plain = base_bytes(get_peft_model(load(model_dir, quant), NLoraConfig(r=4, target_modules=TARGETS)))
        assert all(not torch.equal(p, plain[n]) for n, p in base_bytes(reloaded).items())


def test_merge_and_unload_on_4bit_dequantises_merges_and_requantises(model_dir):
    model = train(get_peft_model(load(model_dir, "nf4"), NLoraConfig(r=4, target_modules=TARGETS)))
    trained = logits(model)
    merged = model.merge_and_unload()
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    assert type(merged.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert (logits(merged) - trained).abs().max() < 0.05  # within 4-bit rounding of the merged weight


def test_n_only_inttune_checkpoint_is_verified_on_a_quantised_base(model_dir, tmp_path):
    config = NLoraConfig(r=4, target_modules=TARGETS, train_intermediate_only=True, save_frozen_factors=False)
    model = train(get_peft_model(load(model_dir, "nf4"), config))
    model.save_pretrained(tmp_path)
    torch.testing.assert_close(logits(PeftModel.from_pretrained(load(model_dir, "nf4"), tmp_path)), logits(model),
                               atol=1e-5, rtol=0)  # fmt: skip
    other = load(model_dir, "nf4")
    with torch.no_grad():
        layer = other.model.layers[0].self_attn.q_proj
        layer.weight = bnb.nn.Params4bit(
            torch.randn(layer.out_features, layer.in_features), requires_grad=False, quant_type="nf4"
        ).to("cpu")
    with pytest.raises(ValueError, match="trained on another base model"):
        PeftModel.from_pretrained(other, tmp_path)
    # the usual inference set-up, the full-precision model: its factors differ from the NF4 ones, and the refusal
    # names the fix (the default save_frozen_factors=True loads anywhere: test_keep_adapter_..._full_precision_base)
    with pytest.raises(ValueError, match=r"do not come out the same .*or save with save_frozen_factors=True"):
        PeftModel.from_pretrained(load(model_dir), tmp_path)


def test_qnlora_workflow_decomposes_in_full_precision(model_dir, tmp_path):
    config = NLoraConfig(r=4, target_modules=TARGETS)
    save_residual_model(load(model_dir), config, tmp_path / "residual")
    quantised = load(tmp_path / "residual", "nf4")
    before = base_bytes(get_peft_model(copy.deepcopy(quantised), NLoraConfig(r=4, target_modules=TARGETS,
                                                                             init_lora_weights="slora")))  # fmt: skip
    model = PeftModel.from_pretrained(quantised, tmp_path / "residual" / "initial_adapter", is_trainable=True)
    assert all(torch.equal(before[n], p) for n, p in base_bytes(model).items()), "loading never requantises"
    full, plain = logits(load(model_dir)), logits(load(model_dir, "nf4"))
    qnlora = logits(model)
    # step 0: quantise(W - sBNA) + sBNA, about as far from the full-precision model as plain NF4
    assert (qnlora - full).abs().mean() < 1.5 * (plain - full).abs().mean()
    assert {n.split(".lora_")[1].split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {
        "A", "B", "N"}  # fmt: skip
    with pytest.raises(ValueError, match="needs the full-precision model"):
        save_residual_model(load(model_dir, "nf4"), config, tmp_path / "again")


def test_other_quantisers_are_refused_with_bitsandbytes_named(model_dir):
    class HQQLinear(nn.Linear):  # what an hqq-quantised layer looks like to nlora: a module from the hqq package
        pass

    HQQLinear.__module__ = "hqq.core.quantize"
    model = load(model_dir)
    old = model.model.layers[0].self_attn.q_proj
    model.model.layers[0].self_attn.q_proj = HQQLinear(old.in_features, old.out_features, bias=False)
    with pytest.raises(ValueError, match=r"hqq\.core\.quantize\) is quantised or integer .*quantise with bitsandbytes"):
        get_peft_model(model, NLoraConfig(r=4, target_modules=TARGETS))


def test_cli_trains_on_4bit_and_8bit_bases(tmp_path, capsys):
    import json

    from cli_fixtures import arithmetic_rows, make_tiny_model, write_jsonl
    from nlora.cli import main

    model = make_tiny_model(tmp_path / "tiny", hidden=64)
    data = write_jsonl(tmp_path / "arith.jsonl", arithmetic_rows(40))

    def train(out, *extra):
        args = ["--model", model, "--data", data, "--output-dir", tmp_path / out, "--max-steps", 2, "--r", 4]
        return main(["train", *map(str, args), "--save-steps", "0", "--max-eval-samples", "4", *extra])

    assert train("qnlora", "--load-in-4bit") == 0  # residual from the full-precision weights, then NF4
    adapter = json.loads((tmp_path / "qnlora" / "adapter" / "adapter_config.json").read_text())
    assert adapter["residual"] is False and adapter["base_model_name_or_path"].endswith("residual-base")
    assert (tmp_path / "qnlora" / "residual-base" / "model.safetensors").exists()
    # the QNLoRA adapter belongs to residual-base/: evaluated on the original model it is refused, not mis-scored
    evaluated = ["eval", "--model", str(model), "--adapter", str(tmp_path / "qnlora" / "adapter"), "--data", str(data),
                 "--output-dir", str(tmp_path / "qnlora-eval"), "--limit", "2", "--max-new-tokens", "4"]  # fmt: skip
    capsys.readouterr()
    assert main(evaluated) == 2
    assert "trained on another base model" in capsys.readouterr().err
    own_base = [*evaluated[:1], *evaluated[3:-6], "--output-dir", str(tmp_path / "own-eval"), *evaluated[-4:]]
    assert main(own_base) == 0  # the base the adapter names: its residual-base/, in the run's own NF4
    assert json.loads((tmp_path / "own-eval" / "score.json").read_text())["quantization"] == "nf4"
    assert train("qlora", "--load-in-4bit", "--method", "lora") == 0
    config = tmp_path / "int8.yaml"
    config.write_text("quantization: int8\nmethod: inttune\n")
    assert train("int8", "--config", str(config)) == 0
    assert json.loads((tmp_path / "int8" / "run_config.json").read_text())["quantization"] == "int8"
    assert train("pissa", "--load-in-4bit", "--method", "pissa") == 2
    assert train("both", "--load-in-4bit", "--load-in-8bit") == 2
    assert not (tmp_path / "pissa").exists() and not (tmp_path / "both").exists()


@pytest.mark.parametrize("mode", ["nlora", "inttune"])
def test_keep_adapter_trained_on_4bit_serves_on_a_full_precision_base(model_dir, mode, tmp_path):
    """The QLoRA deployment: train on NF4, load the adapter on the full-precision model. 'keep' subtracts nothing
    and starts N at 0, so the saved adapter is a plain (non-residual) one and the load must not subtract either."""
    import json

    model = train(get_peft_model(load(model_dir, "nf4"), NLoraConfig(r=4, target_modules=TARGETS, **MODES[mode])))
    trained = logits(model)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["intermediate_init"] == "zero"  # says what it is: nothing was subtracted
    full = load(model_dir)
    full_weights = {n: p.detach().clone() for n, p in full.named_parameters()}
    gap = (logits(full) - logits(load(model_dir, "nf4"))).abs().mean()  # what the precision alone changes
    for dtype in (torch.float32, torch.bfloat16):
        served = PeftModel.from_pretrained(load(model_dir).to(dtype), tmp_path).float()
        assert (logits(served) - trained).abs().mean() < 1.5 * gap + 0.01, dtype
    served = PeftModel.from_pretrained(full, tmp_path)
    assert all(torch.equal(p, full_weights[n.replace(".base_layer", "")])
               for n, p in served.get_base_model().named_parameters() if "lora_" not in n)  # fmt: skip


def test_refused_load_on_a_4bit_base_leaves_every_byte(model_dir, tmp_path):
    """A QNLoRA ('requantize') adapter onto another NF4 model: refused before any weight is requantised."""
    from transformers import LlamaForCausalLM

    config = NLoraConfig(r=4, target_modules=TARGETS, quantized_residual="requantize")
    train(get_peft_model(load(model_dir, "nf4"), config)).save_pretrained(tmp_path / "adapter")
    torch.manual_seed(7)
    LlamaForCausalLM(load(model_dir).config).save_pretrained(tmp_path / "other")
    other = load(tmp_path / "other", "nf4")
    before = {n: p.detach().clone() for n, p in other.named_parameters()}
    before_logits = logits(other)
    with pytest.raises(ValueError, match="trained on another base model"):
        PeftModel.from_pretrained(other, tmp_path / "adapter")
    assert all(torch.equal(p, before[n]) for n, p in other.named_parameters())
    torch.testing.assert_close(logits(other), before_logits, atol=0, rtol=0)


@pytest.mark.parametrize("quant", QUANTS)
def test_unload_after_requantize_gives_back_the_original_codes(model_dir, quant):
    base = load(model_dir, quant)
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    reference = logits(base)
    model = train(get_peft_model(base, NLoraConfig(r=4, target_modules=TARGETS, quantized_residual="requantize")))
    assert any(not torch.equal(p, before[n.removeprefix("base_model.model.").replace(".base_layer", "")])
               for n, p in base_bytes(model).items())  # fmt: skip
    unloaded = model.unload()
    assert all(torch.equal(p, before[n]) for n, p in unloaded.named_parameters())
    torch.testing.assert_close(logits(unloaded), reference, atol=0, rtol=0)
