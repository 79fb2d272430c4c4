"""File helpers: output folders that never lose user files, atomic directory writes, safetensors-only reads.

One mechanism for every folder nlora writes (:class:`OutputFolder`: a run, an evaluation, a comparison, an export):
nothing nlora did not write is ever replaced, one writer at a time, and what replaces an old folder is complete
before the old one goes.
"""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import hashlib
import json
import os
import shutil
import sys
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


KINDS = {RUN_MARKER: "run", EXPORT_MARKER: "export", EVAL_MARKER: "eval", COMPARE_MARKER: "compare"}
# what each kind writes at its top level, for folders whose marker predates the manifest
DEFAULT_WRITES = {
    RUN_MARKER: ("run_config.json", "metrics.jsonl", "summary.json", "adapter", "merged", "residual-base",
                 "checkpoint-*"),
    EVAL_MARKER: ("predictions.jsonl", "score.json"),
    COMPARE_MARKER: ("compare.md", "compare.json", "compare.png", "*-seed*", "runs", "tune-runs", "tune.md",
                     "tune.json", "tune.png"),
}  # fmt: skip
LEFTOVERS = ("previous", "old", "tmp")  # .NAME.<kind>-... next to a folder: an interrupted replacement


class FolderBusy(RuntimeError):
    """Another nlora command holds the folder's lock."""


