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
The pickle tests are deselected (nlora never loads pickled adapters), and so are three cases that PEFT special-cases
for its own methods in the same way (``DESELECTED`` below says which and why).
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
import os

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
    elif "fsdp_wrapped" not in os.environ.get("PYTEST_CURRENT_TEST", ""):
        kwargs["residual"] = False
    # the FSDP round trip saves with this config and reloads into a model made with the case's own config: a
    # residual init must keep its (residual) base on both sides, so the case's config is used for both
    return kwargs


# Cases PEFT's own tests special-case for its methods, and that nlora's methods meet the same way:
DESELECTED = {
    ("test_disable_adapters", "[NLoRAref]"): "the authors' init is not the identity at init (PEFT zeroes AdaLoRA's, "
    "VB-LoRA's and UniLoRA's non-identity inits for this test, and skips KaSA)",
    ("test_disable_adapters_with_merging", "[NLoRAref]"): "the same",
    ("test_parameters_after_loading_model", "Vanilla MLP 4 LoRA [NLoRA"): "SGD at lr 0.5 on a summed loss diverges "
    "to NaN for a residual init (PEFT lowers the rate for DoRA, HiRA, VB-LoRA and others: 'otherwise we get nan'); "
    "nlora refuses to load a NaN checkpoint",
}


def pytest_collection_modifyitems(config, items):
    kept, dropped = [], []
    for item in items:
        name = item.originalname or item.name
        hit = next((why for (test, case), why in DESELECTED.items() if name == test and case in item.name), None)
        (dropped if hit else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


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
    line = "from tests.nlora_cases import pytest_collection_modifyitems  # noqa: E402,F401\n"
    if line not in old:
        conftest.write_text(old + "\n\n" + line)
    selection = "(NLoRA or SLoRA or IntTune) and not pickle"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
           "tests/test_custom_models.py", "-k", selection, "-rf", *args.pytest_args]  # fmt: skip
    return subprocess.run(cmd, cwd=root).returncode


if __name__ == "__main__":
    sys.exit(main())
