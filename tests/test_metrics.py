"""Answer extraction and scoring on tricky strings."""

import pytest

from nlora.cli.metrics import (
    classification_metrics,
    extract_gsm8k_answer,
    extract_math_answer,
    gsm8k_gold,
    math_equivalent,
    numbers_equal,
    parse_number,
)


@pytest.mark.parametrize(
    "completion,expected",
    [
        ("So she earns 9 * 2 = 18 dollars.\n#### 18", 18),
        ("The answer is: 1,234.5", 1234.5),  # the authors' regex mis-parses this (one separator only)
        ("The answer is: -7", -7),
        ("The answer is: $1,000,000.", 1_000_000),
        ("The answer is: 3/4", 0.75),
        ("#### 12\nThe answer is: 15", 15),  # the last marker wins
        ("The answer is 42.", 42),
        ("First 5 apples, then 7 more, so 12 in total.", 12),  # no marker: last number
        ("It is .5 of the cake", 0.5),
        ("There is no number here", None),
        ("The answer is: +8", 8),
        ("#### 0", 0),
    ],
)
def test_gsm8k_extraction(completion, expected):
    got = extract_gsm8k_answer(completion)
    assert (got is None and expected is None) or numbers_equal(got, expected)


def test_gsm8k_gold_and_number_parsing():
    assert gsm8k_gold("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs.\n#### 18") == 18
    assert parse_number("1/0") is None and parse_number("2.50") == 2.5 and parse_number("-1,234") == -1234
    assert not numbers_equal(None, 3) and numbers_equal(18.0, 18)


@pytest.mark.parametrize(
    "completion,gold,correct",
    [
        ("so the result is $\\boxed{\\frac{1}{2}}$", "\\frac12", True),
        ("\\boxed{0.5}", "\\dfrac{1}{2}", True),
        ("\\boxed{x = 5}", "5", True),
        ("first \\boxed{3} then \\boxed{4}", "4", True),  # the last box counts
        ("\\boxed{\\sqrt{2}}", "\\sqrt2", True),
        ("\\boxed{10\\%}", "10", True),
        ("\\boxed{90^\\circ}", "90", True),
        ("\\boxed{1,000}", "1000", True),
        ("\\boxed{\\left( 1, 2 \\right)}", "(1,2)", True),
        ("The answer is: 7.", "7", True),
        ("\\boxed{3}", "4", False),
        ("no answer at all", "4", False),
        ("\\boxed{\\frac{3}{4}", "\\frac{3}{4}", False),  # unbalanced braces: no answer
    ],
)
def test_math_extraction_and_equivalence(completion, gold, correct):
    assert math_equivalent(extract_math_answer(completion), gold) is correct


def test_classification_metrics():
    logits = [[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 3.0]]
    scores = classification_metrics(logits, [0, 1, 1, 1], 2)
    assert scores["accuracy"] == 0.75
    assert 0 < scores["mcc"] < 1 and 0 < scores["f1"] < 1
    reg = classification_metrics([[0.1], [0.4], [0.35], [0.8]], [0.0, 1.0, 2.0, 3.0], 1)
    assert reg["spearman"] == pytest.approx(0.8) and 0.8 < reg["pearson"] < 1
