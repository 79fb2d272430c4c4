"""The recommended learning rates are what the stored study runs say: each one is re-derived here from them."""

import json
import re
from pathlib import Path

import pytest

from nlora.rates import RECOMMENDED_LEARNING_RATES, rate_spread, recommended_learning_rate

RUNS = Path(__file__).parent.parent / "docs" / "bench-results" / "runs"
TASKS = {"sft": "math", "classification": "sentiment"}
# a grid point of the default recipe: no init-variant suffix (runs of an older Nyström default keep theirs)
GRID_POINT = re.compile(r"^(?P<method>[a-z-]+)-r8-lr(?P<lr>[0-9.e-]+)-seed0-steps\d+\.json$")


@pytest.mark.parametrize("task", TASKS)
def test_every_recommended_rate_is_the_best_of_its_stored_grid(task):
    finals: dict[str, dict[float, float]] = {}
    for path in (RUNS / TASKS[task]).glob("*.json"):
        match = GRID_POINT.match(path.name)
        if match:
            summary = json.loads(path.read_text())["summary"]
            finals.setdefault(match["method"], {})[float(match["lr"])] = summary["after_loss"]
    assert finals.keys() == RECOMMENDED_LEARNING_RATES.keys()
    for method, grid in finals.items():
        assert len(grid) >= 3, (method, grid)
        assert recommended_learning_rate(method, task) == min(grid, key=grid.get), (method, grid)


def test_spread_and_unknown_method():
    assert rate_spread(["lora"]) == 1.0
    assert rate_spread(["nlora", "inttune"]) == pytest.approx(1e-1 / 3e-4)
    with pytest.raises(ValueError, match="No recommended learning rate for method 'dora'"):
        recommended_learning_rate("dora")
