"""nlora: SLoRA, NLoRA and IntTune (arXiv 2502.14482) as a PEFT method.

``import nlora`` registers the PEFT type "NLORA", so ``get_peft_model``, ``PeftModel.from_pretrained`` and the rest
of PEFT work with :class:`NLoraConfig`.
"""

from ._compat import check_transformers_adapter_loads, original_base_state_dicts, register_peft_type
from .config import NLoraConfig, NLoraPeftType
from .model import NLoraModel

register_peft_type(NLoraPeftType.NLORA, NLoraConfig, NLoraModel, prefix="lora_")
check_transformers_adapter_loads()
original_base_state_dicts()

from .distributed import broadcast_init_state  # noqa: E402
from .export import convert_reference_checkpoint, export_lora  # noqa: E402
from .report import init_report  # noqa: E402
from .residual_model import save_residual_model  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "NLoraConfig",
    "NLoraModel",
    "NLoraPeftType",
    "__version__",
    "broadcast_init_state",
    "convert_reference_checkpoint",
    "export_lora",
    "init_report",
    "save_residual_model",
]
