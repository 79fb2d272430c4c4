"""A generated matrix: every subcommand that writes a folder x every state that folder can be in x with and without
--overwrite, and (with hypothesis) bad settings crossed with those states. Nobody listed these cases one by one.

Each case asserts what every case must: the exit code is 0, 2 or 130, nothing escapes as a traceback, every file
that nlora did not write is byte-identical afterwards (also through a symlink), and the inputs are untouched. The
cases run ``nlora`` in this process (tests/test_cli.py covers the process boundary; one subprocess sample below).
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from cli_fixtures import arithmetic_rows, make_tiny_model, write_jsonl
from nlora.files import KINDS, lock_file, read_marker
from test_cli_safety import nlora, train_args

COMMANDS = ("train", "eval", "compare", "export")
MARKER_OF = {"train": ".nlora-run", "eval": ".nlora-eval", "compare": ".nlora-compare", "export": ".nlora-export"}
STATES = ("new", "empty", "own", "own+user-file", "other-kind", "user-files", "a-file", "symlink-to-own",
          "dangling-symlink", "unwritable", "locked", "interrupted-replacement")  # fmt: skip


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The tiny model, its data, one trained run and one folder of each command's own kind (templates to copy)."""
    root = tmp_path_factory.mktemp("matrix")
    model = make_tiny_model(root / "model")
    data = write_jsonl(root / "arith.jsonl", arithmetic_rows(24))
    paths = {"model": model, "data": data, "root": root}
    templates = root / "templates"
    for command in COMMANDS:
        rc, _, err = nlora(*command_args(command, paths, templates / command))
        assert rc == 0, err[-2000:]
    paths["run"] = root / "run"  # the run that eval and export read: a copy, so the templates stay templates
    shutil.copytree(templates / "train", paths["run"], symlinks=True)
    paths["templates"] = templates
    return paths


def command_args(command: str, paths: dict, out: Path, *extra: str) -> list[str]:
    """A valid invocation of ``command`` writing to ``out`` (the run it reads is the train template)."""
    adapter = paths.get("run", paths["root"] / "templates" / "train") / "adapter"
    if command == "train":
        return ["train", *train_args(paths["model"], paths["data"], out, "--max-steps", "1"), *extra]
    if command == "compare":
        return ["compare", *train_args(paths["model"], paths["data"], out, "--max-steps", "1"), "--methods", "lora",
                *extra]  # fmt: skip
    if command == "eval":
        return ["eval", "--adapter", adapter, "--data", paths["data"], "--limit", "2", "--max-new-tokens", "1",
                "--output-dir", out, *extra]  # fmt: skip
    return ["export", "--adapter", adapter, "--out", out, *extra]


def make_state(state: str, command: str, case: Path, paths: dict) -> Path:
    """Put the output path of one case into ``state``; return the path to pass as the output folder."""
    out = case / "out"
    own, other = paths["templates"] / command, paths["templates"] / ("eval" if command != "eval" else "export")
    if state == "empty":
        out.mkdir()
    elif state in ("own", "own+user-file", "locked"):
        shutil.copytree(own, out, symlinks=True)
        if state == "own+user-file":
            (out / "notes.txt").write_text("my notes\n")
    elif state == "other-kind":
        shutil.copytree(other, out, symlinks=True)
    elif state == "user-files":
        (out / "src").mkdir(parents=True)
        (out / "src" / "main.py").write_text("print('mine')\n")
        (out / "score.json").write_text('{"mine": 1}\n')  # named like nlora's own outputs
        (out / "summary.json").write_text('{"mine": 1}\n')
    elif state == "a-file":
        out.write_text("a file, not a folder\n")
    elif state == "symlink-to-own":
        shutil.copytree(own, case / "real", symlinks=True)
        out.symlink_to(case / "real")
    elif state == "dangling-symlink":
        out.symlink_to(case / "not-yet")
    elif state == "unwritable":
        return Path("/proc/nlora-matrix/out")  # a read-only file system, even for root
    elif state == "interrupted-replacement":  # the command was killed between moving the old folder and the rename
        shutil.copytree(own, case / f".out.previous-{os.getpid() + 1}", symlinks=True)
    return out


def snapshot(case: Path) -> dict[str, bytes | str]:
    """Every file and link under ``case`` that nlora did not write: those under a folder of nlora's own kind that
    its manifest covers are nlora's to replace."""
    files = {}
    for path in sorted(case.rglob("*")):
        if path.is_symlink():
            files[str(path.relative_to(case))] = f"-> {os.readlink(path)}"
            continue
        if not path.is_file() or path.name in KINDS:
            continue
        owner = next((p for p in path.parents if p != case.parent and read_marker(p)), None)
        if owner is not None:
            from nlora.files import foreign_entries

            top = path.relative_to(owner).parts[0]
            if top not in foreign_entries(owner, read_marker(owner)["writes"]):
                continue  # in the manifest: nlora's own output
        files[str(path.relative_to(case))] = path.read_bytes()
    return files


def inputs_snapshot(paths: dict) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted([paths["data"], *paths["model"].rglob("*"),
                                                   *paths["run"].rglob("*")]) if p.is_file()}  # fmt: skip


