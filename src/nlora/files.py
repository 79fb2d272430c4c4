"""File helpers: output folders that never lose user files, atomic directory writes, safetensors-only reads.

One rule for every folder nlora writes (a training run, an export): a folder that holds files nlora did not write
(recognised by the absence of its marker file) is never replaced unless the user explicitly asks, and what replaces
an old folder is complete before the old one goes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
RUN_MARKER = ".nlora-run"  # in every folder that `nlora train` created
EXPORT_MARKER = ".nlora-export"  # in every folder that export_lora / `nlora export` wrote
EVAL_MARKER = ".nlora-eval"  # in every folder that `nlora eval` wrote
COMPARE_MARKER = ".nlora-compare"  # in every folder that `nlora compare` wrote
# Saved next to an adapter's tensors (``<module>.nystrom_fingerprint``) when its load must check the base weight (a
# residual, an N-only checkpoint, an adapter made for a residual base): compared with the base it is loaded onto.
FINGERPRINT_SUFFIX = "nystrom_fingerprint"


def check_destination(
    path: str | os.PathLike, marker: str, what: str, overwrite: bool, inputs: Iterable[str | os.PathLike | None] = ()
) -> bool:
    """Refuse a destination folder we must not write; return whether an existing folder of ours will be replaced.

    ``marker`` names folders nlora wrote itself. A non-empty folder without it is replaced only with ``overwrite``
    when ``what`` is an export; any other kind of output folder without it never is. The folder may neither be,
    contain, nor lie inside any of ``inputs`` (the adapter, data or model the command reads).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} is a file, not a folder; give a folder for the {what}.")
    dst = path.resolve()
    for source in (Path(s) for s in inputs if s and Path(s).exists()):  # a name (gsm8k, a hub id) is no path
        src = source.resolve()
        if dst == src or src in dst.parents or dst in src.parents:
            raise ValueError(
                f"The {what} folder {path} is, contains or lies inside the input {source}; write it elsewhere."
            )
    if not path.exists() or not any(path.iterdir()):
        return False
    if (path / marker).exists():
        return True
    if overwrite and marker == EXPORT_MARKER:
        return True
    if marker == EXPORT_MARKER:
        raise FileExistsError(
            f"{path} is not empty and is not an nlora export; pass --overwrite to replace it, or choose another folder."
        )
    raise FileExistsError(
        f"{path} is not empty and is not an nlora {what} folder (it has no {marker}); nlora never replaces such a "
        "folder, so choose another --output-dir."
    )


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, marker: str | None = None) -> Iterator[Path]:
    """Yield a temporary directory next to ``target`` and move it into place only if the block succeeds.

    A failure leaves any previous ``target`` untouched and removes the partial files. Callers check with
    :func:`check_destination` first whether ``target`` may be replaced; ``marker`` is written into the new folder.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if marker:
            (tmp / marker).write_text("{}\n")
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


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: never a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


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
