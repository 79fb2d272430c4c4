"""A residual adapter (W becomes W - s B0 N0 A0) is right through every path that adds, disables or removes one:
a second adapter with the same config (TRL's reference adapter), ``disable_adapter`` (TRL DPO's reference model),
PEFT's ``delete_adapter`` bookkeeping, and the quantised 'keep' adapter on a full-precision base."""

import contextlib
import copy
import logging

import pytest
import torch
from peft import PeftModel, get_peft_model

from cli_fixtures import arithmetic_rows, make_tiny_model
from conftest import RESIDUAL, make_config, train
from models import build, output
from nlora.layer import _DELETED_WITH_ADAPTER


def _residual_model(model_name: str, mode: str, **overrides):
    base, x = build(model_name)
    return base, x, get_peft_model(copy.deepcopy(base), make_config(model_name, mode, **overrides))


def _nlora_records(model) -> dict[str, set]:
    """Every per-adapter ``nlora*`` record on every layer: ``{attribute: adapter names}``."""
    found = {}
    for module in model.modules():
        for name, value in vars(module).items():
            if name.startswith("nlora") and isinstance(value, dict | set):
                found.setdefault(name, set()).update(value)
    return found


@pytest.mark.parametrize("model_name", ["llama", "tied_llama", "gpt2", "embedding"])
@pytest.mark.parametrize("mode", sorted(RESIDUAL))
def test_second_adapter_with_the_same_config_shares_the_residual(model_name, mode):
    base, x, pm = _residual_model(model_name, mode)
    expected = output(base, x).detach()
    train(pm, x)
    trained = output(pm, x).detach()
    pm.add_adapter("ref", pm.peft_config["default"])  # what TRL does for its reference adapter
    pm.set_adapter("default")
    torch.testing.assert_close(output(pm, x), trained)  # nothing subtracted a second time
    pm.set_adapter("ref")
    torch.testing.assert_close(output(pm, x), expected, atol=1e-5, rtol=1e-5)  # the new adapter starts at the base
    with pm.disable_adapter():
        torch.testing.assert_close(output(pm, x), expected, atol=1e-5, rtol=1e-5)
    pm.delete_adapter("default")  # the residual stays for 'ref'
    torch.testing.assert_close(output(pm, x), expected, atol=1e-5, rtol=1e-5)
    assert all(names <= {"ref"} for key, names in _nlora_records(pm).items() if key != "nlora_hooked")
    restored = pm.unload()
    for (name, p), q in zip(restored.named_parameters(), base.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6, msg=name)


def test_an_adapter_with_other_init_settings_is_refused_before_anything_changes():
    base, x, pm = _residual_model("llama", "nlora")
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    with pytest.raises(ValueError, match=r"adapter 'default' differs\); pass the same NLoraConfig"):
        pm.add_adapter("other", make_config("llama", "nlora", init_seed=1))
    assert all(torch.equal(p, before[n]) for n, p in pm.named_parameters())
    with pytest.raises(ValueError, match=r"adapter 'default' differs"):
        pm.add_adapter("slora", make_config("llama", "slora"))


