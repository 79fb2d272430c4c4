"""Every setting of every ``nlora`` subcommand: grouped, documented dataclasses parsed by transformers'
``HfArgumentParser``, with ``--config FILE`` (YAML, TOML or JSON) underneath the command-line flags.

A config file's values go through the same typed parser as flags (``learning_rate: 5e-4``, which PyYAML reads as a
string, and ``r = "8"`` in TOML both become numbers), unknown keys are refused with the list of valid ones, and a flag
given on the command line overrides the file.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from transformers import HfArgumentParser

from ..config import LEGACY_DEFAULTS, NLoraConfig
from ..rates import EVIDENCE, RECOMMENDED_LEARNING_RATES, STUDY, recommended_learning_rate

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

METHODS = ("lora", "pissa", "slora", "nlora", "nlora-reference", "inttune")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "polynomial", "inverse_sqrt")

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{prompt}\n\n### Response:"
)


_NEEDS_BITSANDBYTES = (
    '--quantization {kind} needs bitsandbytes, which is not installed; run: pip install "nlora[quant]".'
)


class SettingsError(ValueError):
    """A bad setting, flag or config file (reported as one line, exit code 2)."""


@dataclass
class ModelSettings:
    _argument_group_name = "model"

    model: str = field(
        default="smollm2-135m", metadata={"help": "smollm2-135m, minilm (offline), a local folder, or a hub name"}
    )
    task: Literal["sft", "classification"] = field(
        default="sft", metadata={"help": "sft (prompt -> response, loss on the response) or classification"}
    )
    num_labels: int = field(default=2, metadata={"help": "classification classes (1 = regression)"})
    trust_remote_code: bool = field(default=False, metadata={"help": "run model code shipped with a hub model"})
    quantization: Literal["none", "nf4", "fp4", "int8"] = field(
        default="none",
        metadata={
            "help": "bitsandbytes base: nf4/fp4 (4-bit, QLoRA-style) or int8; nlora/inttune with a residual first "
            "decompose the full-precision weights and train on the quantised residual model (QNLoRA)"
        },
    )
    load_in_4bit: bool = field(default=False, metadata={"help": "shorthand for --quantization nf4"})
    load_in_8bit: bool = field(default=False, metadata={"help": "shorthand for --quantization int8"})


@dataclass
class DataSettings:
    _argument_group_name = "data"

    data: str = field(
        default="gsm8k", metadata={"help": "gsm8k, vader-movies (offline), a .json/.jsonl/.csv/.parquet file, or hub"}
    )
    eval_data: str | None = field(default=None, metadata={"help": "held-out file (default: split off the data)"})
    eval_fraction: float = field(default=0.1, metadata={"help": "held-out share when eval_data is not given"})
    max_train_samples: int | None = field(default=None, metadata={"help": "use the first N training rows"})
    max_eval_samples: int | None = field(default=64, metadata={"help": "use the first N held-out rows"})
    validation_samples: int = field(
        default=0,
        metadata={"help": "after training, also score the N held-out rows that follow the reported ones (a "
                  "validation slice for choosing settings, disjoint from what is reported); 0: none"},
    )  # fmt: skip
    prompt_field: str = field(default="question", metadata={"help": "sft: the prompt column"})
    response_field: str = field(default="answer", metadata={"help": "sft: the response column"})
    prompt_template: str = field(default=ALPACA_PROMPT, metadata={"help": "sft: wraps {prompt} (the paper's Alpaca)"})
    response_suffix: str = field(default="", metadata={"help": "sft: appended to responses; empty: the EOS token"})
    text_field: str = field(default="text", metadata={"help": "classification: the text column"})
    text_pair_field: str | None = field(default=None, metadata={"help": "classification: a second text column"})
    label_field: str = field(
        default="label", metadata={"help": "classification: the label column (ids, or names mapped to sorted ids)"}
    )
    max_length: int = field(default=192, metadata={"help": "tokens per example (longer ones are truncated)"})


# the settings of the Nyström init: they change nothing for lora, pissa, slora or nlora-reference; their defaults
# are NLoraConfig's (one source of truth)
_NLORA_DEFAULTS = {f.name: f for f in dataclasses.fields(NLoraConfig)}
NYSTROM_KNOBS = ("nystrom_core", "nystrom_landmarks", "nystrom_oversample", "nystrom_square_landmarks")


def recorded_settings(saved: dict[str, Any]) -> dict[str, Any]:
    """The settings of a stored or resumed run as they compare with :meth:`TrainSettings.comparable` today: a Nyström
    knob added since takes the value that matched the init the run was trained with (``LEGACY_DEFAULTS``)."""
    if saved.get("method") not in ("nlora", "inttune"):
        return saved
    return {**LEGACY_DEFAULTS, **saved}


@dataclass
class AdapterSettings:
    _argument_group_name = "adapter"

    method: Literal["lora", "pissa", "slora", "nlora", "nlora-reference", "inttune"] = field(
        default="nlora", metadata={"help": "lora and pissa are stock PEFT; the others are nlora's"}
    )
    r: int = field(default=8, metadata={"help": "adapter rank", "aliases": ["--rank"]})
    lora_alpha: float | None = field(default=None, metadata={"help": "default: r (scaling 1, as the paper)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter input"})
    target_modules: str | None = field(default=None, metadata={"help": "comma list; default: all linear layers"})
    nystrom_landmarks: Literal["first", "random", "norm", "leverage"] = field(
        default=_NLORA_DEFAULTS["nystrom_landmarks"].default,
        metadata={"help": "nlora/inttune: how landmark rows and columns are picked"},
    )
    nystrom_core: Literal["project", "lstsq", "pinv", "ridge", "block"] = field(
        default=_NLORA_DEFAULTS["nystrom_core"].default,
        metadata={"help": "nlora/inttune: project (C C^+ W) or the core between C and R"},
    )
    nystrom_oversample: float = field(
        default=_NLORA_DEFAULTS["nystrom_oversample"].default,
        metadata={"help": "nlora/inttune: extra landmarks as a fraction of r, truncated back to r"},
    )
    nystrom_square_landmarks: Literal["rows", "columns"] = field(
        default=_NLORA_DEFAULTS["nystrom_square_landmarks"].default,
        metadata={"help": "nlora/inttune: landmark side of a square W with the project core (columns: before 0.2)"},
    )
    residual: bool = field(default=True, metadata={"help": "nlora/inttune: subtract the initial delta from W"})


@dataclass
class OptimSettings:
    _argument_group_name = "training"

    learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "peak learning rate; default: the method's rate from the study ("
            + ", ".join(f"{m} {r['sft']:g}/{r['classification']:g}" for m, r in RECOMMENDED_LEARNING_RATES.items())
            + f" for sft/classification; {STUDY})"
        },
    )
    lr_scheduler_type: Literal[SCHEDULERS] = field(default="cosine", metadata={"help": "learning-rate schedule"})
    warmup_ratio: float = field(default=0.03, metadata={"help": "share of the steps spent warming up"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "training batch per process"})
    per_device_eval_batch_size: int = field(default=8, metadata={"help": "evaluation batch per process"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "batches per optimizer step"})
    num_train_epochs: float = field(default=1.0, metadata={"help": "epochs, when max_steps is -1"})
    max_steps: int = field(default=40, metadata={"help": "optimizer steps (-1: run num_train_epochs)"})
    seed: int = field(default=0, metadata={"help": "seed of data order, adapter init and dropout"})
    logging_steps: int = field(default=1, metadata={"help": "log the training loss every N steps"})
    eval_steps: int = field(default=0, metadata={"help": "held-out loss every N steps (0: only before/after)"})
    save_steps: int = field(default=20, metadata={"help": "checkpoint every N steps (0: none)"})
    bf16: bool = field(default=False, metadata={"help": "bf16 mixed precision"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations to save memory"})


@dataclass
class OutputSettings:
    _argument_group_name = "output"

    output_dir: str = field(default="runs/demo", metadata={"help": "the run folder (created; see --overwrite)"})
    overwrite: bool = field(
        default=False, metadata={"help": "replace an output_dir that holds another nlora run, once this one is done"}
    )
    resume: bool = field(default=False, metadata={"help": "continue the run in output_dir from its last checkpoint"})
    merge: bool = field(default=False, metadata={"help": "also save the merged model in output_dir/merged"})
    eval_before: bool = field(default=True, metadata={"help": "measure the held-out loss/metric before training"})


@dataclass
class TrainSettings(OutputSettings, OptimSettings, AdapterSettings, DataSettings, ModelSettings):
    """Everything a training run depends on. Defaults are the offline demo: SmolLM2-135M on GSM8K, NLoRA r=8."""

    # why this learning rate: "given", or the method default it came from (set by validate, not a flag)
    learning_rate_source: str = field(default="", init=False, repr=False)

    # fields that may differ between a run and its resumption
    RESUMABLE_CHANGES = ("resume", "overwrite", "output_dir", "merge", "eval_before", "logging_steps",
                         "learning_rate_source", "validation_samples")  # fmt: skip

    def validate(self) -> None:
        """Refuse impossible values with one sentence each, before anything is loaded or written."""
        positive = ("r", "num_labels", "max_length", "per_device_train_batch_size", "per_device_eval_batch_size",
                    "gradient_accumulation_steps", "logging_steps")  # fmt: skip
        for name in positive:
            if getattr(self, name) < 1:
                raise SettingsError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}.")
        for name in ("max_train_samples", "max_eval_samples"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise SettingsError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}.")
        if self.validation_samples < 0:
            raise SettingsError(f"--validation-samples must be 0 or more, got {self.validation_samples}.")
        if self.validation_samples and not self.max_eval_samples:
            raise SettingsError("--validation-samples needs --max-eval-samples: the validation rows follow those.")
        if self.max_steps == 0 or self.max_steps < -1:
            raise SettingsError(f"--max-steps must be a positive number of steps or -1 (epochs), got {self.max_steps}.")
        if self.learning_rate is None:  # the study's rate for this method (a shared one favours some methods)
            self.learning_rate = recommended_learning_rate(self.method, self.task)
            self.learning_rate_source = f"the {self.method} default for {self.task} ({EVIDENCE}), {STUDY}"
        elif not self.learning_rate_source:
            self.learning_rate_source = "given"
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise SettingsError(f"--learning-rate must be a positive number, got {self.learning_rate}.")
        if not 0 < self.eval_fraction < 1:
            raise SettingsError(f"--eval-fraction must lie strictly between 0 and 1, got {self.eval_fraction}.")
        for name in ("warmup_ratio", "lora_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise SettingsError(f"--{name.replace('_', '-')} must lie in [0, 1), got {getattr(self, name)}.")
        if self.weight_decay < 0 or self.num_train_epochs <= 0 or self.eval_steps < 0 or self.save_steps < 0:
            raise SettingsError(
                "--weight-decay, --eval-steps and --save-steps must be >= 0 and --num-train-epochs > 0."
            )
        for f in dataclasses.fields(self):  # NaN passes every comparison below; inf makes a NaN adapter
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise SettingsError(f"--{f.name.replace('_', '-')} must be a finite number, got {value}.")
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            raise SettingsError(f"--lora-alpha must be positive, got {self.lora_alpha}.")
        if self.target_modules:  # "q_proj, v_proj" means q_proj and v_proj
            names = [n.strip() for n in self.target_modules.split(",")]
            if not all(names):
                raise SettingsError(f"--target-modules has an empty name: '{self.target_modules}'.")
            self.target_modules = ",".join(names)
        try:
            fields = {name for _, name, _, _ in string.Formatter().parse(self.prompt_template) if name is not None}
        except ValueError as err:
            raise SettingsError(
                f"--prompt-template is not a valid template ({err}); write literal braces as {{{{ and }}}}."
            ) from err
        if self.task == "sft" and fields != {"prompt"}:
            raise SettingsError(
                f"--prompt-template must use the field {{prompt}} and no other, got {sorted(fields)}; write literal "
                "braces as {{ and }}."
            )
        shorthand = {"nf4": self.load_in_4bit, "int8": self.load_in_8bit}
        asked = [kind for kind, on in shorthand.items() if on]
        if len(asked) > 1 or (asked and self.quantization not in ("none", asked[0])):
            raise SettingsError("Give one quantisation: --load-in-4bit, --load-in-8bit or --quantization.")
        if asked:
            self.quantization, self.load_in_4bit, self.load_in_8bit = asked[0], False, False
        if self.quantization != "none" and self.method == "pissa":
            raise SettingsError(
                "PiSSA needs full-precision weights (PEFT refuses quantised ones); use --method nlora, whose residual "
                "is computed in full precision before quantising (QNLoRA), or --method lora (QLoRA)."
            )
        if self.quantization != "none" and importlib.util.find_spec("bitsandbytes") is None:
            raise SettingsError(_NEEDS_BITSANDBYTES.format(kind=self.quantization))
        if self.resume and self.overwrite:
            raise SettingsError("--resume continues a run and --overwrite replaces it; pass only one of them.")

    def comparable(self) -> dict[str, Any]:
        """The settings that define the result of a run (for the --resume check and the study's run store)."""
        ignored = self.RESUMABLE_CHANGES + (() if self.method in ("nlora", "inttune") else NYSTROM_KNOBS)
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ignored}


