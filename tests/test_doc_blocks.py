"""Every Python block and every ``nlora`` command in the README and docs/ runs, on tiny inputs, as a reader runs it.

A block is tested by default. A block that cannot run here says why on the line before its fence:
``<!-- not tested: REASON -->`` (the reason names the test that covers it instead). The blocks of one page run in
page order in one folder, as a reader goes down the page; each ``nlora`` line gets flags appended that swap the real
model and data for tiny ones (flags given later win), so a command that would fail for a reader (a folder an earlier
line filled, a missing file) fails here.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from cli_fixtures import arithmetic_rows, make_tiny_model, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(python|bash)\n(.*?)^```", re.S | re.M)
UNTESTED = re.compile(r"<!-- not tested: (.+?) -->\s*$")


def blocks() -> list[tuple[str, str, str, str | None]]:
    """(page, language, code, reason not tested) of every fenced Python or bash block."""
    found = []
    for page in PAGES:
        text = page.read_text()
        for match in FENCE.finditer(text):
            before = text[: match.start()].rstrip("\n").splitlines()
            untested = UNTESTED.search(before[-1]) if before else None
            found.append((page.relative_to(ROOT).as_posix(), match.group(1), match.group(2),
                          untested.group(1) if untested else None))  # fmt: skip
    return found


BLOCKS = blocks()
IDS = [f"{page}:{i}:{lang}" for i, (page, lang, _, _) in enumerate(BLOCKS)]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """One working folder per page, shared by its blocks in page order."""
    made = {}
    return lambda page: made.setdefault(page, tmp_path_factory.mktemp(page.replace("/", "-")))


@pytest.fixture(scope="module")
def namespaces():
    """One Python namespace per page: a later block uses what an earlier one defined, as a reader's session does."""
    made = {}
    return lambda page: made.setdefault(page, {"__name__": "__doc_block__"})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("doc-blocks")
    return {"model": str(make_tiny_model(root / "model", hidden=64)),
            "sft": str(write_jsonl(root / "arith.jsonl", arithmetic_rows(40)))}  # fmt: skip


def overrides(command: str, tiny: dict) -> list[str]:
    """Flags appended to a documented command: the tiny model and data, one step."""
    small = ["--max-eval-samples", "2", "--save-steps", "0"]
    if command in ("train", "demo", "compare"):
        return ["--model", tiny["model"], "--data", tiny["sft"], "--max-steps", "1", *small]
    if command == "eval":
        return ["--data", tiny["sft"], "--limit", "2", "--max-new-tokens", "2"]
    return []


def test_every_block_is_tested_or_says_why():
    assert BLOCKS, "no blocks found"
    for page, _, code, reason in BLOCKS:
        assert reason is None or len(reason) > 20, f"{page}: say why the block is not tested ({code[:60]!r})"


@pytest.mark.parametrize("page,language,code,reason", BLOCKS, ids=IDS)
def test_block_runs(page, language, code, reason, tiny, folders, namespaces, monkeypatch):
    if reason is not None:
        pytest.skip(reason)
    monkeypatch.chdir(folders(page))
    if language == "python":
        exec(compile(code, page, "exec"), namespaces(page))
        return
    from nlora.cli import main

    commands = [shlex.split(line.split("  #")[0]) for line in code.splitlines() if line.startswith("nlora ")]
    for argv in commands:
        if "--config" in argv:  # the reader's own settings file
            Path(argv[argv.index("--config") + 1]).write_text("max_steps: 1\n")
        extra = [] if "--help" in argv else overrides(argv[1], tiny)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main([*argv[1:], *extra])
        assert rc == 0, f"{page}: `{' '.join(argv)}` exited {rc}: {err.getvalue()[-1500:]}"
