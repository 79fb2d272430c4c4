"""Task metrics: answer extraction for GSM8K / MATH, HumanEval pass@1, and GLUE-style classification scores."""

from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import Any

import numpy as np

_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*[-+]?\d+(?:\.\d+)?)?|[-+]?\.\d+")


def parse_number(text: str) -> float | None:
    """A number written with thousands commas, a sign, decimals or a fraction (``-1,234.5``, ``3/4``), else None."""
    text = text.strip().replace("$", "").replace("\\!", "")
    match = _NUMBER.search(text)
    if not match:
        return None
    token = match.group(0).replace(",", "").replace(" ", "")
    try:
        if "/" in token:
            numerator, denominator = token.split("/")
            return float(Fraction(numerator) / Fraction(denominator)) if float(denominator) != 0 else None
        return float(token)
    except (ValueError, ZeroDivisionError):
        return None


def extract_gsm8k_answer(completion: str) -> float | None:
    """The answer after the last "The answer is:" or "####", else the last number in the completion."""
    for marker in ("The answer is:", "The answer is", "####"):
        if marker in completion:
            value = parse_number(completion.rsplit(marker, 1)[1].split("\n")[0] or completion.rsplit(marker, 1)[1])
            if value is not None:
                return value
    numbers = list(_NUMBER.finditer(completion))
    return parse_number(numbers[-1].group(0)) if numbers else None


def gsm8k_gold(answer: str) -> float | None:
    """GSM8K's reference answer: the number after ``####``."""
    return parse_number(answer.rsplit("####", 1)[-1])


def numbers_equal(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6)


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) with balanced braces."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    brace = text.find("{", start)
    if brace < 0:
        rest = text[start:].split(" ", 1)  # "\boxed 5"
        return rest[1].split("$")[0].strip() if len(rest) > 1 else None
    depth = 0
    for i in range(brace, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[brace + 1 : i]
    return None


def normalize_math(answer: str) -> str:
    """Hendrycks-style normalisation of a MATH answer string for equivalence checks."""
    s = answer.strip().replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac").replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\$", "").replace("$", "")
    s = re.sub(r"\\text\{\s*[a-zA-Z ]*\}$", "", s)  # trailing units
    s = s.replace("\\%", "").replace("%", "").replace(" .", " 0.").replace("{.", "{0.")
    if s.startswith("."):
        s = "0" + s
    if len(s.split("=")) == 2 and len(s.split("=")[0]) <= 2:  # "x = 5" -> "5"
        s = s.split("=")[1]
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\{([^{}]+)\}(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)
    s = s.replace(" ", "")
    if re.fullmatch(r"\d+/\d+", s):
        a, b = s.split("/")
        s = f"\\frac{{{a}}}{{{b}}}"
    if s == "0.5":
        s = "\\frac{1}{2}"
    s = re.sub(r"(\d),(\d{3})", r"\1\2", s)
    s = s.rstrip(".")
    return s


def extract_math_answer(completion: str) -> str | None:
    """The model's MATH answer: the last ``\\boxed{}``, else the text after "The answer is:"."""
    boxed = last_boxed(completion)
    if boxed is not None:
        return boxed
    if "The answer is" in completion:
        return completion.rsplit("The answer is", 1)[1].lstrip(": ").split("\n")[0].rstrip(".").strip()
    return None


def math_equivalent(prediction: str | None, gold: str) -> bool:
    """Normalised string equality, with a numeric fallback (``0.50`` == ``\\frac{1}{2}``)."""
    if prediction is None:
        return False
    a, b = normalize_math(prediction), normalize_math(gold)
    if a == b:
        return True
    x, y = _frac_value(a), _frac_value(b)
    return x is not None and y is not None and math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-9)


def _frac_value(s: str) -> float | None:
    match = re.fullmatch(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}", s)
    if match:
        sign = -1 if match.group(1) else 1
        return sign * int(match.group(2)) / int(match.group(3)) if int(match.group(3)) else None
    try:
        return float(s)
    except ValueError:
        return None


def classification_metrics(predictions: Any, labels: Any, num_labels: int) -> dict[str, float]:
    """Accuracy, macro F1 and Matthews correlation for classes; Pearson and Spearman for regression (num_labels=1)."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    predictions = np.asarray(predictions[0] if isinstance(predictions, tuple) else predictions)
    labels = np.asarray(labels)
    if num_labels == 1:
        scores = predictions.reshape(-1)
        return {"pearson": float(pearsonr(scores, labels)[0]), "spearman": float(spearmanr(scores, labels)[0])}
    predicted = predictions.argmax(-1)
    return {
        "accuracy": float(accuracy_score(labels, predicted)),
        "f1": float(f1_score(labels, predicted, average="macro")),
        "mcc": float(matthews_corrcoef(labels, predicted)),
    }
