"""Configs of the mixture-of-experts families, built from config.json like the dense ones.

- `deepseek_v2` / `deepseek_v3`: multi-head latent attention (MLA) and DeepSeek's MoE
  (shared experts + routed experts, softmax or sigmoid scores, grouped top-k).
- `qwen2_moe` / `qwen3_moe`: Qwen's attention (Qwen2's q/k/v biases, Qwen3's q/k norm) with
  routed experts, and Qwen2-MoE's gated shared expert.

Each builder says which keys it reads and refuses, naming config.json and the key, any
setting whose meaning lowrank would not reproduce exactly as transformers does. Every key
is kept in `hf` and written back by `to_hf_dict`.

`aux_loss_coef` is not a config.json key: it switches on the load-balancing loss for
training (see lowrank/models/moe.py), and is 0 (off) after loading.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields

import torch

from .bnb_format import check_quantization_config
from .config import ARCHITECTURES, DTYPES, ModelConfig, _llama_like, _Reader, _rope, _to_4x_layout


def _refuse_quantized(r: _Reader):
    """bitsandbytes NF4 / 8-bit experts load (one nn.Linear each); other methods are refused,
    DeepSeek-V3's fp8 release among them."""
    check_quantization_config(r.d, r.fail)


def _dtype(r: _Reader):
    name = r.d.get("torch_dtype", r.d.get("dtype"))
    return DTYPES.get(name) if isinstance(name, str) else None


def _silu(r: _Reader):
    act = r.get("hidden_act", str, "silu")
    if act != "silu":
        r.fail("hidden_act", f"is {act!r}; lowrank's experts use silu")


# ---- DeepSeek-V2 / V3 -------------------------------------------------------------------