def _mode() -> int:
    """The permissions of a new folder under the process's umask (mkdtemp makes 0700 folders)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


def lock_file(path: Path) -> Path:
    """The lock file of an output folder: keyed by its absolute path, kept outside it (so that replacing the folder
    keeps the lock, and the user's folders get no lock files) in the user's runtime or temporary folder."""
    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32]
    folder = Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()) / f"nlora-locks-{os.getuid()}"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    return folder / f"{key}.lock"


def read_marker(path: Path) -> dict:
    """The marker file of an nlora output folder (its kind and the manifest of what it writes)."""
    for marker in KINDS:
        if (path / marker).is_file():
            try:
                content = json.loads((path / marker).read_text() or "{}")
            except json.JSONDecodeError:
                content = {}
            return {"marker": marker, "writes": content.get("writes") or list(DEFAULT_WRITES.get(marker, ()))}
    return {}


def foreign_entries(path: Path, writes: Iterable[str]) -> list[str]:
    """Entries at the top of ``path`` that no pattern of the manifest ``writes`` covers: not nlora's to replace."""
    writes = list(writes)
    return sorted(
        entry.name
        for entry in path.iterdir()
        if entry.name not in KINDS and not any(fnmatch.fnmatchcase(entry.name, pattern) for pattern in writes)
    )


class OutputFolder:
    """The one mechanism behind every folder nlora writes: a training run, an evaluation, a comparison, an export.

    - Symlinks are resolved first: the folder a link points to is the one checked and written.
    - The folder may neither be, contain, nor lie inside an input (data, adapter, model).
    - A folder nlora did not write (no marker), or another kind's folder, is never written into. A folder of this
      kind is replaced only with ``overwrite`` (or, for ``replace_own`` kinds whose outputs are reproducible, always),
      and only when every entry in it is in its manifest: the first foreign entry is named and nothing is written.
    - While writing, a lock (:func:`lock_file`) refuses a second writer.
    - Leftovers of an interrupted replacement next to the folder are restored (when the folder is gone) or removed
      (once a later command completes it), and each is reported.

    :meth:`check` writes nothing; :meth:`acquire` locks and cleans up; :meth:`release` finishes.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        marker: str,
        *,
        overwrite: bool = False,
        replace_own: bool = False,
        inputs: Iterable[str | os.PathLike | None] = (),
        what: str | None = None,
    ) -> None:
        self.given = Path(path)
        self.path = self.given.resolve() if self.given.is_symlink() else self.given
        self.marker, self.overwrite, self.replace_own = marker, overwrite, replace_own
        self.inputs, self.what = [s for s in inputs if s], what or KINDS[marker]
        self._lock = None

    def check(self, resume: bool = False) -> bool:
        """Refuse a destination we must not write; return whether an existing folder of ours will be replaced."""
        path, what = self.path, self.what
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(f"{self.given} is a file, not a folder; give a folder for the {what}.")
        if not path.name:
            raise ValueError(f"{self.given} names no folder of its own; give a folder for the {what}.")
        dst = path.resolve()
        for source in (Path(s) for s in self.inputs if Path(s).exists()):  # a name (gsm8k, a hub id) is no path
            src = source.resolve()
            if dst == src or src in dst.parents or dst in src.parents:
                raise ValueError(
                    f"The {what} folder {self.given} is, contains or lies inside the input {source}; "
                    "write it elsewhere."
                )
        if not path.exists() or not any(path.iterdir()):
            return False
        found = read_marker(path)
        if not found:
            first = sorted(entry.name for entry in path.iterdir())[0]
            raise FileExistsError(
                f"{self.given} holds '{first}', which nlora did not write (it is not an nlora {what} folder: it has no "
                f"{self.marker}); nlora never writes into such a folder, so choose another folder."
            )
        if found["marker"] != self.marker:
            raise FileExistsError(
                f"{self.given} is an nlora {KINDS[found['marker']]} folder, not a {what} folder; choose another folder."
            )
        if resume:  # continuing a run replaces nothing: files the user added to it stay as they are
            return True
        foreign = foreign_entries(path, found["writes"])
        if foreign:
            raise FileExistsError(
                f"{self.given} holds '{foreign[0]}', which nlora did not write; move it out or choose another folder "
                "(nlora replaces only the files its manifest lists)."
            )
        if not (self.overwrite or self.replace_own or resume):
            raise FileExistsError(
                f"{self.given} holds another nlora {what}; pass --overwrite to replace it, or choose another folder."
            )
        return True

    def leftovers(self) -> list[Path]:
        """Hidden folders an interrupted replacement of this folder left next to it."""
        parent, name = self.path.parent, self.path.name
        if not parent.is_dir():
            return []
        return sorted(p for kind in LEFTOVERS for p in parent.glob(f".{glob.escape(name)}.{kind}-*"))

    def acquire(self, resume: bool = False) -> bool:
        """Lock the folder (one writer at a time), restore or clean up leftovers, and check it again under the lock.

        Returns :meth:`check`'s answer.
        """
        from filelock import FileLock, Timeout

        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(lock_file(self.path), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise FolderBusy(
                f"Another nlora command is writing {self.given}; wait for it to finish or choose another folder."
            ) from None
        self._lock = lock
        try:
            for leftover in self.leftovers():
                if leftover.name.startswith(f".{self.path.name}.tmp-"):
                    shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
                    print(f"nlora: removed {leftover}, unfinished output of an interrupted command.", file=sys.stderr)
                elif not self.path.exists():
                    os.replace(leftover, self.path)
                    print(f"nlora: restored {self.given} from {leftover}, where an interrupted command had moved it.",
                          file=sys.stderr)  # fmt: skip
            return self.check(resume)
        except BaseException:
            self.release(finished=False)
            raise

    def write_marker(self, folder: Path | None = None, writes: Iterable[str] | None = None) -> None:
        """Mark ``folder`` (default: this folder) as this kind's, with the manifest of what it writes."""
        folder = folder or self.path
        writes = list(writes) if writes is not None else list(DEFAULT_WRITES.get(self.marker, ()))
        (folder / self.marker).write_text(json.dumps({"nlora": self.what, "writes": writes}) + "\n")

    def release(self, finished: bool = True) -> None:
        """Unlock; once the folder is complete, previous versions kept next to it are removed (and reported)."""
        try:
            if finished and self.path.exists():
                for leftover in self.leftovers():
                    if leftover.name.startswith((f".{self.path.name}.previous-", f".{self.path.name}.old-")):
                        shutil.rmtree(leftover, ignore_errors=True)
                        if not leftover.name.endswith(f"-{os.getpid()}"):  # our own is expected; an older one is news
                            print(f"nlora: removed {leftover}, the previous {self.what} that {self.given} replaced.",
                                  file=sys.stderr)  # fmt: skip
        finally:
            if self._lock is not None:
                self._lock.release()
                self._lock = None

    @contextlib.contextmanager
    def replacing(self, writes: Iterable[str] | None = None) -> Iterator[Path]:
        """Lock, then yield a temporary folder that replaces this one only if the block succeeds (an export, an
        evaluation): the manifest lists what the block wrote unless ``writes`` is given."""
        self.acquire()
        finished = False
        try:
            with atomic_directory(self.path) as tmp:
                yield tmp
                self.write_marker(tmp, writes if writes is not None else sorted(p.name for p in tmp.iterdir()))
            finished = True
        finally:
            self.release(finished)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory next to ``target`` and move it into place only if the block succeeds.

    A failure leaves any previous ``target`` untouched and removes the partial files. Callers check with
    :class:`OutputFolder` first whether ``target`` may be replaced (:meth:`OutputFolder.replacing` does both).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    os.chmod(tmp, _mode())  # readable like any folder the user makes, not mkdtemp's 0700
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
