"""Model families. `build_model(config)` returns the module for a config's model_type."""

from ..config import ModelConfig
from .decoder import CausalLM, KVCache
from .deepseek import DeepseekForCausalLM
from .qwen_moe import QwenMoeForCausalLM

# model_type -> module class
MODELS = {"qwen2": CausalLM, "qwen3": CausalLM, "llama": CausalLM,
          "qwen2_moe": QwenMoeForCausalLM, "qwen3_moe": QwenMoeForCausalLM,
          "deepseek_v2": DeepseekForCausalLM, "deepseek_v3": DeepseekForCausalLM}


def build_model(cfg: ModelConfig):
    return MODELS[cfg.model_type](cfg)


__all__ = ["build_model", "CausalLM", "KVCache", "MODELS"]
