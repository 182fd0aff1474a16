"""Model families. `build_model(config)` returns the module for a config's model_type."""

from ..config import ModelConfig
from .decoder import CausalLM, KVCache

# model_type -> module class; DeepSeek's MLA / MoE families add theirs beside their model.
MODELS = {"qwen2": CausalLM, "qwen3": CausalLM, "llama": CausalLM}


def build_model(cfg: ModelConfig):
    return MODELS[cfg.model_type](cfg)


__all__ = ["build_model", "CausalLM", "KVCache", "MODELS"]