@dataclass
class CompareSettings:
    _argument_group_name = "comparison"

    methods: str = field(default="lora,slora,nlora,inttune", metadata={"help": f"comma list of {', '.join(METHODS)}"})
    seeds: str = field(default="0", metadata={"help": "comma list of seeds; each method runs with each"})
    tune: bool = field(
        default=False,
        metadata={"help": "the study's protocol: per method a rate grid around its recommended rate, selected on a "
                  "validation slice over the seeds, reported with CIs against --baseline (docs/benchmarks.md §3)"},
    )  # fmt: skip
    baseline: str = field(default="lora", metadata={"help": "--tune: the method the others are compared with"})
    grid_points: int = field(default=3, metadata={"help": "--tune: half-decade rates per method (1-3-10 ladder)"})
    grid_extensions: int = field(default=1, metadata={"help": "--tune: rates added past a grid edge that wins"})
    margin: float | None = field(
        default=None,
        metadata={"help": "--tune: equivalence margin in held-out loss, set before running; each difference's 95% CI "
                  "to --baseline is then read as better, worse, equivalent within it, or inconclusive"},
    )  # fmt: skip

    def validate(self) -> None:
        """The method and seed lists parse (each named once); the --tune settings are possible."""
        methods = self.method_list()
        self.seed_list()
        if self.tune:
            if self.baseline not in methods:
                raise SettingsError(f"--baseline {self.baseline} is not among --methods {self.methods}; add it.")
            if self.margin is not None and not (math.isfinite(self.margin) and self.margin > 0):
                raise SettingsError(f"--margin must be a positive loss difference, got {self.margin}.")
            if self.grid_points < 2 or self.grid_extensions < 0:
                raise SettingsError(
                    f"--grid-points must be at least 2 and --grid-extensions at least 0, got {self.grid_points} and "
                    f"{self.grid_extensions}."
                )

    def method_list(self) -> list[str]:
        methods = [m.strip() for m in self.methods.split(",") if m.strip()]
        unknown = [m for m in methods if m not in METHODS]
        if unknown or not methods:
            raise SettingsError(f"Unknown method(s) {unknown or methods}; choose from {', '.join(METHODS)}.")
        if len(set(methods)) != len(methods):  # the same run twice would be counted as two seeds
            raise SettingsError(f"--methods names a method twice ('{self.methods}'); list each once.")
        return methods

    def seed_list(self) -> list[int]:
        try:
            seeds = [int(s) for s in self.seeds.split(",")]
        except ValueError as err:
            raise SettingsError(f"--seeds must be a comma list of integers, got '{self.seeds}'.") from err
        if len(set(seeds)) != len(seeds):
            raise SettingsError(f"--seeds names a seed twice ('{self.seeds}'); list each once.")
        return seeds


