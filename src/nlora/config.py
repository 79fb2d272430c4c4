"""``NLoraConfig``: a drop-in ``peft.LoraConfig`` for SLoRA, NLoRA and IntTune."""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from peft import LoraConfig

from .files import FINGERPRINT_SUFFIX, read_adapter
from .nystrom import CORES, LANDMARKS


class NLoraPeftType(str, enum.Enum):
    """Our own PEFT type. Never "LORA": stock PEFT would load such an adapter and silently drop ``lora_N``."""

    NLORA = "NLORA"


# PEFT's variant resolver reads this metadata key of init_lora_weights; keep PEFT's own list.
_PEFT_INIT_VARIANTS = next(f for f in dataclasses.fields(LoraConfig) if f.name == "init_lora_weights").metadata.get(
    "lora_variants", []
)

# The authors' fork spells the inits 'n_lora' / 's_lora'; their 'n_lora' is the raw-block init.
INIT_ALIASES = {"n_lora": "nlora_reference", "s_lora": "slora"}
INITS = ("slora", "nlora", "nlora_reference")
NYSTROM_INITS = ("nlora", "nlora_reference")

# LoraConfig features whose layers or variants would ignore the intermediate matrix N.
_UNSUPPORTED_LORA_FEATURES = (
    "use_dora",
    "alora_invocation_tokens",
    "velora_config",
    "kasa_config",
    "arrow_config",
    "use_bdlora",
    "monteclora_config",
    "use_qalora",
    "target_parameters",
    "megatron_config",
    "lora_bias",
    "layer_replication",
)


# The settings that decide a residual adapter's initial factors (and so the weight it subtracts from the base).
_RESIDUAL_FIELDS = (
    "init_lora_weights", "residual", "intermediate_init", "quantized_residual", "init_seed", "r", "lora_alpha",
    "use_rslora", "rank_pattern", "alpha_pattern", "target_modules", "exclude_modules", "fan_in_fan_out",
    "nystrom_landmarks", "nystrom_core", "nystrom_oversample", "nystrom_rcond", "nystrom_orthonormal",
    "nystrom_square_landmarks",
)  # fmt: skip
# What a saved config without a field meant: the behaviour before the field existed (checkpoints keep re-deriving
# the factors they were trained with). Square layers took column landmarks before nlora 0.2.
LEGACY_DEFAULTS = {"nystrom_square_landmarks": "columns"}