@pytest.mark.parametrize("model_name", ["llama", "tied_llama", "gpt2", "embedding", "mlp"])
@pytest.mark.parametrize("mode", sorted(RESIDUAL))
def test_disabled_adapters_give_the_original_base_model(model_name, mode):
    base, x, pm = _residual_model(model_name, mode)
    train(pm, x)
    assert not torch.allclose(output(pm, x), output(base, x), atol=1e-4)  # training moved the model
    with pm.disable_adapter():
        torch.testing.assert_close(output(pm, x), output(base, x), atol=1e-5, rtol=1e-5)
    pm.merge_adapter()
    with pm.disable_adapter():
        torch.testing.assert_close(output(pm, x), output(base, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_name", ["llama", "tied_llama", "gpt2", "embedding", "mlp"])
@pytest.mark.parametrize("mode", sorted(RESIDUAL))
def test_base_model_state_dict_is_the_model_the_user_started_from(model_name, mode):
    """PEFT's get_base_model_state_dict / set_base_model_state_dict: the residual is nlora's business."""
    from peft import get_base_model_state_dict, set_base_model_state_dict

    base, x, pm = _residual_model(model_name, mode)
    original = {k: v.clone() for k, v in base.state_dict().items()}
    train(pm, x)
    extracted = get_base_model_state_dict(pm)
    assert extracted.keys() == original.keys()
    for key, value in original.items():
        torch.testing.assert_close(extracted[key], value, atol=1e-6, rtol=1e-6, msg=key)
    trained = output(pm, x).detach()
    with torch.no_grad():
        for name, param in pm.get_base_model().named_parameters():
            if param.is_floating_point() and "lora_" not in name:  # the base weights only
                param.add_(0.1)
    result = set_base_model_state_dict(pm, original, strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    torch.testing.assert_close(output(pm, x), trained, atol=1e-5, rtol=1e-5)  # the residual base is back


def test_delete_adapter_leaves_no_per_adapter_record():
    base, x, pm = _residual_model("llama", "inttune", save_frozen_factors=False)
    pm.add_adapter("second", pm.peft_config["default"])
    assert {"nlora_initial", *_DELETED_WITH_ADAPTER} <= _nlora_records(pm).keys()
    pm.delete_adapter("second")
    records = _nlora_records(pm)
    assert all(names <= {"default"} for key, names in records.items() if key != "nlora_hooked"), records
    base_after = pm.unload()
    assert not any(names for key, names in _nlora_records(base_after).items() if key != "nlora_hooked")


@pytest.mark.parametrize("trainer_name", ["DPO", "KTO"])
def test_trl_preference_trainer_reference_is_the_base_model(trainer_name, tmp_path):
    """TRL's DPO and KTO trainers take their reference log-probs from the PEFT model with the adapter disabled: with
    a residual adapter that must be the base model the user passed in, before and after training."""
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.trainer import add_fused_lm_head

    model_dir = make_tiny_model(tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    reference = copy.deepcopy(base).eval()
    add_fused_lm_head(reference)  # what TRL does to its own reference models
    rows = arithmetic_rows(8)
    if trainer_name == "DPO":
        data = [
            {"prompt": r["question"], "chosen": " " + r["answer"], "rejected": " " + r["answer"][::-1]} for r in rows
        ]
    else:  # KTO: unpaired completions with a desirable / undesirable label
        data = [{"prompt": r["question"], "completion": " " + r["answer"][:: 1 if i % 2 else -1], "label": i % 2 == 1}
                for i, r in enumerate(rows)]  # fmt: skip
    config = make_config("llama", "nlora", task_type="CAUSAL_LM")
    args = getattr(trl, f"{trainer_name}Config")(
        output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
        report_to=[], use_cpu=True, save_strategy="no", max_length=64,
    )  # fmt: skip
    trainer = getattr(trl, f"{trainer_name}Trainer")(
        model=base, args=args, train_dataset=Dataset.from_list(data), processing_class=tokenizer, peft_config=config
    )
    batch = next(iter(trainer.get_train_dataloader()))

    def logps(model, reference_path: bool):
        """TRL's log-prob code; ``reference_path`` runs it the way TRL gets its reference (adapter disabled)."""
        trainer.ref_model = None if reference_path else reference  # a set ref_model switches the adapter context off
        model.eval()
        with torch.no_grad():
            return torch.stack([t for t in trainer.compute_ref_log_probs(model, batch) if t is not None])

    base_logps = logps(reference, reference_path=False)
    torch.testing.assert_close(logps(trainer.model, reference_path=False), base_logps, atol=1e-3, rtol=1e-4)  # step 0
    trainer.ref_model = None
    trainer.train()
    ref_logps = logps(trainer.model, reference_path=True)
    assert not torch.allclose(logps(trainer.model, reference_path=False), base_logps, atol=1e-2)  # the policy moved
    torch.testing.assert_close(ref_logps, base_logps, atol=1e-3, rtol=1e-4)
    print(f"{trainer_name} reference vs base log-prob max abs diff:", (ref_logps - base_logps).abs().max().item())


def _saved_residual_adapter(tmp_path, mode="nlora", **overrides):
    base, x, pm = _residual_model("llama", mode, **overrides)
    train(pm, x)
    pm.save_pretrained(tmp_path / "adapter")
    return base, x, output(pm, x).detach()


@contextlib.contextmanager
def transformers_log():
    """The messages transformers logs meanwhile (its loggers do not propagate to the root, so not caplog)."""
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("transformers").addHandler(handler)
    try:
        yield messages
    finally:
        logging.getLogger("transformers").removeHandler(handler)


def test_transformers_load_adapter_checks_the_base(tmp_path):
    base, x, trained = _saved_residual_adapter(tmp_path)
    model = copy.deepcopy(base)
    with transformers_log() as messages:
        model.load_adapter(str(tmp_path / "adapter"))  # transformers' own adapter API
    torch.testing.assert_close(output(model, x), trained, atol=1e-5, rtol=1e-5)
    assert not any("UNEXPECTED" in m for m in messages), messages  # a correct load does not alarm
    other = build("llama", seed=5)[0]
    before = {n: p.detach().clone() for n, p in other.named_parameters()}
    with pytest.raises(ValueError, match=r"trained on another base model: the weight of 'model\.layers\.0\."):
        other.load_adapter(str(tmp_path / "adapter"))
    assert {n: p for n, p in other.named_parameters()}.keys() == before.keys()  # no adapter layer left behind
    assert all(torch.equal(p, before[n]) for n, p in other.named_parameters())


def test_residual_model_adapter_names_its_base_and_refuses_the_original(tmp_path):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    from nlora import save_residual_model

    base, x = build("llama")
    base.save_pretrained(tmp_path / "original")
    original_logits = output(base, x).detach()
    config = make_config("llama", "nlora", task_type="CAUSAL_LM")
    save_residual_model(AutoModelForCausalLM.from_pretrained(tmp_path / "original"), config, tmp_path / "residual")
    adapter = tmp_path / "residual" / "initial_adapter"
    # AutoPeftModel follows base_model_name_or_path: the residual base, and the step-0 model is the original one
    auto = AutoPeftModelForCausalLM.from_pretrained(adapter)
    torch.testing.assert_close(output(auto, x), original_logits, atol=1e-5, rtol=1e-5)
    for load in (PeftModel.from_pretrained, lambda m, a: m.load_adapter(str(a))):
        original = AutoModelForCausalLM.from_pretrained(tmp_path / "original")
        with pytest.raises(ValueError, match="trained on another base model"):
            load(original, adapter)
        torch.testing.assert_close(output(original, x), original_logits, atol=0, rtol=0)


def test_transformers_native_adapter_api():
    """transformers' own adapter methods on a residual NLoRA adapter (the README promises transformers code keeps
    working): add_adapter, set_adapter, disable_adapters / enable_adapters, active_adapters, and a second adapter
    with other init settings refused before anything changes."""
    base, x = build("llama")
    expected = output(base, x).detach()
    model = copy.deepcopy(base)
    config = make_config("llama", "nlora")
    model.add_adapter(config, adapter_name="default")
    train(model, x)
    trained = output(model, x).detach()
    assert not torch.allclose(trained, expected, atol=1e-4)
    model.disable_adapters()
    torch.testing.assert_close(output(model, x), expected, atol=1e-5, rtol=1e-5)  # the original model
    model.enable_adapters()
    torch.testing.assert_close(output(model, x), trained)
    model.add_adapter(config, adapter_name="ref")  # same settings: shares the residual
    model.set_adapter("ref")
    assert model.active_adapters() == ["ref"]
    torch.testing.assert_close(output(model, x), expected, atol=1e-5, rtol=1e-5)
    model.set_adapter("default")
    torch.testing.assert_close(output(model, x), trained)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"adapter 'default' differs"):
        model.add_adapter(make_config("llama", "nlora", init_seed=3), adapter_name="other")
    assert {n: p for n, p in model.named_parameters()}.keys() == before.keys()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", sorted(RESIDUAL))
def test_second_residual_adapter_saves_and_reloads_next_to_the_first(mode, dtype, tmp_path):
    """Found by running PEFT's own test_custom_models.py on NLoRA configs: a second adapter loaded next to a residual
    one was refused as 'another base model' (its fingerprint was compared with the now residual weight), and a
    full-rank IntTune layer refused a second adapter (its zero check read the residual, which is ~0 at full rank)."""
    base, x = build("mlp")
    base, x = base.to(dtype), x.to(dtype)
    config = make_config("mlp", mode, r=8, rank_pattern={"lin1": 8})  # lin1 is 32x8: r = 8 is full rank there
    model = get_peft_model(copy.deepcopy(base), config)
    model.add_adapter("other", config)
    train(model, x)
    model.set_adapter("other")
    train(model, x)
    expected = {}
    for name in ("default", "other"):
        model.set_adapter(name)
        expected[name] = output(model, x).detach()
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    reloaded.load_adapter(tmp_path / "other", adapter_name="other")
    for name in ("default", "other"):
        reloaded.set_adapter(name)
        torch.testing.assert_close(output(reloaded, x), expected[name], atol=1e-5, rtol=1e-5)  # same arithmetic


def test_transformers_load_adapter_of_an_n_only_checkpoint_is_exact_and_quiet(tmp_path):
    """An N-only IntTune checkpoint re-derives A and B at injection: transformers' load report must not call them
    MISSING, nor the fingerprints UNEXPECTED, when the load is exact."""
    base, x, trained = _saved_residual_adapter(tmp_path, mode="inttune", save_frozen_factors=False)
    model = copy.deepcopy(base)
    with transformers_log() as messages:
        model.load_adapter(str(tmp_path / "adapter"))
    torch.testing.assert_close(output(model, x), trained, atol=1e-5, rtol=1e-5)
    assert not any("MISSING" in m or "UNEXPECTED" in m for m in messages), messages
