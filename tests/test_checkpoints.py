"""Checkpoints that re-derive their init from the base weight (residual, N-only IntTune) verify that base."""

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model

from conftest import make_config, tiny_training_args, train
from models import build, output


def _decaying(model):
    """Give every weight matrix a decaying spectrum, as trained weights have (random ones have no gaps, so a bf16
    copy could rotate the Nyström factors)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                u, s, vh = torch.linalg.svd(p.float(), full_matrices=False)
                p.copy_((u * (s[0] * 0.6 ** torch.arange(len(s)))) @ vh)
    return model


def _base(seed=0):
    return _decaying(build("llama", seed)[0])


def _saved(tmp_path, mode, **overrides):
    base, x = _base(), build("llama")[1]
    model = train(get_peft_model(base, make_config("llama", mode, **overrides)), x)
    model.save_pretrained(tmp_path)
    return output(model, x).detach(), x


@pytest.mark.parametrize("mode", ["nlora", "inttune"])
def test_residual_adapter_refuses_another_or_a_scaled_base_and_accepts_a_bf16_copy(mode, tmp_path):
    out, x = _saved(tmp_path, mode)
    torch.testing.assert_close(output(PeftModel.from_pretrained(_base(), tmp_path), x), out)

    scaled = _base()
    with torch.no_grad():
        scaled.model.layers[1].mlp.down_proj.weight.mul_(1.5)
    for other in (_base(seed=1), scaled):
        reference = copy.deepcopy(other)
        with pytest.raises(ValueError, match=r"^The NLoRA adapter was trained on another base model: [^\n]*\.$"):
            PeftModel.from_pretrained(other, tmp_path)
        torch.testing.assert_close(output(other, x), output(reference, x), atol=1e-6, rtol=0)  # rolled back

    bf16 = PeftModel.from_pretrained(_base().to(torch.bfloat16), tmp_path)
    torch.testing.assert_close(output(bf16, x).float(), out, atol=0.1, rtol=0.05)


def test_n_only_checkpoint_is_accepted_on_a_bf16_base_and_refused_on_a_scaled_one(tmp_path):
    out, x = _saved(tmp_path, "inttune", save_frozen_factors=False)
    bf16 = PeftModel.from_pretrained(_base().to(torch.bfloat16), tmp_path)
    torch.testing.assert_close(output(bf16, x).float(), out, atol=0.1, rtol=0.05)
    scaled = _base()
    with torch.no_grad():
        scaled.model.layers[0].self_attn.q_proj.weight.mul_(1.5)
    with pytest.raises(ValueError, match="trained on another base model"):
        PeftModel.from_pretrained(scaled, tmp_path)
    rotated = build("llama")[0]  # random weights: no spectral gaps, bf16 rounding rotates the factors
    get_peft_model(copy.deepcopy(rotated), make_config("llama", "inttune", save_frozen_factors=False)).save_pretrained(
        tmp_path / "random"
    )
    with pytest.raises(ValueError, match="do not come out the same from this copy"):
        PeftModel.from_pretrained(rotated.to(torch.bfloat16), tmp_path / "random")


def test_n_only_checkpoint_loads_into_an_existing_adapter_slot(tmp_path):
    out, x = _saved(tmp_path, "inttune", save_frozen_factors=False)
    live = get_peft_model(_base(), make_config("llama", "inttune", save_frozen_factors=False))
    live.load_adapter(tmp_path, adapter_name="default", is_trainable=True)  # what Trainer's resume does
    torch.testing.assert_close(output(live.eval(), x), out, atol=1e-6, rtol=0)
    trainable = {n.split(".lora_")[1].split(".")[0] for n, p in live.named_parameters() if p.requires_grad}
    assert trainable == {"N"}


def test_trainer_resumes_an_n_only_inttune_run(tmp_path):
    from datasets import Dataset
    from transformers import Trainer

    ids = torch.randint(0, 64, (16, 12), generator=torch.Generator().manual_seed(0))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})

    def run(out, resume=None):
        torch.manual_seed(0)
        model = get_peft_model(_base(), make_config("llama", "inttune", save_frozen_factors=False))
        args = tiny_training_args(tmp_path / out, save_strategy="steps", save_steps=2, seed=0, data_seed=0)
        Trainer(model=model, args=args, train_dataset=data).train(resume_from_checkpoint=resume)
        return {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_N." in n}

    uninterrupted = run("first")  # its checkpoint-2 holds only N (r*r per layer) and fingerprints
    resumed = run("resumed", resume=str(tmp_path / "first" / "checkpoint-2"))
    assert resumed.keys() == uninterrupted.keys()
    for name in resumed:
        torch.testing.assert_close(resumed[name], uninterrupted[name], atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "mode,overrides,fingerprinted",
    [("nlora", {}, True), ("inttune", {"save_frozen_factors": False}, True), ("nlora_reference", {}, False),
     ("nlora", {"residual": False}, False), ("slora", {}, False)],
)  # fmt: skip
def test_a_fingerprint_is_computed_only_where_a_load_checks_it(mode, overrides, fingerprinted, tmp_path):
    """The fingerprint costs a pass over W: only a residual or N-only adapter records it (and saves it)."""
    from safetensors.torch import load_file

    model = get_peft_model(_base(), make_config("llama", mode, **overrides))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert ("default" in layer.nlora_fingerprint) == fingerprinted
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert any(k.endswith("nystrom_fingerprint") for k in saved) == fingerprinted


@pytest.mark.parametrize("mode,overrides", [("nlora", {}), ("inttune", {"save_frozen_factors": False})])
def test_a_checkpoint_saved_before_square_row_landmarks_reloads_the_factors_it_was_trained_with(
    mode, overrides, tmp_path
):
    """nlora < 0.2 took a square W's landmarks on its columns and saved no ``nystrom_square_landmarks``: such a
    checkpoint re-derives column landmarks (exactly its trained model), while a config saved now says which side."""
    import json

    old = tmp_path / "old"
    out, x = _saved(old, mode, nystrom_square_landmarks="columns", **overrides)
    config_file = old / "adapter_config.json"
    saved = json.loads(config_file.read_text())
    assert saved.pop("nystrom_square_landmarks") == "columns"
    config_file.write_text(json.dumps(saved))  # as nlora < 0.2 wrote it
    loaded = PeftModel.from_pretrained(_base(), old)
    assert loaded.peft_config["default"].nystrom_square_landmarks == "columns"
    torch.testing.assert_close(output(loaded, x), out, atol=1e-6, rtol=0)
    through_transformers = _base()
    through_transformers.load_adapter(str(old))  # transformers' own adapter API reads the config the same way
    assert through_transformers.peft_config["default"].nystrom_square_landmarks == "columns"
    torch.testing.assert_close(output(through_transformers, x), out, atol=1e-6, rtol=0)

    new = tmp_path / "new"
    out, x = _saved(new, mode, **overrides)
    assert json.loads((new / "adapter_config.json").read_text())["nystrom_square_landmarks"] == "rows"
    torch.testing.assert_close(output(PeftModel.from_pretrained(_base(), new), x), out, atol=1e-6, rtol=0)
