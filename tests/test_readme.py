"""The README's PEFT example runs as written."""

import re
from pathlib import Path


def test_readme_example_runs(tmp_path, monkeypatch):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "export_lora" in b)
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {})
    assert (tmp_path / "out" / "nlora-adapter" / "adapter_model.safetensors").exists()
    assert (tmp_path / "out" / "lora-adapter" / "adapter_config.json").exists()
