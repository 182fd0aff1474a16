"""Models: read a Hugging Face folder's config and weights, build the decoder, generate.

- `config.py` (the dense families' config readers) and `moe_config.py` (the MoE / MLA ones);
- `families.py`: model_type -> config reader and module (`read_config`, `build_model`);
- the decoders: `decoder.py` (Qwen2 / Qwen3 / Llama), `qwen_moe.py`, `deepseek.py`,
  `qwen3_5.py` (Qwen3.5 / 3.6 / Qwen3-Next, config in `qwen3_5_config.py`), with `moe.py` and
  `rope.py` shared;
- `checkpoint.py`: `load_model` / `save_model`; `generation.py`: `generate`.
"""

from .checkpoint import load_model, save_model
from .config import ModelConfig
from .decoder import CausalLM, KVCache
from .families import FAMILIES, build_model, config_from_dict, read_config
from .generation import generate

__all__ = ["ModelConfig", "FAMILIES", "read_config", "config_from_dict", "build_model", "CausalLM", "KVCache",
           "load_model", "save_model", "generate"]
