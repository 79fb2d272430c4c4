"""The comparison protocol (``nlora compare --tune``, ``bench/convergence.py``): selection on validation loss, the
statistics against hand-computed values, and one tiny end-to-end run that resumes from its stored runs."""

import dataclasses
import importlib
import json
import math
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nlora import stats
from nlora.cli.compare import run_key
from nlora.cli.settings import TrainSettings
from nlora.cli.tune import RateSearch, Selection, centred_grid, compare_selections, format_difference, ladder


@pytest.fixture(scope="module")
def convergence():
    """The study's script (bench/convergence.py), whose report is tested here on tiny studies."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    return importlib.import_module("convergence")


def test_the_ladder_and_the_centred_grid():
    assert [ladder(1e-3, k) for k in (-2, -1, 1, 2)] == [1e-4, 3e-4, 3e-3, 1e-2]
    assert [ladder(3e-2, k) for k in (-1, 1)] == [1e-2, 1e-1]
    assert centred_grid(3e-3, 3) == [1e-3, 3e-3, 1e-2]
    assert centred_grid(3e-4, 4) == [3e-5, 1e-4, 3e-4, 1e-3]


def test_hand_computed_statistics():
    mean, half = stats.mean_ci([1.0, 2.0, 3.0])  # sd 1, t(0.975, 2) = 4.3027
    assert mean == 2.0 and half == pytest.approx(4.3027 / math.sqrt(3), abs=1e-4)
    a, b = [0.9, 1.0, 0.95], [1.0, 1.2, 1.1]  # sds 0.05 and 0.1
    se = math.sqrt(0.05**2 / 3 + 0.1**2 / 3)
    df = se**4 / ((0.05**2 / 3) ** 2 / 2 + (0.1**2 / 3) ** 2 / 2)
    assert df == pytest.approx(2.9412, abs=1e-4)
    diff, low, high = stats.difference_ci(a, b)
    assert diff == pytest.approx(-0.15) and (high - low) / 2 == pytest.approx(3.2187 * se, abs=1e-3)  # t(.975, 2.94)
    assert stats.welch_p(a, b) == pytest.approx(0.1045, abs=1e-4)  # t = -0.15 / se = -2.3238
    assert stats.difference_ci([1.0], b) is None and stats.welch_p([1.0], b) is None
    # Holm: sorted 0.01, 0.03, 0.04 times 3, 2, 1 = 0.03, 0.06, 0.04 -> never decreasing: 0.03, 0.06, 0.06
    assert stats.holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": None}) == {"a": 0.03, "b": 0.06, "c": 0.06, "d": None}
    assert stats.detectable_difference(0.3, 3) == pytest.approx((1.95996 + 0.84162) * 0.3 * math.sqrt(2 / 3), 1e-4)
    assert stats.collapse_threshold("classification", 2) == pytest.approx(0.99 * math.log(2))
    assert stats.collapse_threshold("sft", base_loss=1.7) == 1.7 and math.isinf(stats.collapse_threshold("sft"))
    assert stats.collapsed(0.69, 0.686) and stats.collapsed(math.nan, 5.0) and not stats.collapsed(0.3, 0.686)


def fake_record(validation: float, after: float, before: float = 1.0, curve=()) -> dict:
    metrics = [{"step": step, "eval_loss": loss} for step, loss in curve]
    summary = {"validation_loss": validation, "after_loss": after, "before_loss": before}
    return {"summary": summary, "metrics": metrics}


def test_selection_on_validation_over_the_seeds_with_an_edge_extension(monkeypatch, tmp_path):
    # lora: seed 0's best grid rate (3e-3, at the top edge) extends the grid to 1e-2, which is worse; the two best
    # by seed 0 are 3e-3 and 1e-3, and over seeds 0-1 1e-3 wins (mean 0.50 < 0.55): one lucky seed does not decide
    validation = {("lora", 1e-3, 0): 0.52, ("lora", 1e-3, 1): 0.48, ("lora", 3e-3, 0): 0.50, ("lora", 3e-3, 1): 0.60,
                  ("lora", 1e-2, 0): 0.70, ("lora", 3e-4, 0): 0.9}  # fmt: skip
    calls = []

    def fake_run(self, method, lr, seed, r=None):
        calls.append((method, lr, seed))
        value = validation.get((method, lr, seed))
        return None if value is None else fake_record(value, value + 0.01)

    monkeypatch.setattr(RateSearch, "run", fake_run)
    search = RateSearch(TrainSettings(), ["lora"], [0, 1], tmp_path, tmp_path, extensions=1,
                        grids={"lora": [3e-4, 1e-3, 3e-3]}, progress=None)  # fmt: skip
    selection = search.select("lora")
    assert selection.seed0_validation == {3e-4: 0.9, 1e-3: 0.52, 3e-3: 0.50, 1e-2: 0.70}
    assert selection.candidates == pytest.approx({3e-3: 0.55, 1e-3: 0.50})
    assert selection.lr == 1e-3 and [r["summary"]["after_loss"] for r in selection.runs] == [0.53, 0.49]
    assert ("lora", 1e-2, 1) not in calls  # only the two best grid rates run the other seeds


def test_compare_selections_excludes_collapsed_runs_and_corrects_across_the_family():
    curve = [(1, 0.9), (2, 0.6), (3, 0.5)]
    runs = {
        "lora": [fake_record(0, v, curve=curve) for v in (0.50, 0.52, 0.693)],  # the third collapsed (chance)
        "nlora": [fake_record(0, v, curve=[(1, 0.6), (2, 0.5)]) for v in (0.40, 0.42, 0.44)],
        "slora": [fake_record(0, v) for v in (0.55, 0.57, 0.56)],
    }
    selections = {m: Selection(m, {}, {}, 1e-3, r) for m, r in runs.items()}
    rows = compare_selections(selections, "lora", stats.collapse_threshold("classification", 2))
    assert rows["lora"]["collapsed"] == 1 and rows["lora"]["loss"][0] == pytest.approx(0.51)
    diff = rows["nlora"]["difference"]
    assert diff[0] == pytest.approx(0.42 - 0.51) and diff[1] < diff[0] < diff[2]
    p = {m: stats.welch_p([r["summary"]["after_loss"] for r in runs[m]], [0.50, 0.52]) for m in ("nlora", "slora")}
    assert rows["nlora"]["p"] == pytest.approx(p["nlora"])
    assert rows["nlora"]["p_holm"] == pytest.approx(min(1, 2 * min(p.values())))  # two tests in the family
    assert rows["nlora"]["steps_to_baseline"] == [2, 2, 2]  # first eval at or below lora's mean 0.51
    assert rows["lora"]["steps_to_baseline"] == [3, 3, 3] and rows["lora"]["p"] is None


def test_compare_tune_end_to_end_and_resumes_from_its_stored_runs(tmp_path):
    from cli_fixtures import arithmetic_rows, make_tiny_model, write_jsonl
    from test_cli_safety import nlora

    model = make_tiny_model(tmp_path / "model")
    data = write_jsonl(tmp_path / "arith.jsonl", arithmetic_rows(60))
    out = tmp_path / "tune"
    args = ["compare", "--tune", "--model", model, "--data", data, "--output-dir", out, "--methods", "lora,nlora",
            "--seeds", "0,1", "--grid-points", "2", "--grid-extensions", "0", "--max-steps", "2", "--r", "2",
            "--eval-fraction", "0.3", "--max-eval-samples", "6", "--eval-steps", "1", "--margin", "0.5"]  # fmt: skip
    rc, stdout, err = nlora(*args)
    assert rc == 0, err[-3000:]
    progress = [line for line in err.splitlines() if line.startswith("nlora: ") and "validation loss" in line]
    assert len(progress) == 8  # per method: 2 grid rates at seed 0, both best (of 2) at seed 1
    stored = sorted(p.name for p in (out / "runs").glob("*.json"))
    assert len(stored) == 8
    record = json.loads((out / "tune.json").read_text())
    for method in ("lora", "nlora"):
        selection = record["selections"][method]
        assert float(selection["lr"]) in centred_grid({"lora": 3e-3, "nlora": 3e-4}[method], 2)
        runs = [json.loads((out / "runs" / name).read_text()) for name in stored]
        expected = {}
        for run in runs:
            s = run["settings"]
            if s["method"] == method:
                expected.setdefault(s["learning_rate"], []).append(run["summary"]["validation_loss"])
        means = {lr: sum(v) / len(v) for lr, v in expected.items()}
        assert float(selection["lr"]) == min(means, key=means.get)  # the hand-computed selection
    text = (out / "tune.md").read_text()
    assert "difference to lora" in text and "| nlora |" in text and (out / "tune.png").stat().st_size > 0
    nlora_row, difference = record["rows"]["nlora"], record["rows"]["nlora"]["difference"]
    assert record["margin"] == 0.5 and "against ±0.5" in text
    assert nlora_row["reading"] == (stats.read_difference(*difference[1:], 0.5) if difference else None)
    rc, _, err = nlora(*args)  # again: every run is read back, none trained
    assert rc == 0 and "validation loss" not in err

    # a run stored before validation rows existed (the first study's) is re-run; its record keeps the run it replaced
    path = out / "runs" / stored[0]
    first = json.loads(path.read_text())
    del first["summary"]["validation_loss"]
    first["summary"]["after_loss"] = 9.0
    path.write_text(json.dumps(first))
    rc, _, err = nlora(*args)
    assert rc == 0 and err.count("validation loss") == 1
    rerun = json.loads(path.read_text())
    assert "validation_loss" in rerun["summary"] and rerun["rerun_of_after_loss"] == 9.0
    assert rerun["first_run"] == {"summary": first["summary"], "metrics": first["metrics"]}


def test_the_first_studys_view_reads_a_rerun_record_as_first_stored(convergence, tmp_path):
    record = {"settings": TrainSettings(method="lora", learning_rate=1e-3).comparable(),
              "summary": {"after_loss": 0.5, "validation_loss": 0.5}, "metrics": [{"step": 1, "eval_loss": 0.5}],
              "first_run": {"summary": {"after_loss": 9.0}, "metrics": [{"step": 1, "eval_loss": 9.0}]}}  # fmt: skip
    search = convergence.FirstStudy(
        TrainSettings(), ["lora"], [0], tmp_path, tmp_path, train=False, metric="after_loss"
    )
    key = run_key(dataclasses.replace(TrainSettings(), method="lora", learning_rate=1e-3, seed=0))
    (tmp_path / f"{key}.json").write_text(json.dumps(record))
    read = search.run("lora", 1e-3, 0)
    assert read["summary"] == {"after_loss": 9.0} and read["metrics"] == [{"step": 1, "eval_loss": 9.0}]
    del record["first_run"]
    (tmp_path / f"{key}.json").write_text(json.dumps(record))
    assert search.run("lora", 1e-3, 0)["summary"]["after_loss"] == 0.5  # a run never re-run is read as it is


def test_runs_stored_before_a_nystrom_knob_existed_keep_their_key_and_match_only_the_init_they_used(tmp_path):
    """Square layers took column landmarks before nlora 0.2; the stored runs of that init keep their file names and
    are reused for a recipe that pins ``nystrom_square_landmarks="columns"`` (the study), never for the new default."""
    import dataclasses
    import json

    from nlora.cli.compare import run_key
    from nlora.cli.settings import recorded_settings

    new = TrainSettings(method="nlora", learning_rate=1e-3, max_steps=10)
    legacy = dataclasses.replace(new, nystrom_square_landmarks="columns")
    assert run_key(legacy) == "nlora-r8-lr0.001-seed0-steps10"  # what the store's files are already called
    assert run_key(new) == "nlora-r8-lr0.001-seed0-steps10-square-rows"
    old = legacy.comparable()
    del old["nystrom_square_landmarks"]  # a record written before the knob
    assert recorded_settings(old) == legacy.comparable() != new.comparable()
    lora = dataclasses.replace(new, method="lora").comparable()
    assert "nystrom_square_landmarks" not in lora and recorded_settings(lora) == lora

    store = tmp_path / "store"
    store.mkdir()
    summary = {"after_loss": 1.0, "validation_loss": 1.0, "before_loss": 2.0}
    (store / f"{run_key(legacy)}.json").write_text(json.dumps({"settings": old, "summary": summary, "metrics": []}))
    for base, found in ((legacy, True), (new, False)):
        search = RateSearch(base, ["nlora"], [0], store, tmp_path / "scratch", train=False, progress=None)
        assert (search.run("nlora", 1e-3, 0) is not None) == found


@pytest.mark.parametrize(
    "low, high, reading",
    [
        (-0.152, -0.141, "better, beyond the margin"),
        (-0.0036, 0.0195, "equivalent within ±0.02"),
        (0.001, 0.015, "equivalent within ±0.02 and worse"),
        (0.0008, 0.0330, "worse; whether beyond the margin is undecided"),
        (0.107, 0.163, "worse, beyond the margin"),
        (-0.0116, 0.1652, "inconclusive"),
    ],
)
def test_a_difference_ci_is_read_against_the_equivalence_margin(low, high, reading):
    assert stats.read_difference(low, high, 0.02) == reading


@given(st.floats(-1, 1), st.floats(0, 1), st.floats(0.001, 0.5))
def test_every_difference_ci_gets_the_one_reading_its_interval_supports(low, width, margin):
    high = low + width
    reading = stats.read_difference(low, high, margin)
    assert reading.startswith("equivalent") == (-margin < low and high < margin)
    assert reading.endswith("beyond the margin") == (low > margin or high < -margin)
    assert (reading == "inconclusive") == (low <= 0 <= high and not (-margin < low and high < margin))
    assert ("better" in reading) == (high < 0) and ("worse" in reading) == (low > 0)


def test_a_difference_is_printed_signed_with_a_true_minus():
    assert format_difference((-0.0303, -0.06581, 0.0051)) == "\u22120.0303 [\u22120.0658, +0.0051]"
    assert format_difference((0.1, 0.2, 0.3), 3) == "+0.100 [+0.200, +0.300]" and format_difference(None) == "–"


def test_every_rate_table_cell_says_how_many_seeds_it_holds_and_counts_collapses_apart(convergence):
    cell = convergence.rate_cell  # the second argument: the seeds whose run collapsed
    assert cell({}, set()) == ""
    assert cell({0: 0.4601}, set()) == "0.460 (seed 0)" and cell({2: 0.693}, {2}) == "0.693 (seed 2, collapsed)"
    assert cell({0: 0.693, 1: 0.70}, {0, 1}) == "all 2 seeds collapsed"
    assert cell({0: 0.40, 1: 0.693}, {1}) == "0.400 (1 seed; 1 of 2 collapsed)"
    # two kept seeds: their mean and both values (a 2-seed t-interval, ± 0.635 here, would reach below zero)
    assert cell({0: 0.4, 1: 0.5, 2: 0.693}, {2}) == "0.450 (seeds at 0.400 and 0.500, 1 collapsed)"
    # three or more: mean ± t-interval over the non-collapsed seeds only: 0.5 ± 4.303 * 0.1 / sqrt 3
    assert cell({0: 0.4, 1: 0.5, 2: 0.6, 3: 0.7}, {3}) == "0.500 ± 0.248 (n=3, 1 collapsed)"


def test_a_validation_rate_table_judges_collapse_on_the_reported_loss_where_the_rule_applies(convergence):
    # the bound (the base model's reported loss, 1.70) is not a bound on validation rows, whose base loss differs:
    # a run above it on validation but below it on the reported rows did not collapse, and the converse did
    reported = {"inttune": {2e-4: {0: 1.65, 1: 1.66, 2: 1.75}}}
    validation = {"inttune": {2e-4: {0: 1.72, 1: 1.73, 2: 1.69}}}
    table = convergence.rate_table(validation, reported, 1.70)
    assert "| inttune | 1.725 (seeds at 1.720 and 1.730, 1 collapsed) |" in table
    assert "| inttune | 1.655 (seeds at 1.650 and 1.660, 1 collapsed) |" in convergence.rate_table(
        reported, reported, 1.70
    )


def test_the_study_verdict_reads_each_comparison_and_names_what_is_missing(convergence):
    runs = {
        "lora": [fake_record(0, v) for v in (0.800, 0.801, 0.802)],
        "nlora": [fake_record(0, v) for v in (0.803, 0.804, 0.805)],
        "inttune": [fake_record(0, v) for v in (0.94, 0.95, 0.93)],
        "pissa": [fake_record(0, 0.82)],  # one seed: no interval
        "slora": [fake_record(0, v, before=6.75) for v in (1.8, 1.9, 0.81)],  # two of three collapsed (≥ 1.7)
    }
    rows = compare_selections({m: Selection(m, {}, {}, 1e-3, r) for m, r in runs.items()}, "lora", 1.7, margin=0.02)
    lines = convergence.verdict_lines(rows, "not compared yet")
    assert len(lines) == 4 and not any(line.startswith("- LoRA") for line in lines)
    assert lines[0].startswith("- NLoRA − LoRA = +0.0030") and "**equivalent within ±0.02 and worse**" in lines[0]
    assert "**worse, beyond the margin**" in lines[1] and "Holm p" in lines[1]
    assert lines[2] == "- PiSSA: not compared yet; 1 seed stored (held-out loss 0.8200)."
    assert lines[3] == (
        "- SLoRA: no interval: fewer than two seeds below the collapse bound; 3 seeds stored (held-out loss 0.8100); "
        "2 of 3 seeds collapsed (step-0 loss 6.75)."
    )

    # the Headlines bullet: both parts per task, LoRA's own loss, every method's reading or why it has none
    tuned = {"lora": Selection("lora", {}, {}, None, [])}
    bullet = convergence.headline({"math": {"shared": {"0.0002": rows}, "tuned_rows": {}, "tuned": tuned}})
    task = bullet.splitlines()[1]
    assert "LoRA 0.8010 ± 0.0025 (3 seeds); NLoRA +0.003 [" in task and "(equivalent within ±0.02 and worse; 3 " in task
    assert "SLoRA collapsed in 2 of 3 seeds, starting from 6.75" in task and "PiSSA: runs still to come" in task
    assert task.index("NLoRA") < task.index("IntTune") and task.endswith("LoRA's selection not complete yet.")


def test_the_study_says_how_each_rate_was_selected(convergence):
    selections = {"lora": Selection("lora", {}, {1e-3: 0.925, 3e-3: 0.889}, 3e-3, []),
                  "pissa": Selection("pissa", {1e-3: 0.9}, {}, None, [])}  # fmt: skip
    assert convergence.selected_on_validation(selections) == (
        "Selected on validation rows: LoRA 0.003 (mean validation loss 0.889 against 0.925 at 0.001)."
    )
    assert convergence.selected_on_validation({"pissa": selections["pissa"]}) == ""


@pytest.mark.parametrize("margin", [0.0, -0.02, math.inf, math.nan])
def test_a_margin_that_is_no_positive_loss_difference_is_refused(margin):
    from nlora.cli.settings import CompareSettings, SettingsError

    with pytest.raises(SettingsError, match="--margin must be a positive loss difference"):
        CompareSettings(tune=True, margin=margin).validate()


def test_the_study_plots_each_method_at_its_validated_rate_where_there_is_one(convergence, tmp_path):
    curve = [(15, 1.2), (30, 1.0)]
    runs = {m: [fake_record(0, 0.9, curve=curve)] for m in convergence.METHODS}
    tuned = {m: Selection(m, {}, {}, 3e-3 if m == "lora" else None, runs[m] if m == "lora" else []) for m in runs}
    earlier = {m: Selection(m, {}, {}, 1e-3, runs[m]) for m in runs}
    analysis = {"tuned": tuned, "earlier": earlier, "shared_runs": runs}
    chosen = convergence.own_rate_runs(analysis)
    assert chosen["lora"][0] == "lr 0.003, validated" and chosen["nlora"][0] == "lr 0.001, first study"
    convergence.plot({"math": analysis}, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG")
