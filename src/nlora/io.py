"""Small file helpers: atomic directory writes and safetensors-only adapter reads."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary directory next to ``target`` and move it into place only if the block succeeds.

    A failure leaves any previous ``target`` untouched and removes the partial files.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; choose another path or allow overwriting.")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_adapter(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read ``adapter_config.json`` and ``adapter_model.safetensors`` from a local adapter directory.

    Pickled ``.bin`` weights are refused: they can run code when loaded.
    """
    path = Path(path)
    config_file, weights_file = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    if not config_file.is_file():
        raise FileNotFoundError(f"No {ADAPTER_CONFIG} in {path}; pass the directory that save_pretrained wrote.")
    if not weights_file.is_file():
        hint = (
            "; nlora does not load pickled adapter_model.bin files, re-save it with safetensors"
            if (path / "adapter_model.bin").exists()
            else ""
        )
        raise FileNotFoundError(f"No {ADAPTER_WEIGHTS} in {path}{hint}.")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file} is not valid JSON ({err}); the adapter directory is damaged.") from err
    try:
        tensors = load_file(weights_file)
    except Exception as err:  # safetensors raises its own error types for truncated or damaged files
        raise ValueError(f"{weights_file} is not a readable safetensors file ({err}); the adapter is damaged.") from err
    return config, tensors
