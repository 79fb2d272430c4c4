"""The Trainer every nlora training run uses: transformers' own, with evaluations that leave the seed's random
stream as they found it."""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer


class SeedFaithfulTrainer(Trainer):
    """A ``Trainer`` whose evaluations do not draw from torch's random state.

    An evaluation draws once (its DataLoader iterator's seed), so with dropout a run measured before or during
    training would get other dropout masks, and train another model, than the same seed measured less often.
    """

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            return super().evaluate(*args, **kwargs)