@dataclass
class NLoraConfig(LoraConfig):
    """Configuration of an SLoRA / NLoRA / IntTune adapter: ``delta_W = s * B @ N @ A`` with a trainable r x r N.

    Every targeting and training field of :class:`peft.LoraConfig` works the same way (``target_modules``,
    ``exclude_modules``, ``rank_pattern``, ``alpha_pattern``, ``modules_to_save``, ``use_rslora``, ...).

    ``init_lora_weights`` names the initialisation and what it does to the model at step 0:

    - ``"nlora"`` (default): Nyström/CUR factors of W in fp32, see the ``nystrom_*`` fields. With
      ``residual=True`` the base weight becomes ``W - s*B*N*A``, so the output at step 0 equals the base model's.
    - ``"nlora_reference"`` (alias ``"n_lora"``): the authors' release bit for bit, ``A = W[:r, :]``,
      ``N = W[:r, :r]``, ``B = W[:, :r]`` and W untouched, so the output at step 0 changes by ``s*C*U*R``.
    - ``"slora"`` (alias ``"s_lora"``): A and N Kaiming-uniform, B = 0; output unchanged at step 0.
    - ``True``: LoRA-equivalent, A Kaiming-uniform, B = 0, N = identity; output unchanged at step 0.
    - ``False``: random non-zero A, N and B (for tests); output changes at step 0.

    Plain LoRA is ``peft.LoraConfig``.

    Recommended starting learning rates (our study, ``nlora.rates``; fine-tuning / classification): SLoRA 3e-3 /
    1e-3, NLoRA 3e-4 / 3e-4, nlora_reference 1e-2 / 3e-3, IntTune 1e-1 / 3e-2 (LoRA: 3e-3 / 1e-3, PiSSA: 1e-3 / 3e-4). A
    residual init wants about a 10x lower rate than a zero-start adapter, IntTune a much higher one.
    """

    init_lora_weights: bool | Literal["nlora", "nlora_reference", "slora", "n_lora", "s_lora"] = field(
        default="nlora",
        metadata={
            "help": "Initialisation: 'nlora', 'nlora_reference', 'slora', True or False.",
            "lora_variants": _PEFT_INIT_VARIANTS,
        },
    )
    nystrom_landmarks: Literal["first", "random", "norm", "leverage"] = field(
        default="norm", metadata={"help": "How 'nlora' picks landmark rows/columns: first, random, norm, leverage."}
    )
    nystrom_core: Literal["project", "lstsq", "pinv", "ridge", "block"] = field(
        default="project",
        metadata={"help": "Core of 'nlora': project (C C^+ W), lstsq (C^+ W R^+), pinv, ridge or block (raw W[I,J])."},
    )
    nystrom_oversample: float = field(
        default=0.25,
        metadata={"help": "'nlora' takes r * (1 + oversample) landmarks, then truncates to rank r."},
    )
    nystrom_square_landmarks: Literal["rows", "columns"] = field(
        default="rows",
        metadata={
            "help": "'project' core on a square W: landmark rows (contiguous, ~15% faster on CPU) or columns (the "
            "choice before nlora 0.2, which checkpoints saved then keep). Other shapes use the shorter side."
        },
    )
    nystrom_rcond: float = field(default=1e-2, metadata={"help": "Relative cut-off of the 'pinv' and 'ridge' cores."})
    nystrom_orthonormal: bool = field(
        default=True, metadata={"help": "Orthonormal A and B with the scale in N (else skeleton B=C, A=R)."}
    )
    residual: bool = field(
        default=True,
        metadata={"help": "'nlora' only: subtract s*B*N*A from W so that the step-0 output is the base output."},
    )
    intermediate_init: Literal["nystrom", "zero"] = field(
        default="nystrom",
        metadata={"help": "'zero' starts N at 0 (model unchanged, W untouched, N still gets gradients)."},
    )
    quantized_residual: Literal["keep", "requantize"] = field(
        default="keep",
        metadata={
            "help": "bitsandbytes 4/8-bit bases with residual=True: 'keep' leaves the quantised weights untouched "
            "and starts N at zero; 'requantize' (QNLoRA) makes the base quantise(W - s*B*N*A)."
        },
    )
    train_intermediate_only: bool = field(
        default=False, metadata={"help": "IntTune: train only lora_N (r*r per layer); A and B stay frozen."}
    )
    save_frozen_factors: bool = field(
        default=True,
        metadata={"help": "IntTune: False saves only N; A and B are re-derived from the base weight and verified."},
    )
    init_seed: int = field(default=0, metadata={"help": "Seed of every random choice of the init (forked RNG)."})

    def __post_init__(self) -> None:
        self.init_lora_weights = INIT_ALIASES.get(self.init_lora_weights, self.init_lora_weights)
        if not isinstance(self.init_lora_weights, bool) and self.init_lora_weights not in INITS:
            raise ValueError(
                f"NLoraConfig: unknown init_lora_weights={self.init_lora_weights!r}; choose one of "
                f"{INITS + ('n_lora', 's_lora', True, False)} (PEFT's own inits such as 'pissa' need peft.LoraConfig)."
            )
        for name in _UNSUPPORTED_LORA_FEATURES:
            value = getattr(self, name, None)
            if value:
                raise ValueError(
                    f"NLoraConfig does not support {name}={value!r}; leave it unset or use peft.LoraConfig."
                )
        if self.nystrom_landmarks not in LANDMARKS:
            raise ValueError(
                f"NLoraConfig: nystrom_landmarks must be one of {LANDMARKS}, got {self.nystrom_landmarks!r}."
            )
        if self.nystrom_core not in CORES:
            raise ValueError(f"NLoraConfig: nystrom_core must be one of {CORES}, got {self.nystrom_core!r}.")
        if self.nystrom_oversample < 0 or not math.isfinite(self.nystrom_oversample):
            raise ValueError(f"NLoraConfig: nystrom_oversample must be >= 0, got {self.nystrom_oversample}.")
        if not self.nystrom_orthonormal and (self.nystrom_oversample > 0 or self.nystrom_core == "project"):
            raise ValueError(
                "NLoraConfig: nystrom_orthonormal=False (skeleton factors B=C, A=R) works only with nystrom_core="
                "'lstsq', 'pinv', 'ridge' or 'block' and nystrom_oversample=0; set those or keep it True."
            )
        if self.quantized_residual not in ("keep", "requantize"):
            raise ValueError(
                f"NLoraConfig: quantized_residual must be 'keep' or 'requantize', got {self.quantized_residual!r}."
            )
        if self.nystrom_square_landmarks not in ("rows", "columns"):
            raise ValueError(
                "NLoraConfig: nystrom_square_landmarks must be 'rows' or 'columns', got "
                f"{self.nystrom_square_landmarks!r}."
            )
        if self.intermediate_init not in ("nystrom", "zero"):
            raise ValueError(
                f"NLoraConfig: intermediate_init must be 'nystrom' or 'zero', got {self.intermediate_init!r}."
            )
        if self.train_intermediate_only and self.init_lora_weights in ("slora", True):
            raise ValueError(
                f"NLoraConfig: train_intermediate_only=True with init_lora_weights={self.init_lora_weights!r} starts "
                "B at zero, so N would never get a gradient; use init_lora_weights='nlora' or 'nlora_reference'."
            )
        if not self.save_frozen_factors and not self.train_intermediate_only:
            raise ValueError("NLoraConfig: save_frozen_factors=False is only valid with train_intermediate_only=True.")
        if not self.save_frozen_factors and self.init_lora_weights not in NYSTROM_INITS:
            raise ValueError(
                "NLoraConfig: save_frozen_factors=False needs factors that can be re-derived from the base weight; "
                "use init_lora_weights='nlora' or 'nlora_reference'."
            )
        super().__post_init__()
        self.peft_type = NLoraPeftType.NLORA

    @property
    def uses_residual(self) -> bool:
        """Whether this adapter subtracts its initial delta from the base weight."""
        return self.init_lora_weights == "nlora" and self.residual and self.intermediate_init == "nystrom"

    @property
    def rederives_init(self) -> bool:
        """Whether reloading this adapter re-derives part of it from the base weight (a residual, or the frozen
        factors of an N-only checkpoint); such checkpoints record the init's fingerprints and are verified."""
        return self.uses_residual or not self.save_frozen_factors

    def shares_residual_with(self, other: object) -> bool:
        """Whether an adapter with this config may share the residual base of an adapter with ``other``: both are
        residual and every setting that decides the initial factors, and so the residual, is the same."""
        return (
            isinstance(other, NLoraConfig)
            and self.uses_residual
            and other.uses_residual
            and all(getattr(self, f) == getattr(other, f) for f in _RESIDUAL_FIELDS)
        )

    def nystrom_options(self, r: int, shape: tuple[int, int]) -> dict:
        """The keyword arguments of :func:`nlora.nystrom.nystrom_factors` for rank ``r`` of an ``out x in`` W."""
        return {
            "landmarks": self.nystrom_landmarks,
            "core": self.nystrom_core,
            "oversample": self.oversampled_rank(r, min(shape)) - r,
            "rcond": self.nystrom_rcond,
            "orthonormal": self.nystrom_orthonormal,
            "square_landmarks": self.nystrom_square_landmarks,
        }

    def oversampled_rank(self, r: int, max_rank: int) -> int:
        """Number of landmarks 'nlora' takes for rank r (never more than the matrix allows)."""
        return min(max_rank, r + int(round(self.nystrom_oversample * r)))

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """PEFT's config file, plus a model card (``README.md``) that says how to load the adapter."""
        from .card import adapter_card, write_card

        super().save_pretrained(save_directory, **kwargs)
        write_card(save_directory, adapter_card(self))

    @classmethod
    def from_json_file(cls, path_json_file: str, **kwargs) -> dict:
        """A saved config; a field it lacks takes the value that matched the behaviour when it was saved."""
        loaded = super().from_json_file(path_json_file, **kwargs)
        if loaded.get("peft_type") == "NLORA":
            loaded = {**LEGACY_DEFAULTS, **loaded}
        return loaded

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs):
        """Load the config; for a local adapter also read its safetensors file now, so that a damaged, pickled or
        mismatched checkpoint is refused before any model is touched (not half-way through loading)."""
        path = Path(pretrained_model_name_or_path) / (subfolder or "")
        index = fingerprints = None
        if path.is_dir():
            _, tensors = read_adapter(path)
            index = {
                k: (tuple(v.shape), bool(not v.is_floating_point() or torch.isfinite(v).all()))
                for k, v in tensors.items()
            }
            fingerprints = {
                k.removeprefix("base_model.model.").removesuffix(f".{FINGERPRINT_SUFFIX}"): v.tolist()
                for k, v in tensors.items()
                if k.endswith(f".{FINGERPRINT_SUFFIX}")
            }
            del tensors
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        if index is not None:  # checked against the model before injection, before any weight is written (not saved)
            config._checkpoint_index = index
            config._checkpoint_fingerprints = fingerprints
        return config