@dataclass
class EvalSettings:
    """``nlora eval``: score a base model, with an adapter or without."""

    _argument_group_name = "evaluation"

    task: Literal["gsm8k", "math", "humaneval", "classification"] = field(
        default="gsm8k", metadata={"help": "what to score"}
    )
    model: str | None = field(default=None, metadata={"help": "base model (default: the adapter's base model)"})
    adapter: str | None = field(default=None, metadata={"help": "adapter folder (NLoRA or LoRA)"})
    data: str | None = field(default=None, metadata={"help": "local file or offline name (gsm8k, vader-movies)"})
    limit: int | None = field(default=32, metadata={"help": "score the first N items"})
    batch_size: int = field(default=8, metadata={"help": "generation / classification batch"})
    max_new_tokens: int = field(default=256, metadata={"help": "generation budget per item"})
    max_length: int = field(default=256, metadata={"help": "classification: tokens per text"})
    output_dir: str = field(default="runs/eval", metadata={"help": "where predictions.jsonl and score.json go"})
    prompt_field: str | None = field(default=None, metadata={"help": "question column (gsm8k: question)"})
    answer_field: str | None = field(default=None, metadata={"help": "answer column (gsm8k: answer)"})
    text_field: str = field(default="text", metadata={"help": "classification: the text column"})
    label_field: str = field(default="label", metadata={"help": "classification: the label column"})
    num_labels: int = field(default=2, metadata={"help": "classification classes"})
    timeout: float = field(default=5.0, metadata={"help": "seconds per HumanEval program"})
    trust_remote_code: bool = field(default=False, metadata={"help": "run model code shipped with a hub model"})
    harness: str | None = field(
        default=None,
        metadata={"help": "score with lm-evaluation-harness instead: gsm8k (offline split) or any harness task name"},
    )
    harness_include: str | None = field(default=None, metadata={"help": "a folder of local harness task YAMLs"})
    num_fewshot: int | None = field(default=None, metadata={"help": "harness few-shot examples (default: the task's)"})
    quantization: Literal["auto", "none", "nf4", "fp4", "int8"] = field(
        default="auto",
        metadata={"help": "bitsandbytes base; auto: the quantisation the adapter's run trained with, else none"},
    )

    def validate(self) -> None:
        """Refuse impossible values with one sentence each, before anything is loaded or written."""
        for name in ("limit", "batch_size", "max_new_tokens", "max_length", "num_labels", "num_fewshot"):
            value = getattr(self, name)
            if value is not None and value < (0 if name == "num_fewshot" else 1):
                least = 0 if name == "num_fewshot" else 1
                raise SettingsError(f"--{name.replace('_', '-')} must be at least {least}, got {value}.")
        if not (math.isfinite(self.timeout) and self.timeout > 0):
            raise SettingsError(f"--timeout must be a positive number of seconds, got {self.timeout}.")

    def base_quantization(self) -> str:
        """The quantisation to load the base with: as asked, or (auto) the one recorded in the adapter's run folder,
        so that a 4-bit run is scored on the 4-bit model it trained, not on a full-precision one."""
        kind = self.quantization
        if kind == "auto":
            run_config = Path(self.adapter).parent / "run_config.json" if self.adapter else None
            kind = "none"
            if run_config is not None and run_config.is_file():
                kind = json.loads(run_config.read_text(encoding="utf-8")).get("quantization", "none")
        if kind != "none" and importlib.util.find_spec("bitsandbytes") is None:
            raise SettingsError(_NEEDS_BITSANDBYTES.format(kind=kind))
        return kind


