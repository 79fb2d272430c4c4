"""Data for the recipes: load rows (offline names, local files or hub datasets), check fields, tokenise."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from .assets import gsm8k_split, vader_movie_rows
from .settings import TrainSettings

FILE_LOADERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def load_rows(spec: str, split: str = "train") -> list[dict[str, Any]]:
    """Rows of ``spec``: an offline dataset name, a local .json/.jsonl/.csv/.parquet file or a hub dataset name."""
    if spec == "gsm8k":
        return gsm8k_split("train" if split == "train" else "heldout")
    if spec == "vader-movies":
        rows = vader_movie_rows()
        order = list(range(len(rows)))
        random.Random(1234).shuffle(order)  # fixed disjoint split: first 9,000 train, the rest held out
        return [rows[i] for i in (order[:9000] if split == "train" else order[9000:])]
    path = Path(spec)
    if path.suffix in FILE_LOADERS or path.exists():
        if path.is_dir():
            raise ValueError(f"Data '{spec}' is a folder; give a .json/.jsonl/.csv/.parquet file.")
        if not path.is_file():
            raise FileNotFoundError(f"Data file {path} does not exist.")
        if path.suffix not in FILE_LOADERS:
            raise ValueError(f"Data file {path} must end in {', '.join(FILE_LOADERS)}.")
        raw = path.read_bytes()
        if not raw.strip():
            raise ValueError(f"Data '{spec}' has no rows.")
        if path.suffix != ".parquet":
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"Data file {path} is not UTF-8 text (byte {err.start}); save it as UTF-8.") from err
        import datasets

        try:
            table = datasets.load_dataset(FILE_LOADERS[path.suffix], data_files=str(path), split="train")
        except Exception as err:
            raise ValueError(f"Data file {path} could not be read ({err.__class__.__name__}: {err}).") from err
        rows = table.to_list()
    else:
        import datasets

        try:
            rows = datasets.load_dataset(spec, split=split).to_list()
        except Exception as err:
            raise ValueError(
                f"Data '{spec}' is neither an offline dataset (gsm8k, vader-movies), a local file nor a reachable "
                f"Hugging Face dataset ({err.__class__.__name__})."
            ) from err
    if not rows:
        raise ValueError(f"Data '{spec}' has no rows.")
    return rows


def check_fields(rows: list[dict[str, Any]], fields: list[str], source: str) -> None:
    """Every field must exist as a column and hold a value in every row; errors name the columns or the row."""
    columns = sorted(rows[0].keys())
    for name in fields:
        if name not in columns:
            raise ValueError(
                f"Field '{name}' is not a column of {source}; its columns are {columns} (set the *-field options)."
            )
    for index, row in enumerate(rows):
        for name in fields:
            value = row.get(name)
            if value is None or (isinstance(value, str) and not value.strip()):
                raise ValueError(f"Row {index} of {source} has no value for '{name}'; fix or drop that row.")


def train_and_eval_rows(
    settings: TrainSettings,
) -> tuple[list[dict], list[dict], list[dict], list[str] | None]:
    """Training, held-out and validation rows with the task's fields checked, and the label names of
    string-labelled data. The validation rows are the ``validation_samples`` held-out rows after the reported ones."""
    rows = load_rows(settings.data, "train")
    if settings.eval_data:
        eval_rows = load_rows(settings.eval_data, "test")
    elif settings.data in ("gsm8k", "vader-movies"):
        eval_rows = load_rows(settings.data, "heldout")
    else:  # split off a fixed-seed held-out part
        order = list(range(len(rows)))
        random.Random(settings.seed).shuffle(order)
        n_eval = max(1, int(len(rows) * settings.eval_fraction))
        if len(rows) - n_eval < 1:
            raise ValueError(f"Data '{settings.data}' has {len(rows)} rows: too few to split off a held-out set.")
        eval_rows, rows = [rows[i] for i in order[:n_eval]], [rows[i] for i in order[n_eval:]]
    fields = task_fields(settings)
    check_fields(rows, fields, settings.data)
    check_fields(eval_rows, fields, settings.eval_data or f"{settings.data} (held-out)")
    if settings.max_train_samples:
        rows = rows[: settings.max_train_samples]
    validation_rows = []
    if settings.max_eval_samples:
        end = settings.max_eval_samples + settings.validation_samples
        if settings.validation_samples and len(eval_rows) < end:
            raise ValueError(
                f"The held-out rows of '{settings.data}' are {len(eval_rows)}, fewer than --max-eval-samples plus "
                f"--validation-samples ({end}); lower one of them."
            )
        eval_rows, validation_rows = eval_rows[: settings.max_eval_samples], eval_rows[settings.max_eval_samples : end]
    names = label_ids(rows, eval_rows + validation_rows, settings) if settings.task == "classification" else None
    return rows, eval_rows, validation_rows, names


def label_ids(rows: list[dict], eval_rows: list[dict], settings: TrainSettings) -> list[str] | None:
    """Check the classification labels; label names ("positive", ...) become sorted ids in place.

    Returns the names (id order) for the model's ``id2label``, or None when the labels are already numbers.
    """
    field, n = settings.label_field, settings.num_labels
    values = [row[field] for row in rows + eval_rows]
    if n == 1:  # regression
        bad = next((v for v in values if not isinstance(v, (int, float)) or isinstance(v, bool)), None)
        if bad is not None:
            raise ValueError(f"Label {bad!r} in '{field}' is not a number, which --num-labels 1 (regression) needs.")
        return None
    if all(isinstance(v, str) and not v.strip().lstrip("-").isdigit() for v in values):
        names = sorted(set(values))
        if len(names) != n:
            raise ValueError(
                f"The labels in '{field}' have {len(names)} names {names[:8]} but --num-labels is {n}; "
                f"set --num-labels {len(names)}."
            )
        index = {name: i for i, name in enumerate(names)}
        for row in rows + eval_rows:
            row[field] = index[row[field]]
        return names
    for v in values:
        try:
            ok = float(v) == int(float(v)) and 0 <= int(float(v)) < n
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(
                f"Label {v!r} in '{field}' is not a class id in 0..{n - 1}; fix the data or set --num-labels "
                "(label names such as 'positive' work when every label is a name)."
            )
    return None


def task_fields(settings: TrainSettings) -> list[str]:
    if settings.task == "sft":
        return [settings.prompt_field, settings.response_field]
    return [settings.text_field, settings.label_field] + (
        [settings.text_pair_field] if settings.text_pair_field else []
    )


def sft_prompt(settings: TrainSettings, row: dict[str, Any]) -> str:
    return settings.prompt_template.format(prompt=row[settings.prompt_field])


def tokenize_sft(rows: list[dict], tokenizer, settings: TrainSettings) -> list[dict[str, list[int]]]:
    """Prompt + response token ids with the loss masked (-100) on the prompt, truncated to max_length."""
    from tqdm.auto import tqdm

    suffix = settings.response_suffix or (tokenizer.eos_token or "")
    examples = []
    for row in tqdm(rows, desc="tokenising", unit="row", leave=False):
        prompt_ids = tokenizer(sft_prompt(settings, row), add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(" " + str(row[settings.response_field]) + suffix, add_special_tokens=False)[
            "input_ids"
        ]
        ids = (prompt_ids + response_ids)[: settings.max_length]
        labels = ([-100] * len(prompt_ids) + response_ids)[: settings.max_length]
        if all(label == -100 for label in labels):
            continue  # the prompt alone fills max_length: nothing to learn from this row
        examples.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    if not examples:
        raise ValueError(f"Every prompt of '{settings.data}' is longer than max_length={settings.max_length}.")
    return examples


def tokenize_classification(rows: list[dict], tokenizer, settings: TrainSettings) -> list[dict[str, Any]]:
    """Text (and optional pair) token ids with integer labels (float labels for regression)."""
    from tqdm.auto import tqdm

    examples = []
    for row in tqdm(rows, desc="tokenising", unit="row", leave=False):
        pair = row[settings.text_pair_field] if settings.text_pair_field else None
        encoded = tokenizer(str(row[settings.text_field]), pair, truncation=True, max_length=settings.max_length)
        value = row[settings.label_field]
        label = float(value) if settings.num_labels == 1 else int(float(value))
        examples.append(
            {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"], "labels": label}
        )
    return examples
