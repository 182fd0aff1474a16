"""lowrank: fine-tune Qwen and DeepSeek models with LoRA, prefix, freeze or full training."""

import importlib.util as _ilu
import sys as _sys
from pathlib import Path as _Path

# An installed lowrank maps the repository's top-level kernels/ to lowrank.kernels
# (pyproject's package-dir). Running from a source checkout without installing, that
# mapping is missing: register the sibling folder under the same name so both behave alike.
if _ilu.find_spec(f"{__name__}.kernels") is None:
    _dir = _Path(__file__).resolve().parent.parent / "kernels"
    _spec = _ilu.spec_from_file_location(
        f"{__name__}.kernels", _dir / "__init__.py", submodule_search_locations=[str(_dir)]
    )
    _sys.modules[_spec.name] = _ilu.module_from_spec(_spec)
    _spec.loader.exec_module(_sys.modules[_spec.name])
from . import kernels  # noqa: E402, F401

from .errors import CheckpointError, ConfigError, DataError, LowrankError  # noqa: E402

__version__ = "0.1.0"
from .models import KVCache, ModelConfig, build_model, generate, load_model, read_config, save_model  # noqa: E402
from .data import (DataReport, Tokenizer, collate, collate_packed, length_grouped_order,  # noqa: E402
                   load_dataset, load_tokenizer, make_batches, pack, render_chat)
from .adapters import (  # noqa: E402
    FreezeConfig,
    LoraConfig,
    PrefixConfig,
    apply_freeze,
    apply_lora,
    apply_prefix,
    fold_prefix,
    load_adapter,
    merge_adapter,
    merged,
    remove_prefix,
    save_adapter,
    trainable_parameters,
    trainable_summary,
)
from .train import TrainConfig, count_trainable_tokens, export_model, finetune, masked_cross_entropy  # noqa: E402

__all__ = [
    # errors
    "LowrankError", "CheckpointError", "ConfigError", "DataError",
    # models
    "ModelConfig", "read_config", "build_model", "load_model", "save_model", "KVCache", "generate",
    # tokenizers and data
    "Tokenizer", "load_tokenizer", "render_chat", "DataReport", "load_dataset", "collate", "collate_packed",
    "length_grouped_order", "make_batches", "pack", "count_trainable_tokens", "masked_cross_entropy",
    # adapters
    "LoraConfig", "apply_lora", "FreezeConfig", "apply_freeze", "PrefixConfig", "apply_prefix", "fold_prefix",
    "remove_prefix", "save_adapter", "load_adapter", "merge_adapter", "merged", "trainable_parameters",
    "trainable_summary",
    # training
    "TrainConfig", "finetune", "export_model",
]
