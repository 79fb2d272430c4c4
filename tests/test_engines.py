"""Real distributed engines on CPU: DeepSpeed ZeRO-3 and FSDP2, 2 processes over gloo.

Each test launches ``torchrun --nproc_per_node 2`` on a script in tests/distributed/ that compares against one
plain process and asserts inside; here we check its exit code and reload what it saved in this process.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from models import build

SCRIPTS = Path(__file__).parent / "distributed"


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    build("llama")[0].save_pretrained(path)
    return path


def torchrun(script: str, *args, env: dict | None = None) -> None:
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(SCRIPTS.parent),
        **(env or {}),
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(SCRIPTS / script),
        *args,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def test_deepspeed_zero3_every_init_matches_one_process_and_saves(llama_dir, tmp_path):
    pytest.importorskip("deepspeed")
    # a private extensions folder holding what a killed first JIT build leaves: its lock (a run that built the
    # shared-memory op would wait on it forever; the test's 600 s timeout would fail it)
    extensions = tmp_path / "torch_extensions"
    (extensions / "deepspeed_shm_comm").mkdir(parents=True)
    (extensions / "deepspeed_shm_comm" / "lock").touch()
    torchrun("zero3.py", str(llama_dir), str(tmp_path), env={"TORCH_EXTENSIONS_DIR": str(extensions)})
    report = json.loads((tmp_path / "report.json").read_text())
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(0))
    for name in ("nlora", "nlora_reference", "slora", "inttune"):
        assert report[name]["refusal"].startswith("Cannot save adapter 'default': ")
        assert not any((tmp_path / "refused").glob("*.safetensors")), "a refused save wrote weights"
        base = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
        loaded = PeftModel.from_pretrained(base, tmp_path / name).eval()
        with torch.no_grad():
            logits = loaded(input_ids=ids).logits
        expected = torch.load(tmp_path / f"{name}.one_process_logits.pt", weights_only=True)
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4, msg=name)  # 3 Adam steps apart


def test_fsdp2_matches_one_process_and_rank0_only_weights_sync(llama_dir, tmp_path):
    torchrun("fsdp2.py", str(llama_dir), str(tmp_path))
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(0))
    base = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        logits = loaded(input_ids=ids).logits
    expected = torch.load(tmp_path / "one_process_logits.pt", weights_only=True)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_meta_base_without_a_process_group_is_refused_with_the_way_out():
    from peft import get_peft_model
    from transformers import LlamaForCausalLM

    from conftest import make_config

    with torch.device("meta"):
        base = LlamaForCausalLM(build("llama")[0].config)
    with pytest.raises(ValueError, match=r"base weight is on the meta device; .*nlora\.broadcast_init_state"):
        get_peft_model(base, make_config("llama", "nlora"))
