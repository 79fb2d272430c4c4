"""``nlora eval --harness TASK``: lm-evaluation-harness on an (NLoRA) model object, without the hub.

The harness scores the model exactly as in the literature (its prompts, few-shot examples, filters and metric names,
e.g. GSM8K's ``exact_match,strict-match`` and ``exact_match,flexible-extract``). Offline (``HF_HUB_OFFLINE=1``,
nlora's default) or with ``--data``, ``gsm8k`` runs the harness's own task definition on the offline GSM8K split
(few-shot examples from its training part, scored on the held-out part, or on ``--data``); with the hub reachable it
is the harness's GSM8K (1,319 test problems). Any other task name is passed to the harness as it is, with
``--harness-include`` for local task YAMLs.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .settings import EvalSettings

OFFLINE_TASKS = {"gsm8k": "nlora_gsm8k"}


def _offline_gsm8k(folder: Path, data: str | None) -> None:
    """A task that includes the harness's gsm8k.yaml and swaps its hub dataset for local JSONL files."""
    import lm_eval

    from .assets import gsm8k_split
    from .data import load_rows

    test_rows = load_rows(data, "heldout") if data else gsm8k_split("heldout")
    for split, rows in (("train", gsm8k_split("train")), ("test", test_rows)):
        with (folder / f"{split}.jsonl").open("w") as handle:
            for row in rows:
                handle.write(json.dumps({"question": row["question"], "answer": row["answer"]}) + "\n")
    harness_yaml = Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k.yaml"
    (folder / "nlora_gsm8k.yaml").write_text(
        f"include: {harness_yaml}\ntask: nlora_gsm8k\ntag: []\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    train: {folder / 'train.jsonl'}\n    test: {folder / 'test.jsonl'}\n"
    )


def run_harness(settings: EvalSettings, model, tokenizer) -> tuple[dict[str, Any], list[dict]]:
    """The harness's metrics for ``settings.harness`` (its own names) and the per-example records."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise RuntimeError("--harness needs lm-evaluation-harness: pip install 'nlora[eval]'.") from err

    import torch

    with tempfile.TemporaryDirectory(prefix="nlora-harness-") as tmp:
        include = [tmp] + ([settings.harness_include] if settings.harness_include else [])
        offline = os.environ.get("HF_HUB_OFFLINE", "1") == "1" or settings.data is not None
        task = OFFLINE_TASKS.get(settings.harness, settings.harness) if offline else settings.harness
        if task == "nlora_gsm8k":
            _offline_gsm8k(Path(tmp), settings.data)
        manager = TaskManager(include_path=include)
        if task not in manager.all_tasks:
            raise ValueError(
                f"lm-evaluation-harness has no task '{settings.harness}' here; give a task name it knows, or a folder "
                "of task YAMLs with --harness-include."
            )
        lm = HFLM(
            pretrained=model,
            tokenizer=tokenizer,
            batch_size=settings.batch_size,
            device="cuda" if torch.cuda.is_available() else "cpu",
        )  # context length: the model's own
        out = simple_evaluate(model=lm, tasks=[task], task_manager=manager, limit=settings.limit,
                              num_fewshot=settings.num_fewshot, log_samples=True,
                              gen_kwargs={"max_gen_toks": settings.max_new_tokens})  # fmt: skip
    metrics = {k: v for k, v in out["results"][task].items() if k != "alias" and isinstance(v, (int, float))}
    records = [  # one per example and filter (e.g. strict-match, flexible-extract)
        {"doc_id": s.get("doc_id"), "filter": s.get("filter"), "doc": s.get("doc"), "target": s.get("target"),
         "responses": s.get("resps"), "filtered": s.get("filtered_resps"),
         **{k: s[k] for k in s if k.startswith("exact_match")}}
        for s in out["samples"][task]
    ]  # fmt: skip
    return {"harness_task": settings.harness, **metrics, "n": len({r["doc_id"] for r in records})}, records
