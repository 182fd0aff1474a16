"""Adapters: ways to fine-tune a loaded model, one file per method (see docs/adapters.md).

- LoRA (`lora.py`): low-rank updates beside frozen linear layers; saved as a PEFT folder.
- prefix / P-tuning v2 (`prefix.py`): trained key / value prefixes; saved as a PEFT folder.
- freeze (`freeze.py`): train some layers in place; saved whole with `lowrank.save_model`.
- full: every parameter trains; nothing to apply.
`peft_format.py` reads and writes PEFT's adapter folders for LoRA and prefix.
"""

from .freeze import FreezeConfig, apply_freeze, trainable_parameters, trainable_summary
from .lora import LoraConfig, LoraLinear, apply_lora, lora_modules, merge_adapter, merged
from .peft_format import load_adapter, save_adapter
from .prefix import PrefixConfig, apply_prefix, fold_prefix, remove_prefix

__all__ = [
    "FreezeConfig", "apply_freeze", "trainable_parameters", "trainable_summary",
    "LoraConfig", "LoraLinear", "apply_lora", "lora_modules", "merge_adapter", "merged",
    "load_adapter", "save_adapter", "PrefixConfig", "apply_prefix", "fold_prefix", "remove_prefix",
]
