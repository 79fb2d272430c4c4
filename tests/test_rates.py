"""The recommended learning rates are what the stored study runs say: each one is re-derived here from them, with the
study's own selection (bench/convergence.py): on validation rows over three seeds."""

import sys
from pathlib import Path

import pytest

from nlora.rates import RECOMMENDED_LEARNING_RATES, rate_spread, recommended_learning_rate

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import convergence  # noqa: E402

TASKS = {"sft": "math", "classification": "sentiment"}


@pytest.mark.parametrize("task", TASKS)
def test_every_recommended_rate_is_the_studys_selection_from_its_stored_runs(task, tmp_path):
    name = TASKS[task]
    base = convergence.task_settings(name, convergence.BUDGET[name])
    seeds = [0, 1, 2]
    tuned = convergence.search(name, base, seeds, tmp_path, False, convergence.METHODS, "tuned")
    assert set(convergence.METHODS) == RECOMMENDED_LEARNING_RATES.keys()
    for method in convergence.METHODS:
        selection = tuned.select(method)
        assert len(selection.seed0_validation) >= 3, (method, selection.seed0_validation)  # a grid, not one rate
        assert recommended_learning_rate(method, task) == selection.lr, (method, selection.lr)


def test_the_rate_table_in_the_cli_guide_is_the_code():
    guide = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    found = {}
    for line in guide.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].strip("`") in RECOMMENDED_LEARNING_RATES:
            for task, cell in zip(TASKS, cells[1:]):
                found[(cells[0].strip("`"), task)] = float(cell)
    assert found == {(m, t): rate for m, rates in RECOMMENDED_LEARNING_RATES.items() for t, rate in rates.items()}


def test_spread_and_unknown_method():
    assert rate_spread(["lora"]) == 1.0
    assert rate_spread(["nlora", "inttune"]) == pytest.approx(1e-1 / 3e-4)
    with pytest.raises(ValueError, match="No recommended learning rate for method 'dora'"):
        recommended_learning_rate("dora")


def test_the_readme_states_the_verdict_the_stored_runs_give(tmp_path):
    """The README's NLoRA − LoRA lines are what `bench/convergence.py --report-only` writes from the committed runs:
    a run stored without rebuilding the report fails here."""
    analyses = {}
    for name in ("sentiment", "math"):  # --report-only's order
        base = convergence.task_settings(name, convergence.BUDGET[name])
        analyses[name] = convergence.analyse(name, base, [0, 1, 2], tmp_path, convergence.METHODS)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("<!-- convergence-readme -->\n")[1].split("\n<!-- /convergence-readme -->")[0]
    assert block == convergence.readme_verdict(analyses)
    assert block.count("at the paper's one shared rate") == block.count("at rates selected on validation rows") == 2
