"""Run PEFT's own ``tests/test_custom_models.py`` on NLoRA configs (a conformance check, not part of the suite).

    python tools/peft_upstream_tests.py [--workdir DIR] [-- extra pytest args]

It downloads the source distribution of the *installed* PEFT version from the package index (PEFT's tests ship in
it; nothing of PEFT is copied into this repository), adds NLoRA, SLoRA, IntTune and nlora_reference variants of
every LoRA case on the models nlora supports (MLP, embedding + transformers Conv1D), and runs the test file on them.
PEFT's test helpers need ``diffusers`` (``pip install -c constraints-cpu.txt diffusers``).

Two things are adapted for NLoRA, both in the shim written below:
- rank 2 (1 on the embedding model, whose Conv1D is 1 x 5): nlora refuses a rank above the matrix's smaller side;
- ``set_init_weights_false``, PEFT's helper for "an adapter that is not the identity at init", compares the config
  class exactly and so does not know ``NLoraConfig``: it gets ``init_lora_weights=False`` for SLoRA and
  ``residual=False`` for the Nyström inits (the same meaning).
The pickle tests are deselected: nlora never loads pickled adapters. docs/development.md lists what fails and why.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SHIM = '''
"""NLoRA variants of PEFT's LoRA test cases; written by nlora's tools/peft_upstream_tests.py."""
import nlora  # noqa: F401
from nlora import NLoraConfig
from nlora.config import _UNSUPPORTED_LORA_FEATURES
from peft import LoraConfig

from tests import test_custom_models as tcm
from tests import testing_utils as tu

MODELS = ("MLP", "EmbConv1D")
SKIP = (*_UNSUPPORTED_LORA_FEATURES, "alora_invocation_tokens", "arrow_config", "init_lora_weights")
INITS = {"NLoRA": {}, "SLoRA": {"init_lora_weights": "slora"}, "IntTune": {"train_intermediate_only": True},
         "NLoRAref": {"init_lora_weights": "nlora_reference"}}
for name, model_id, cls, kwargs in list(tcm.TEST_CASES):
    if cls is LoraConfig and model_id in MODELS and not any(kwargs.get(k) for k in SKIP):
        for label, extra in INITS.items():
            rank = {"r": 1 if model_id == "EmbConv1D" else 2}
            tcm.TEST_CASES.append((f"{name} [{label}]", model_id, NLoraConfig, {**rank, **kwargs, **extra}))

_original = tu.set_init_weights_false


def set_init_weights_false(config_cls, kwargs):
    if config_cls is not NLoraConfig:
        return _original(config_cls, kwargs)
    kwargs = dict(kwargs)
    if kwargs.get("init_lora_weights", "nlora") in ("slora", True):
        kwargs["init_lora_weights"] = False
    else:
        kwargs["residual"] = False
    return kwargs


tu.set_init_weights_false = tcm.set_init_weights_false = set_init_weights_false
'''


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", help="where to unpack PEFT's sources (default: a temporary folder)")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args()
    import peft

    work = Path(args.workdir or tempfile.mkdtemp(prefix="peft-upstream-"))
    work.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                    f"peft=={peft.__version__}", "-d", str(work)], check=True)  # fmt: skip
    sdist = next(work.glob(f"peft-{peft.__version__}.tar.gz"))
    with tarfile.open(sdist) as archive:
        archive.extractall(work, filter="data")
    root = work / f"peft-{peft.__version__}"
    tests = root / "tests"
    (tests / "__init__.py").touch()
    (tests / "nlora_cases.py").write_text(SHIM)
    conftest = tests / "conftest.py"  # not in every sdist
    old = conftest.read_text() if conftest.exists() else ""
    conftest.write_text(old + "\n\nfrom tests import nlora_cases  # noqa: E402,F401\n")
    selection = "(NLoRA or SLoRA or IntTune) and not pickle"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
           "tests/test_custom_models.py", "-k", selection, "-rf", *args.pytest_args]  # fmt: skip
    return subprocess.run(cmd, cwd=root).returncode


if __name__ == "__main__":
    sys.exit(main())
