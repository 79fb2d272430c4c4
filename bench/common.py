"""Shared helpers of the benchmark scripts: machine facts, peak-memory probes, interleaved timing, outputs."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from nlora.files import write_atomic

DOCS = Path(__file__).resolve().parents[1] / "docs"
RESULTS = Path(os.environ.get("NLORA_BENCH_RESULTS", DOCS / "bench-results"))


def machine() -> dict:
    """What the numbers were measured on."""
    import peft
    import transformers

    import nlora

    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "nlora": nlora.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    return 0


def peak_rss_delta(fn: Callable[[], object]) -> tuple[object, float]:
    """Run ``fn``; return its result and the growth of peak resident memory in MiB (Linux: VmHWM reset)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
    except OSError:
        pass
    before = _status("VmRSS:")
    result = fn()
    return result, max(0, _status("VmHWM:") - before) / 2**20


def interleaved(candidates: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Time each candidate ``repeats`` times in round-robin order (A B C A B C ...): noise hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def write_results(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    write_atomic(path, json.dumps(payload, indent=2))
    return path


def markdown(headers: list[str], rows: list[list[object]]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def update_section(section: str, body: str, doc: Path = DOCS / "benchmarks.md") -> None:
    """Replace ``<!-- section -->`` ... ``<!-- /section -->`` in ``doc`` (docs/benchmarks.md) with ``body``; a new
    section is appended to docs/benchmarks.md only, never to another page (the README's place is chosen by hand)."""
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    start, end = f"<!-- {section} -->", f"<!-- /{section} -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    elif doc == DOCS / "benchmarks.md":
        text = text.rstrip() + "\n\n" + block + "\n"
    else:
        raise SystemExit(f"{doc} has no '{start}' marker; add the marker pair where the section belongs.")
    write_atomic(doc, text)
