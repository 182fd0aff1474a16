"""Model configuration: one dataclass, built from a Hugging Face config.json by one function
per family that says which keys it reads and refuses what it cannot honour.

Two config.json layouts exist in practice: the hub's (transformers 4.x: `rope_theta`,
`rope_scaling`, `torch_dtype`) and transformers 5.x's (`rope_parameters`, `dtype`). Both are
read; lowrank writes the 4.x layout back, since every version of transformers reads it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from ..errors import CheckpointError
from .bnb_format import check_quantization_config

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # None for plain RoPE, else the scaling dict with a `rope_type` key (4.x's `type` renamed).
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: biases on q/k/v only
    o_bias: bool = False  # Llama's attention_bias also puts one on o_proj
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    dtype: torch.dtype | None = None  # the checkpoint's dtype, if the config names one
    bos_token_id: int | list | None = None
    eos_token_id: int | list | None = None
    # The config.json this came from, kept so that saving writes back every key it had.
    hf: dict = field(default_factory=dict, repr=False)

    def to_hf_dict(self, dtype: torch.dtype | None = None) -> dict:
        """The config.json to save, in the 4.x layout."""
        d = _to_4x_layout(self.hf)
        d.update(
            model_type=self.model_type,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            rope_scaling=copy.deepcopy(self.rope_scaling),
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            hidden_act="silu",
        )
        d.setdefault("architectures", [ARCHITECTURES[self.model_type]])
        if self.model_type in ("llama", "qwen3"):
            d["attention_bias"] = self.o_bias if self.model_type == "llama" else self.qkv_bias
        if self.model_type == "llama":
            d["mlp_bias"] = self.mlp_bias
        for key in ("bos_token_id", "eos_token_id"):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        dtype = dtype or self.dtype
        if dtype is not None:
            d["torch_dtype"] = str(dtype).removeprefix("torch.")
        return d


ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM",
                 "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                 "deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}


def _to_4x_layout(hf: dict) -> dict:
    """Rewrite 5.x keys (`rope_parameters`, `dtype`) as the 4.x ones the hub carries."""
    d = copy.deepcopy(hf)
    rp = d.pop("rope_parameters", None)
    if rp is not None:
        rp = dict(rp)
        d["rope_theta"] = rp.pop("rope_theta", d.get("rope_theta"))
        rp.pop("partial_rotary_factor", None)
        d["rope_scaling"] = None if rp.get("rope_type", "default") == "default" else rp
    if "dtype" in d:
        d["torch_dtype"] = d.pop("dtype")
    d.pop("layer_types", None)  # derived from use_sliding_window / max_window_layers in 4.x
    return d


class _Reader:
    """Reads typed keys out of a config dict; every error names the file and the key."""

    def __init__(self, d: dict, source: str):
        self.d, self.source = d, source

    def fail(self, key: str, why: str):
        raise CheckpointError(f"{self.source}: key {key!r} {why}")

    def get(self, key, kind, default=...):
        if key not in self.d or self.d[key] is None:
            if default is ...:
                self.fail(key, "is missing")
            return default
        value = self.d[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if kind is int and isinstance(value, bool) or not isinstance(value, kind):
            self.fail(key, f"should be {kind.__name__}, got {value!r}")
        return value

    def positive(self, key, default=...):
        value = self.get(key, int, default)
        if value is not None and value <= 0:
            self.fail(key, f"should be positive, got {value}")
        return value


def _rope(r: _Reader) -> tuple[float, dict | None]:
    """RoPE base and scaling from either layout."""
    rp = r.d.get("rope_parameters")
    if rp is not None:  # 5.x: one dict holding rope_theta and the scaling keys
        if not isinstance(rp, dict):
            r.fail("rope_parameters", f"should be a dict, got {rp!r}")
        if "rope_type" not in rp and any(isinstance(v, dict) for v in rp.values()):
            r.fail("rope_parameters", "holds per-layer-type RoPE settings, which lowrank does not support")
        theta = rp.get("rope_theta", r.d.get("rope_theta", 10000.0))
        scaling = {k: v for k, v in rp.items() if k not in ("rope_theta", "partial_rotary_factor")}
        if rp.get("partial_rotary_factor", 1.0) != 1.0:
            r.fail("rope_parameters", "asks for partial rotary embeddings, which lowrank does not support")
    else:
        theta = r.get("rope_theta", float, 10000.0)
        scaling = r.get("rope_scaling", dict, None)
        scaling = dict(scaling) if scaling else None
    if not isinstance(theta, (int, float)) or theta <= 0:
        r.fail("rope_theta", f"should be a positive number, got {theta!r}")
    if scaling:
        kind = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
        scaling.pop("type", None)
        if kind not in ROPE_TYPES:
            r.fail("rope_scaling", f"asks for RoPE type {kind!r}; lowrank supports {', '.join(ROPE_TYPES)}")
        if kind == "default":
            return float(theta), None
        needs = {"linear": ["factor"], "dynamic": ["factor"], "yarn": [],
                 "llama3": ["factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"]}
        for key in needs[kind]:
            if not isinstance(scaling.get(key), (int, float)):
                r.fail("rope_scaling", f"of type {kind!r} needs a number {key!r}, got {scaling.get(key)!r}")
        scaling = {"rope_type": kind, **scaling}
    return float(theta), scaling or None


def _refuse_sliding_window(r: _Reader, n_layers: int):
    layer_types = r.d.get("layer_types")
    if layer_types and any(t != "full_attention" for t in layer_types):
        r.fail("layer_types", "asks for sliding-window attention, which lowrank does not support")
    if r.d.get("use_sliding_window") and r.d.get("sliding_window") is not None:
        if r.d.get("max_window_layers", 0) < n_layers:
            r.fail("use_sliding_window", "is true: sliding-window attention is not supported")


def _llama_like(r: _Reader, model_type: str) -> ModelConfig:
    act = r.get("hidden_act", str, "silu")
    if act != "silu":
        r.fail("hidden_act", f"is {act!r}; the Llama-like decoder uses silu")
    heads = r.positive("num_attention_heads")
    hidden = r.positive("hidden_size")
    kv_heads = r.positive("num_key_value_heads", heads)
    if heads % kv_heads:
        r.fail("num_key_value_heads", f"({kv_heads}) must divide num_attention_heads ({heads})")
    head_dim = r.positive("head_dim", None) or hidden // heads
    n_layers = r.positive("num_hidden_layers")
    _refuse_sliding_window(r, n_layers)
    check_quantization_config(r.d, r.fail)  # bitsandbytes NF4 / 8-bit, else refused
    theta, scaling = _rope(r)
    dtype_name = r.d.get("torch_dtype", r.d.get("dtype"))
    attention_bias = r.get("attention_bias", bool, False)
    return ModelConfig(
        model_type=model_type,
        vocab_size=r.positive("vocab_size"),
        hidden_size=hidden,
        intermediate_size=r.positive("intermediate_size"),
        num_hidden_layers=n_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=r.get("rms_norm_eps", float, 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=r.positive("max_position_embeddings", 4096),
        tie_word_embeddings=r.get("tie_word_embeddings", bool, model_type != "llama"),
        qkv_bias=True if model_type == "qwen2" else attention_bias,
        o_bias=attention_bias if model_type == "llama" else (attention_bias and model_type == "qwen3"),
        mlp_bias=r.get("mlp_bias", bool, False) if model_type == "llama" else False,
        qk_norm=model_type == "qwen3",
        dtype=DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None,
        bos_token_id=r.d.get("bos_token_id"),
        eos_token_id=r.d.get("eos_token_id"),
        hf=copy.deepcopy(r.d),
    )


def qwen2(r: _Reader) -> ModelConfig:
    return _llama_like(r, "qwen2")


def qwen3(r: _Reader) -> ModelConfig:
    return _llama_like(r, "qwen3")


def llama(r: _Reader) -> ModelConfig:
    return _llama_like(r, "llama")