def run_case(command: str, state: str, extra: tuple[str, ...], case: Path, paths: dict) -> tuple[int, str]:
    case.mkdir(parents=True)
    out = make_state(state, command, case, paths)
    before, inputs_before = snapshot(case), inputs_snapshot(paths)
    lock = None
    if state == "locked":  # another nlora command is writing this folder
        from filelock import FileLock

        lock = FileLock(lock_file(out), timeout=0)
        lock.acquire()
    try:
        rc, _, err = nlora(*command_args(command, paths, out, *extra))  # an exception here is the traceback
    finally:
        if lock is not None:
            lock.release()
    assert rc in (0, 2, 130), err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    if rc == 2:
        assert len([line for line in err.splitlines() if line.startswith("nlora: error: ")]) == 1, err[-2000:]
    after = snapshot(case)
    assert {k: v for k, v in after.items() if k in before} == before, f"{command} {state} {extra}: {err[-1500:]}"
    assert inputs_snapshot(paths) == inputs_before
    return rc, err


CASES = list(itertools.product(COMMANDS, STATES, [(), ("--overwrite",)]))
CASES = [c for c in CASES if not (c[0] in ("eval", "compare") and c[2])]  # they have no --overwrite


@pytest.mark.parametrize("command,state,extra", CASES, ids=["-".join([c, s, *e]) for c, s, e in CASES])
def test_every_command_in_every_folder_state(inputs, tmp_path, command, state, extra):
    rc, err = run_case(command, state, extra, tmp_path / "case", inputs)
    out = tmp_path / "case" / "out"
    must_refuse = {"own+user-file", "other-kind", "user-files", "a-file", "unwritable", "locked"}
    if command == "train" and not extra:  # another run is replaced only when asked (also one restored first)
        must_refuse |= {"own", "symlink-to-own", "interrupted-replacement"}
    assert (rc == 2) == (state in must_refuse), err[-1500:]
    if rc == 0:  # what was written is a complete folder of the command's kind, with its manifest
        real = out.resolve()
        assert read_marker(real)["marker"] == MARKER_OF[command]
        assert oct(real.stat().st_mode & 0o777) == oct(0o777 & ~_umask())
        assert not list(real.parent.glob(".out.*")), "a leftover of the replacement stayed behind"
        if state.endswith("symlink") or state == "symlink-to-own":
            assert out.is_symlink()  # the link still points to the (updated) folder
    if state == "interrupted-replacement":  # put back first, and said so
        assert "interrupted command" in err
        assert read_marker(out)["marker"] == MARKER_OF[command]


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


BAD_SETTINGS = {
    "train": [("--lora-alpha", "nan"), ("--lora-alpha", "inf"), ("--weight-decay", "nan"), ("--learning-rate", "-1"),
              ("--target-modules", "q_proj, nope"), ("--prompt-template", "{question}"), ("--prompt-template", "{0}"),
              ("--max-length", "100000"), ("--r", "0"), ("--max-steps", "0"), ("--eval-fraction", "1.5"),
              ("--warmup-ratio", "nan"), ("--validation-samples", "-1"), ("--num-labels", "0")],
    "eval": [("--limit", "-3"), ("--batch-size", "0"), ("--task", "nope"), ("--max-new-tokens", "0"),
             ("--limit", "0")],
    "compare": [("--methods", "lora,lora"), ("--seeds", "0,0"), ("--methods", "nope"), ("--lora-alpha", "nan"),
                ("--seeds", "x")],
    "export": [("--adapter", "/nonexistent/adapter"), ("--model", "/nonexistent/model")],
}  # fmt: skip
BAD = [(command, flag, value) for command, pairs in BAD_SETTINGS.items() for flag, value in pairs]


@hypothesis_settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bad=st.sampled_from(BAD), state=st.sampled_from(STATES))
def test_bad_settings_in_any_folder_state_are_one_line_and_change_nothing(inputs, tmp_path, bad, state):
    command, flag, value = bad
    case = Path(tempfile.mkdtemp(dir=tmp_path)) / "case"  # hypothesis replays examples: a fresh folder each
    rc, err = run_case(command, state, (flag, value), case, inputs)
    assert rc == 2, f"{command} {flag} {value} in {state}: {err[-1500:]}"


def test_the_process_boundary_sample(inputs, tmp_path):
    """A few cases through ``python -m nlora``: exit code 2, one line, no traceback, nothing written."""
    for command, state in (("train", "own+user-file"), ("export", "locked")):
        case = tmp_path / f"{command}-{state}"
        case.mkdir()
        out = make_state(state, command, case, inputs)
        before = snapshot(case)
        lock = None
        if state == "locked":
            from filelock import FileLock

            lock = FileLock(lock_file(out), timeout=0)
            lock.acquire()
        try:
            args = [str(a) for a in command_args(command, inputs, out)]
            done = subprocess.run([sys.executable, "-m", "nlora", *args], capture_output=True, text=True, timeout=300)
        finally:
            if lock is not None:
                lock.release()
        assert done.returncode == 2, done.stderr[-2000:]
        assert "Traceback" not in done.stderr
        assert snapshot(case) == before