@dataclass
class DeepseekConfig:
    model_type: str  # deepseek_v2 | deepseek_v3
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # the dense MLP of the first `first_k_dense_replace` layers
    num_hidden_layers: int
    num_attention_heads: int
    # MLA: q goes through a rank-`q_lora_rank` bottleneck (None: one q_proj); k and v are
    # expanded from a rank-`kv_lora_rank` latent; only `qk_rope_head_dim` dims carry RoPE.
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    # MoE
    first_k_dense_replace: int
    moe_intermediate_size: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    scoring_func: str  # softmax (V2) | sigmoid (V3)
    topk_method: str  # greedy | group_limited_greedy (V2) | noaux_tc (V3)
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    rope_interleave: bool = True  # DeepSeek's checkpoints pair rotary dims (0,1), (2,3), ...
    attention_bias: bool = False  # on q_a_proj, kv_a_proj_with_mqa and o_proj
    tie_word_embeddings: bool = False
    dtype: torch.dtype | None = None
    bos_token_id: int | list | None = None
    eos_token_id: int | list | None = None
    aux_loss_coef: float = 0.0
    hf: dict = field(default_factory=dict, repr=False)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_sparse(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace

    def to_hf_dict(self, dtype: torch.dtype | None = None) -> dict:
        d = _to_4x_layout(self.hf)
        skip = {"hf", "dtype", "aux_loss_coef", "rope_scaling"}
        d.update({f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name not in skip})
        if self.model_type == "deepseek_v2":
            d.pop("rope_interleave", None)  # V2 always interleaves; not a V2 key
        scaling = None
        if self.rope_scaling:  # DeepSeek's own code reads `type`; transformers reads either
            scaling = {"type": self.rope_scaling["rope_type"],
                       **{k: v for k, v in self.rope_scaling.items() if k != "rope_type"}}
        d["rope_scaling"] = scaling
        d["hidden_act"] = "silu"
        d.setdefault("architectures", [ARCHITECTURES[self.model_type]])
        for key in ("bos_token_id", "eos_token_id"):
            if getattr(self, key) is None:
                d.pop(key, None)
        dtype = dtype or self.dtype
        if dtype is not None:
            d["torch_dtype"] = str(dtype).removeprefix("torch.")
        return d


def _deepseek(r: _Reader, model_type: str) -> DeepseekConfig:
    _refuse_quantized(r)
    _silu(r)
    v3 = model_type == "deepseek_v3"
    n_layers = r.positive("num_hidden_layers")
    experts = r.positive("n_routed_experts")
    top_k = r.positive("num_experts_per_tok")
    if top_k > experts:
        r.fail("num_experts_per_tok", f"({top_k}) exceeds n_routed_experts ({experts})")
    scoring = r.get("scoring_func", str, "sigmoid" if v3 else "softmax")
    method = r.get("topk_method", str, "noaux_tc" if v3 else "greedy")
    # transformers' DeepseekV2 router is softmax + greedy / group-limited greedy; V3's is
    # sigmoid + noaux_tc. Other combinations exist in DeepSeek's remote code only.
    methods = ("noaux_tc",) if v3 else ("greedy", "group_limited_greedy")
    if scoring != ("sigmoid" if v3 else "softmax"):
        r.fail("scoring_func", f"is {scoring!r}; {model_type} routes with "
               f"{'sigmoid' if v3 else 'softmax'} scores")
    if method not in methods:
        r.fail("topk_method", f"is {method!r}; {model_type} supports {', '.join(methods)}")
    grouped = method != "greedy"
    n_group = r.positive("n_group", 1) if grouped else (r.get("n_group", int, None) or 1)
    topk_group = r.positive("topk_group", 1) if grouped else (r.get("topk_group", int, None) or 1)
    if grouped:
        if experts % n_group:
            r.fail("n_group", f"({n_group}) must divide n_routed_experts ({experts})")
        if topk_group > n_group:
            r.fail("topk_group", f"({topk_group}) exceeds n_group ({n_group})")
        if top_k > topk_group * (experts // n_group):
            r.fail("num_experts_per_tok", f"({top_k}) exceeds the {topk_group} x {experts // n_group} experts "
                   "of the groups a token may use (topk_group x n_routed_experts / n_group)")
        if v3 and experts // n_group < 2:
            r.fail("n_group", f"({n_group}) leaves fewer than 2 experts per group; noaux_tc scores a group by "
                   "its top-2 experts")
    norm = r.get("norm_topk_prob", bool, v3)
    if norm and not v3:
        # DeepSeek's V2 code renormalises (and then skips routed_scaling_factor); transformers'
        # DeepseekV2 ignores the flag. Every published V2 config has it false.
        r.fail("norm_topk_prob", "is true for deepseek_v2, where DeepSeek's code and transformers disagree "
               "on its meaning; published DeepSeek-V2 configs have it false")
    if r.get("moe_layer_freq", int, 1) != 1:
        r.fail("moe_layer_freq", "is not 1: MoE on every other layer is not supported (nor by transformers)")
    if r.get("mlp_bias", bool, False):
        r.fail("mlp_bias", "is true; DeepSeek's experts carry no biases")
    q_lora_rank = r.get("q_lora_rank", int, None)
    if q_lora_rank is not None and q_lora_rank <= 0:
        r.fail("q_lora_rank", f"should be positive or null, got {q_lora_rank}")
    rope_dim = r.positive("qk_rope_head_dim")
    if rope_dim % 2:
        r.fail("qk_rope_head_dim", f"({rope_dim}) must be even")
    theta, scaling = _rope(r)
    first_dense = r.get("first_k_dense_replace", int, 3 if v3 else 0)
    if first_dense < 0:
        r.fail("first_k_dense_replace", f"should be >= 0, got {first_dense}")
    return DeepseekConfig(
        model_type=model_type,
        vocab_size=r.positive("vocab_size"),
        hidden_size=r.positive("hidden_size"),
        intermediate_size=r.positive("intermediate_size"),
        num_hidden_layers=n_layers,
        num_attention_heads=r.positive("num_attention_heads"),
        q_lora_rank=q_lora_rank,
        kv_lora_rank=r.positive("kv_lora_rank"),
        qk_nope_head_dim=r.positive("qk_nope_head_dim"),
        qk_rope_head_dim=rope_dim,
        v_head_dim=r.positive("v_head_dim"),
        first_k_dense_replace=first_dense,
        moe_intermediate_size=r.positive("moe_intermediate_size"),
        n_routed_experts=experts,
        n_shared_experts=r.positive("n_shared_experts"),
        num_experts_per_tok=top_k,
        scoring_func=scoring,
        topk_method=method,
        n_group=n_group,
        topk_group=topk_group,
        norm_topk_prob=norm,
        routed_scaling_factor=r.get("routed_scaling_factor", float, 2.5 if v3 else 1.0),
        rms_norm_eps=r.get("rms_norm_eps", float, 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=r.positive("max_position_embeddings", 4096),
        rope_interleave=r.get("rope_interleave", bool, True) if v3 else True,
        attention_bias=r.get("attention_bias", bool, False),
        tie_word_embeddings=r.get("tie_word_embeddings", bool, False),
        dtype=_dtype(r),
        bos_token_id=r.d.get("bos_token_id"),
        eos_token_id=r.d.get("eos_token_id"),
        hf=copy.deepcopy(r.d),
    )


def deepseek_v2(r: _Reader) -> DeepseekConfig:
    return _deepseek(r, "deepseek_v2")


def deepseek_v3(r: _Reader) -> DeepseekConfig:
    return _deepseek(r, "deepseek_v3")


# ---- Qwen2-MoE / Qwen3-MoE --------------------------------------------------------------


@dataclass
class QwenMoeConfig(ModelConfig):
    """The dense Qwen config (attention, norms, RoPE) plus the experts."""

    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0  # qwen2_moe only: the gated shared expert
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list = field(default_factory=list)
    aux_loss_coef: float = 0.0

    def is_sparse(self, layer: int) -> bool:
        return layer not in self.mlp_only_layers and (layer + 1) % self.decoder_sparse_step == 0

    def to_hf_dict(self, dtype: torch.dtype | None = None) -> dict:
        d = super().to_hf_dict(dtype)
        d.pop("num_local_experts", None)  # 5.x's name for num_experts
        d.update(num_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok,
                 moe_intermediate_size=self.moe_intermediate_size, norm_topk_prob=self.norm_topk_prob,
                 decoder_sparse_step=self.decoder_sparse_step, mlp_only_layers=list(self.mlp_only_layers))
        if self.model_type == "qwen2_moe":
            d.update(shared_expert_intermediate_size=self.shared_expert_intermediate_size, qkv_bias=self.qkv_bias)
        else:
            d["attention_bias"] = self.qkv_bias
        return d


def _qwen_moe(r: _Reader, model_type: str) -> QwenMoeConfig:
    _refuse_quantized(r)
    qwen2 = model_type == "qwen2_moe"
    base = _llama_like(r, "qwen2" if qwen2 else "qwen3")
    values = {f.name: getattr(base, f.name) for f in fields(ModelConfig)}
    # The dense Qwen families tie embeddings by default; Qwen2Moe / Qwen3MoeConfig do not.
    values.update(model_type=model_type, tie_word_embeddings=r.get("tie_word_embeddings", bool, False))
    if qwen2:  # transformers 5 names Qwen2-MoE's q/k/v bias switch `qkv_bias` (default on)
        values["qkv_bias"] = r.get("qkv_bias", bool, True)
    # transformers 5 writes qwen3_moe's expert count as `num_local_experts`.
    experts = r.positive("num_local_experts" if "num_experts" not in r.d and "num_local_experts" in r.d
                         else "num_experts")
    top_k = r.positive("num_experts_per_tok")
    if top_k > experts:
        r.fail("num_experts_per_tok", f"({top_k}) exceeds num_experts ({experts})")
    n_layers = base.num_hidden_layers
    only = r.get("mlp_only_layers", list, [])
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n_layers for i in only):
        r.fail("mlp_only_layers", f"should list layer indices below num_hidden_layers ({n_layers}), got {only!r}")
    return QwenMoeConfig(
        **values,
        num_experts=experts,
        num_experts_per_tok=top_k,
        moe_intermediate_size=r.positive("moe_intermediate_size"),
        shared_expert_intermediate_size=r.positive("shared_expert_intermediate_size") if qwen2 else 0,
        norm_topk_prob=r.get("norm_topk_prob", bool, False),
        decoder_sparse_step=r.positive("decoder_sparse_step", 1),
        mlp_only_layers=list(only),
    )


def qwen2_moe(r: _Reader) -> QwenMoeConfig:
    return _qwen_moe(r, "qwen2_moe")


def qwen3_moe(r: _Reader) -> QwenMoeConfig:
    return _qwen_moe(r, "qwen3_moe")
