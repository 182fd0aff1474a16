"""The model families lowrank loads: for each config.json `model_type`, the function that reads
its config and the module that computes it. A new family is one line here, beside its config
reader and its model file."""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError
from ..files import read_json_object
from .config import ModelConfig, _Reader, llama, qwen2, qwen3
from .decoder import CausalLM
from .deepseek import DeepseekForCausalLM
from .moe_config import deepseek_v2, deepseek_v3, qwen2_moe, qwen3_moe
from .qwen3_5 import Qwen35ForCausalLM
from .qwen3_5_config import qwen3_5
from .qwen_moe import QwenMoeForCausalLM

# model_type -> (config reader, module class)
FAMILIES = {
    "qwen2": (qwen2, CausalLM),
    "qwen3": (qwen3, CausalLM),
    "llama": (llama, CausalLM),
    "qwen2_moe": (qwen2_moe, QwenMoeForCausalLM),
    "qwen3_moe": (qwen3_moe, QwenMoeForCausalLM),
    "deepseek_v2": (deepseek_v2, DeepseekForCausalLM),
    "deepseek_v3": (deepseek_v3, DeepseekForCausalLM),
    # hybrid Gated DeltaNet: multimodal checkpoints (text_config nested) and text-only ones
    **{t: (qwen3_5, Qwen35ForCausalLM) for t in
       ("qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text", "qwen3_next")},
}


def config_from_dict(d: dict, source: str = "config.json") -> ModelConfig:
    r = _Reader(d, source)
    model_type = r.get("model_type", str)
    if model_type not in FAMILIES:
        r.fail("model_type", f"is {model_type!r}; lowrank supports {', '.join(sorted(FAMILIES))}")
    return FAMILIES[model_type][0](r)


def read_config(folder: str | Path) -> ModelConfig:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: no config.json in the model folder")
    return config_from_dict(read_json_object(path), str(path))


def build_model(cfg: ModelConfig):
    """The module for a config, with its parameters uninitialised as nn.Module makes them."""
    return FAMILIES[cfg.model_type][1](cfg)
