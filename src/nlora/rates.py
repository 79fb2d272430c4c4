"""Recommended starting learning rates per method and task, measured by the project's convergence study.

Each value is the study's selection from its stored runs (docs/benchmarks.md §3, ``docs/bench-results/runs/<task>/``;
``tests/test_rates.py`` re-derives every value from them): the rate selected on validation rows, disjoint from the
reported ones, by the mean over three seeds at the two best points of the method's grid.

- ``sft``: the math task, SmolLM2-135M on the offline GSM8K split, 150 steps of batch 4, r = 8 on all linear layers;
- ``classification``: the sentiment task, MiniLM on VADER movie sentences, 300 steps of batch 16, r = 8.

They are starting points for other models, data and budgets, not tuned values for yours. A residual init (NLoRA,
PiSSA) wants about a 10x lower rate than a zero-start adapter (LoRA, SLoRA), IntTune a 10-30x higher one.
Comparing methods at one shared rate favours whichever method that rate suits.
"""

from __future__ import annotations

STUDY = "docs/benchmarks.md §3"
EVIDENCE = "selected on validation rows over 3 seeds"  # how the study chose every rate below

RECOMMENDED_LEARNING_RATES: dict[str, dict[str, float]] = {
    "lora": {"sft": 3e-3, "classification": 1e-3},
    "slora": {"sft": 3e-3, "classification": 1e-3},
    "nlora": {"sft": 3e-4, "classification": 3e-4},
    "pissa": {"sft": 1e-3, "classification": 3e-4},
    "nlora-reference": {"sft": 1e-2, "classification": 3e-3},
    "inttune": {"sft": 1e-1, "classification": 3e-2},
}


def recommended_learning_rate(method: str, task: str = "sft") -> float:
    """The study's best rate for ``method`` ("lora", "slora", "nlora", "pissa", "nlora-reference", "inttune") on
    ``task`` ("sft" or "classification")."""
    try:
        return RECOMMENDED_LEARNING_RATES[method][task]
    except KeyError as err:
        raise ValueError(
            f"No recommended learning rate for method '{method}' and task '{task}'; methods: "
            f"{', '.join(RECOMMENDED_LEARNING_RATES)}, tasks: sft, classification."
        ) from err


def rate_spread(methods: list[str], task: str = "sft") -> float:
    """The ratio of the highest to the lowest recommended rate among ``methods`` (1.0 for one method)."""
    rates = [recommended_learning_rate(m, task) for m in methods]
    return max(rates) / min(rates)