@dataclass
class ExportSettings:
    """``nlora export``: an NLoRA adapter as a vanilla PEFT LoRA adapter (vLLM-servable), or a merged model."""

    _argument_group_name = "export"

    adapter: str = field(default=None, metadata={"help": "the NLoRA adapter folder (required)"})
    out: str = field(default=None, metadata={"help": "the folder to write (required; never inside --adapter)"})
    model: str | None = field(default=None, metadata={"help": "base model (default: the adapter's base model)"})
    merged: bool = field(default=False, metadata={"help": "write the merged model instead of a LoRA adapter"})
    overwrite: bool = field(
        default=False,
        metadata={"help": "not needed: an earlier export is replaced, a folder of other files never is (kept for "
                  "old scripts)"},
    )  # fmt: skip
    trust_remote_code: bool = field(default=False, metadata={"help": "run model code shipped with a hub model"})


TRAIN_GROUPS = (ModelSettings, DataSettings, AdapterSettings, OptimSettings, OutputSettings)


class Parser(HfArgumentParser):
    """``HfArgumentParser`` whose errors are exceptions (printed as one line by ``nlora``), not usage dumps."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for action in self._actions:  # HfArgumentParser gives --no_X the help of --X
            flag = next((o for o in action.option_strings if o.startswith("--no_")), None)
            if flag is not None:
                action.help = f"turn off --{flag.removeprefix('--no_').replace('_', '-')}"
            elif action.help and "%(" not in action.help:  # argparse %-formats help: "95% CI" would break --help
                action.help = action.help.replace("%", "%%")

    def error(self, message: str):
        message = re.sub(r"--\w+/(--[\w-]+)", r"\1", message)  # "--max_steps/--max-steps" -> "--max-steps"
        raise SettingsError(f"{self.prog.removeprefix('nlora ')}: {message}")


def read_config(path: str | Path) -> dict[str, Any]:
    """A YAML, TOML or JSON settings file as a dict; a damaged file is named in one sentence."""
    path = Path(path)
    if not path.is_file():
        raise SettingsError(f"Config file {path} does not exist.")
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".toml":
            values = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text)
        elif path.suffix == ".json":
            values = json.loads(text)
        else:
            raise SettingsError(f"Config file {path} must end in .yaml, .yml, .toml or .json.")
    except SettingsError:
        raise
    except Exception as err:  # yaml/toml/json/unicode errors: one line that names the file
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SettingsError(f"Config file {path} is not valid {path.suffix[1:].upper()} ({first}).") from err
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise SettingsError(f"Config file {path} must hold a mapping of setting: value, not a {type(values).__name__}.")
    return values


def _as_flags(values: dict[str, Any], valid: list[str], source: str) -> list[str]:
    """Config values as command-line tokens, so that they are typed and checked exactly like flags."""
    unknown = sorted(k for k in values if k.replace("-", "_") not in valid)
    if unknown:
        raise SettingsError(f"{source} has unknown settings {unknown}; valid ones: {', '.join(valid)}.")
    tokens = []
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool):
            value = str(value).lower()
        elif isinstance(value, (list, tuple)):
            value = ",".join(map(str, value))
        tokens += [f"--{key.replace('-', '_')}", str(value)]
    return tokens


def parse(groups: tuple[type, ...], argv: list[str], prog: str, defaults: dict[str, Any] | None = None) -> list[Any]:
    """Parse ``argv`` (with an optional ``--config FILE`` underneath) into one instance per dataclass in ``groups``."""
    parser = Parser(groups, prog=prog)
    parser.add_argument("--config", help="YAML, TOML or JSON file of settings; flags given here override it")
    if defaults:
        parser.set_defaults(**defaults)
    argv = list(argv)
    file_tokens = []
    configs = [t for t in argv if t == "--config" or t.startswith("--config=")]
    if len(configs) > 1:
        raise SettingsError(f"{prog}: give one --config file (got {len(configs)}); merge them into one.")
    for i, token in enumerate(argv):
        if token == "--config" or token.startswith("--config="):
            path = token.split("=", 1)[1] if "=" in token else (argv[i + 1] if i + 1 < len(argv) else None)
            if path is None:
                raise SettingsError(f"{prog}: --config needs a file name.")
            del argv[i : i + (1 if "=" in token else 2)]
            valid = [f.name for g in groups for f in dataclasses.fields(g)]
            file_tokens = _as_flags(read_config(path), valid, f"Config file {path}")
            break
    parsed = [p for p in parser.parse_args_into_dataclasses(args=file_tokens + argv) if dataclasses.is_dataclass(p)]
    for group in parsed:  # one validation layer: each settings group checks its own fields before any work
        if hasattr(group, "validate"):
            group.validate()
    return parsed


def train_settings(
    argv: list[str], prog: str = "nlora train", extra: tuple[type, ...] = (), defaults: dict | None = None
) -> tuple[TrainSettings, list[Any]]:
    """Validated ``TrainSettings`` from flags and an optional config file, and the ``extra`` groups' instances."""
    parsed = parse(TRAIN_GROUPS + extra, argv, prog, defaults)
    values = {k: v for g in parsed[: len(TRAIN_GROUPS)] for k, v in dataclasses.asdict(g).items()}
    settings = TrainSettings(**values)
    settings.validate()
    return settings, parsed[len(TRAIN_GROUPS) :]
