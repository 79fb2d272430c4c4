import copy

import pytest
import torch

import nlora  # noqa: F401  (registers the NLORA PEFT type)
from models import MODELS, output
from nlora import NLoraConfig

# datasets and transformers create their log handler at first use, on whatever sys.stderr is then; created inside a
# test that captures stderr (capsys), it would later write to a closed stream, and logging's error report (a
# traceback) would land in the next in-process CLI test's stderr. Create them now, on the session's stream.
pytest.importorskip("datasets.utils.logging").get_logger("datasets")
__import__("transformers").logging.get_logger("transformers")

MODES = {
    "slora": {"init_lora_weights": "slora"},
    "nlora": {"init_lora_weights": "nlora"},
    "nlora_reference": {"init_lora_weights": "nlora_reference"},
    "inttune": {"init_lora_weights": "nlora", "train_intermediate_only": True},
}
IDENTITY_AT_INIT = {"slora", "nlora", "inttune"}
RESIDUAL = {"nlora", "inttune"}


def make_config(model_name: str, mode: str, **overrides) -> NLoraConfig:
    _, targets, extra = MODELS[model_name][:3]
    kwargs = {"r": 4, "lora_alpha": 8, "target_modules": targets, **extra, **MODES[mode], **overrides}
    return NLoraConfig(**kwargs)


def train(model, x, steps: int = 3, lr: float = 1e-2):
    """A few Adam steps on a loss with non-zero gradients everywhere."""
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        out = output(model, x)
        loss = (out - 0.5).pow(2).mean()
        loss.backward()
        optimizer.step()
    model.eval()
    return model


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture
def clone():
    return copy.deepcopy


def tiny_training_args(output_dir, **overrides):
    """transformers TrainingArguments for 4 quick CPU steps on the tiny models."""
    from transformers import TrainingArguments

    values = {"per_device_train_batch_size": 4, "max_steps": 4, "learning_rate": 1e-2, "report_to": [],
              "save_strategy": "no", "use_cpu": True, **overrides}  # fmt: skip
    return TrainingArguments(output_dir=str(output_dir), **values)
