"""The explicit run configuration of ``nlora train`` / ``compare``: one dataclass, a YAML/TOML file, CLI overrides."""

from __future__ import annotations

import argparse
import dataclasses
import json

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

METHODS = ("lora", "pissa", "slora", "nlora", "nlora-reference", "inttune")
TASKS = ("sft", "classification")

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{prompt}\n\n### Response:"
)


@dataclass
class TrainSettings:
    """Everything a run depends on. Defaults are the offline demo: SmolLM2-135M on GSM8K, NLoRA r=8."""

    model: str = field(default="smollm2-135m", metadata={"help": "smollm2-135m, minilm, a local folder or hub name"})
    task: str = field(default="sft", metadata={"help": "sft (instruction -> response) or classification"})
    data: str = field(default="gsm8k", metadata={"help": "gsm8k, vader-movies, a .json/.jsonl/.csv/.parquet file"})
    eval_data: str | None = field(default=None, metadata={"help": "held-out file (default: split off the data)"})
    eval_fraction: float = field(default=0.1, metadata={"help": "held-out share when eval_data is not given"})
    max_train_samples: int | None = None
    max_eval_samples: int | None = field(default=64, metadata={"help": "cap of the held-out set"})
    prompt_field: str = "question"
    response_field: str = "answer"
    text_field: str = "text"
    text_pair_field: str | None = None
    label_field: str = "label"
    num_labels: int = field(default=2, metadata={"help": "classification classes (1 = regression)"})
    prompt_template: str = ALPACA_PROMPT
    response_suffix: str = field(default="", metadata={"help": "appended to responses (default: the EOS token)"})
    method: str = field(default="nlora", metadata={"help": "|".join(METHODS)})
    r: int = 8
    lora_alpha: float | None = field(default=None, metadata={"help": "default: r (scaling 1, as the paper)"})
    lora_dropout: float = 0.0
    target_modules: str | None = field(default=None, metadata={"help": "comma list; default: all linear layers"})
    nystrom_landmarks: str = "norm"
    nystrom_core: str = "lstsq"
    residual: bool = True
    learning_rate: float = 2e-4
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    per_device_train_batch_size: int = 4
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_length: int = 192
    num_train_epochs: float = 1.0
    max_steps: int = field(default=40, metadata={"help": "-1: run num_train_epochs"})
    seed: int = 0
    logging_steps: int = 1
    eval_steps: int = field(default=0, metadata={"help": "held-out loss every N steps (0: only before/after)"})
    save_steps: int = field(default=20, metadata={"help": "checkpoint every N steps (0: none)"})
    bf16: bool = False
    gradient_checkpointing: bool = False
    output_dir: str = "runs/demo"
    overwrite: bool = field(default=False, metadata={"help": "replace an output_dir that holds another run"})
    resume: bool = field(default=False, metadata={"help": "continue from the last complete checkpoint"})
    merge: bool = field(default=False, metadata={"help": "also save the merged model"})
    eval_before: bool = field(default=True, metadata={"help": "measure held-out loss/metric before training"})
    trust_remote_code: bool = field(default=False, metadata={"help": "run model code shipped with a hub model"})

    # fields that may differ between a run and its resumption
    RESUMABLE_CHANGES = ("resume", "overwrite", "output_dir", "merge", "eval_before", "logging_steps")

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"Unknown method '{self.method}'; choose one of {', '.join(METHODS)}.")
        if self.task not in TASKS:
            raise ValueError(f"Unknown task '{self.task}'; choose one of {', '.join(TASKS)}.")
        if self.r <= 0:
            raise ValueError(f"Rank r must be a positive integer, got {self.r}.")

    def comparable(self) -> dict[str, Any]:
        """The settings that define the result of a run (for the --resume check)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self.RESUMABLE_CHANGES}


def load_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or TOML settings file into a dict of field values."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Config file {path} does not exist.")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".toml":
        values = tomllib.loads(text)
    elif path.suffix in (".yaml", ".yml"):
        import yaml

        values = yaml.safe_load(text) or {}
    elif path.suffix == ".json":
        values = json.loads(text)
    else:
        raise ValueError(f"Config file {path} must end in .yaml, .yml, .toml or .json.")
    known = {f.name for f in dataclasses.fields(TrainSettings)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"Config file {path} has unknown settings {unknown}; see `nlora train --help`.")
    return values


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per settings field (underscores become dashes), plus ``--config FILE``."""
    parser.add_argument("--config", help="YAML or TOML file of settings; flags override it")
    for f in dataclasses.fields(TrainSettings):
        default = f.default if f.default is not dataclasses.MISSING else None
        kind = {"int": int, "float": float, "bool": _parse_bool}.get(str(f.type).split("|")[0].strip(), str)
        # --rank as well as --r: launchers such as torchrun reject the ambiguous prefix "--r"
        flags = ["--" + f.name.replace("_", "-")] + (["--rank"] if f.name == "r" else [])
        help_text = f.metadata.get("help", "")
        if kind is _parse_bool:
            parser.add_argument(
                *flags, dest=f.name, type=_parse_bool, nargs="?", const=True, default=None, help=help_text
            )
        else:
            parser.add_argument(
                *flags, dest=f.name, type=kind, default=None, help=f"{help_text} (default: {default})".strip()
            )


def from_args(args: argparse.Namespace) -> TrainSettings:
    """Defaults, then the config file, then explicit flags."""
    values = load_file(args.config) if getattr(args, "config", None) else {}
    for f in dataclasses.fields(TrainSettings):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = given
    settings = TrainSettings(**values)
    settings.validate()
    return settings
