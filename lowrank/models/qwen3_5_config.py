"""Configs of the hybrid Gated DeltaNet families: Qwen3.5 / Qwen3.6 (dense and MoE) and Qwen3-Next.

One reader serves the five model_types. Qwen3.5 / 3.6 are published as multimodal checkpoints
(`qwen3_5`, `qwen3_5_moe`: the text model's keys nested under `text_config`, its weights under
`model.language_model.*` beside `model.visual.*`); `qwen3_5_text`, `qwen3_5_moe_text` and
`qwen3_next` are text-only (`model.layers.*`). `multimodal` records which, so that loading,
saving and adapter files use the checkpoint's own key names (see `qwen3_5.py`).

Keys read (from `text_config` when nested): the sizes, `layer_types` (or
`full_attention_interval`, default 4), the `linear_*` sizes of the Gated DeltaNet layers,
`head_dim`, `attention_bias`, RoPE from either layout (5.x `rope_parameters`, 4.x
`rope_theta` / `rope_scaling` / top-level `partial_rotary_factor`, default 0.25; mrope
sections collapse to plain RoPE for text, since all three position streams are equal), the
MoE keys. Refused: what transformers computes differently or not at all (another activation,
`attn_output_gate: false`, a non-fp32 `mamba_ssm_dtype`, quantised weights, RoPE scaling).
The config.json is kept whole in `hf` and written back as it was read (both layouts are
ones transformers >= 4.57 reads for these families), with the dtype and tying updated.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from .config import DTYPES, _Reader
from .moe_config import _refuse_quantized

MULTIMODAL = {"qwen3_5": "Qwen3_5ForConditionalGeneration", "qwen3_5_moe": "Qwen3_5MoeForConditionalGeneration"}
TEXT = {"qwen3_5_text": "Qwen3_5ForCausalLM", "qwen3_5_moe_text": "Qwen3_5MoeForCausalLM",
        "qwen3_next": "Qwen3NextForCausalLM"}
LAYER_TYPES = ("linear_attention", "full_attention")


@dataclass
class Qwen35Config:
    model_type: str  # the config.json's own (qwen3_5, qwen3_5_text, qwen3_5_moe, qwen3_5_moe_text, qwen3_next)
    multimodal: bool  # text weights under model.language_model.* (Qwen3_5*ForConditionalGeneration)
    fused_projections: bool  # Qwen3-Next's in_proj_qkvz / in_proj_ba instead of in_proj_qkv/z/b/a
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    layer_types: list
    # full attention: q_proj gives query and output gate per head; q/k RMSNorm; partial RoPE
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rotary_dim: int  # the first rotary_dim dims of each head carry RoPE
    attention_bias: bool
    # linear attention (Gated DeltaNet): value head j reads key head j // (value heads / key heads)
    linear_num_key_heads: int
    linear_num_value_heads: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    linear_conv_kernel_dim: int
    # MLP: dense of intermediate_size, or routed experts + a gated shared expert
    intermediate_size: int = 0
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: list = field(default_factory=list)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000000.0
    rope_scaling: dict | None = None  # always None: the Rotary interface's slot
    max_position_embeddings: int = 262144
    tie_word_embeddings: bool = False
    dtype: torch.dtype | None = None
    bos_token_id: int | list | None = None
    eos_token_id: int | list | None = None
    aux_loss_coef: float = 0.0  # not a config.json key: the load-balancing loss for training, off
    hf: dict = field(default_factory=dict, repr=False)

    def is_sparse(self, layer: int) -> bool:
        return (self.num_experts > 0 and layer not in self.mlp_only_layers
                and (layer + 1) % self.decoder_sparse_step == 0)

    def to_hf_dict(self, dtype: torch.dtype | None = None) -> dict:
        """The config.json it was read from, in its own layout, with dtype and tying updated."""
        d = copy.deepcopy(self.hf)
        text = d["text_config"] if self.multimodal else d
        dtype = dtype or self.dtype
        if dtype is not None:
            name = str(dtype).removeprefix("torch.")
            for c in {id(d): d, id(text): text}.values():
                c["dtype" if "dtype" in c or "torch_dtype" not in c else "torch_dtype"] = name
        for c in {id(d): d, id(text): text}.values():
            if "tie_word_embeddings" in c or c is d:
                c["tie_word_embeddings"] = self.tie_word_embeddings
        d.setdefault("architectures", [(MULTIMODAL | TEXT)[self.model_type]])
        return d


def _rope(r: _Reader) -> tuple[float, float]:
    """(theta, partial_rotary_factor) from either layout; refuses any scaling."""
    rp = r.d.get("rope_parameters")
    if rp is not None:
        if not isinstance(rp, dict):
            r.fail("rope_parameters", f"should be a dict, got {rp!r}")
        key, s = "rope_parameters", dict(rp)
        theta = s.pop("rope_theta", r.d.get("rope_theta", 10000.0))
    else:
        key, s = "rope_scaling", dict(r.get("rope_scaling", dict, None) or {})
        theta = r.get("rope_theta", float, 10000.0)
    factor = s.pop("partial_rotary_factor", r.d.get("partial_rotary_factor", 0.25))
    for k in ("mrope_section", "mrope_interleaved"):  # equal position streams for text: plain RoPE
        s.pop(k, None)
    kind = s.pop("rope_type", None) or s.pop("type", None) or "default"
    if kind not in ("default", "mrope") or s:
        r.fail(key, f"asks for RoPE {kind!r} {s or ''}; lowrank supports plain (partial) RoPE for these models")
    if not isinstance(theta, (int, float)) or theta <= 0:
        r.fail("rope_theta", f"should be a positive number, got {theta!r}")
    if not isinstance(factor, (int, float)) or not 0 < factor <= 1:
        r.fail("partial_rotary_factor", f"should be in (0, 1], got {factor!r}")
    return float(theta), float(factor)


def _layer_types(r: _Reader, n: int) -> list:
    types = r.get("layer_types", list, None)
    if types is None:
        every = r.positive("full_attention_interval", 4)
        return ["linear_attention" if (i + 1) % every else "full_attention" for i in range(n)]
    if len(types) < n or not all(t in LAYER_TYPES for t in types[:n]):
        r.fail("layer_types", f"should list {n} layers, each one of {', '.join(LAYER_TYPES)}; got {types!r}")
    return list(types[:n])


def qwen3_5(outer: _Reader) -> Qwen35Config:
    """The reader of all five model_types (families.py maps each of them here)."""
    model_type = outer.d["model_type"]
    multimodal = model_type in MULTIMODAL
    _refuse_quantized(outer)
    if multimodal:
        text = outer.get("text_config", dict)
        r = _Reader(text, f"{outer.source} (text_config)")
    else:
        r = outer
    _refuse_quantized(r)
    if r.get("hidden_act", str, "silu") != "silu":
        r.fail("hidden_act", f"is {r.d['hidden_act']!r}; these models use silu")
    if r.get("attn_output_gate", bool, True) is not True:
        r.fail("attn_output_gate", "is false; transformers' Qwen3.5 / Qwen3-Next attention always gates its output")
    if r.get("mamba_ssm_dtype", str, "float32") != "float32":
        r.fail("mamba_ssm_dtype", "is not float32; lowrank keeps the recurrent state in fp32")
    n = r.positive("num_hidden_layers")
    heads, kv_heads = r.positive("num_attention_heads"), r.positive("num_key_value_heads")
    if heads % kv_heads:
        r.fail("num_key_value_heads", f"({kv_heads}) must divide num_attention_heads ({heads})")
    k_heads, v_heads = r.positive("linear_num_key_heads", 16), r.positive("linear_num_value_heads", 32)
    if v_heads % k_heads:
        r.fail("linear_num_value_heads", f"({v_heads}) must be a multiple of linear_num_key_heads ({k_heads})")
    head_dim = r.positive("head_dim", 256)
    theta, factor = _rope(r)
    rotary_dim = int(head_dim * factor)
    if rotary_dim % 2:
        r.fail("partial_rotary_factor", f"gives an odd rotary width {rotary_dim} of head_dim {head_dim}")
    moe = model_type in ("qwen3_5_moe", "qwen3_5_moe_text", "qwen3_next")
    values = {}
    if moe:
        experts = r.positive("num_experts")
        top_k = r.positive("num_experts_per_tok")
        if top_k > experts:
            r.fail("num_experts_per_tok", f"({top_k}) exceeds num_experts ({experts})")
        only = r.get("mlp_only_layers", list, [])
        if model_type != "qwen3_next" and only:
            r.fail("mlp_only_layers", "is not empty; transformers' Qwen3.5-MoE makes every layer sparse")
        if not all(isinstance(i, int) and 0 <= i < n for i in only):
            r.fail("mlp_only_layers", f"should list layer indices below {n}, got {only!r}")
        values = dict(num_experts=experts, num_experts_per_tok=top_k,
                      moe_intermediate_size=r.positive("moe_intermediate_size"),
                      shared_expert_intermediate_size=r.positive("shared_expert_intermediate_size"),
                      # Qwen3.5-MoE always renormalises the top-k weights (transformers ignores the key)
                      norm_topk_prob=r.get("norm_topk_prob", bool, True) if model_type == "qwen3_next" else True,
                      decoder_sparse_step=r.positive("decoder_sparse_step", 1) if model_type == "qwen3_next" else 1,
                      mlp_only_layers=list(only))
    cfg = Qwen35Config(model_type=model_type, multimodal=multimodal, fused_projections=model_type == "qwen3_next",
                       vocab_size=r.positive("vocab_size"), hidden_size=r.positive("hidden_size"),
                       num_hidden_layers=n, layer_types=_layer_types(r, n), num_attention_heads=heads,
                       num_key_value_heads=kv_heads, head_dim=head_dim, rotary_dim=rotary_dim,
                       attention_bias=r.get("attention_bias", bool, False), linear_num_key_heads=k_heads,
                       linear_num_value_heads=v_heads, linear_key_head_dim=r.positive("linear_key_head_dim", 128),
                       linear_value_head_dim=r.positive("linear_value_head_dim", 128),
                       linear_conv_kernel_dim=r.positive("linear_conv_kernel_dim", 4), **values,
                       rms_norm_eps=r.get("rms_norm_eps", float, 1e-6), rope_theta=theta,
                       max_position_embeddings=r.positive("max_position_embeddings", 262144),
                       tie_word_embeddings=outer.get("tie_word_embeddings", bool,
                                                     r.get("tie_word_embeddings", bool, False)),
                       dtype=_dtype(r) or _dtype(outer), bos_token_id=r.d.get("bos_token_id"),
                       eos_token_id=r.d.get("eos_token_id"), hf=copy.deepcopy(outer.d))
    if not moe or any(not cfg.is_sparse(i) for i in range(n)):
        cfg.intermediate_size = r.positive("intermediate_size")
    return cfg


def _dtype(r: _Reader):
    name = r.d.get("dtype", r.d.get("torch_dtype"))
    return DTYPES.get(name) if isinstance(name, str) else None
