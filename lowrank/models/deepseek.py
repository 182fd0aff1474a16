"""DeepSeek-V2 / V3: multi-head latent attention (MLA) and DeepSeek's mixture of experts.

MLA (per layer, H heads):
    q      = q_b_proj(q_a_layernorm(q_a_proj(x)))        (or q_proj(x) when q_lora_rank is null)
    c, kr  = split(kv_a_proj_with_mqa(x), [kv_lora_rank, qk_rope_head_dim])
    kn, v  = split(kv_b_proj(kv_a_layernorm(c)), per head [qk_nope_head_dim, v_head_dim])
    q = [q_nope, rope(q_rot)], k = [kn, rope(kr)] (kr shared by all heads)
    softmax scale = qk_head_dim^-0.5 * mscale(factor, mscale_all_dim)^2 under yarn.
The KV cache holds the latent c and the rotated kr, (kv_lora_rank + qk_rope_head_dim) numbers
per token and layer instead of H * (qk_head_dim + v_head_dim); each step re-expands them
through kv_b_proj, as transformers does.

RoPE: DeepSeek's checkpoints pair rotary dims as (0,1), (2,3), ... (transformers' V2 rotates
them as complex numbers; V3's `rope_interleave` path rotates the even / odd slices and writes
them back de-interleaved). q and k get the same layout, so both give the same attention;
V3 with `rope_interleave: false` uses Llama's halves.

MoE layers (from `first_k_dense_replace` on): y = shared_experts(x) + sum over the token's
top-k routed experts of w * expert(x). V2 scores with softmax and picks greedily or within the
best groups (`group_limited_greedy`: a group's score is its best expert); V3 scores with
sigmoid, picks groups by the sum of their top-2 scores plus `e_score_correction_bias`, and
weights with the unbiased scores, renormalised when `norm_topk_prob`. Both multiply by
`routed_scaling_factor`. Routing runs in fp32, as in transformers.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from .decoder import MLP, RMSNorm
from .moe import MoeCausalLM, MoeDecoder, MoeDecoderLayer, dispatch
from .moe_config import DeepseekConfig
from .rope import apply_rope

# DeepSeek's q_a_layernorm / kv_a_layernorm use this eps whatever rms_norm_eps says.
_LATENT_NORM_EPS = 1e-6


def _yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def softmax_scale(cfg: DeepseekConfig) -> float:
    scale = cfg.qk_head_dim ** -0.5
    s = cfg.rope_scaling
    if s and s.get("mscale_all_dim"):
        original = s.get("original_max_position_embeddings") or cfg.max_position_embeddings
        factor = s.get("factor") or cfg.max_position_embeddings / original
        scale *= _yarn_mscale(factor, s["mscale_all_dim"]) ** 2
    return scale


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) by angle i; the output holds the first elements of the
    pairs, then the second ones. x: [B, heads, T, D]; cos, sin: [B, T, D] (the angles twice)."""
    half = cos.shape[-1] // 2
    cos, sin = cos[..., :half].unsqueeze(1), sin[..., :half].unsqueeze(1)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class MLAttention(nn.Module):
    def __init__(self, cfg: DeepseekConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = cfg.num_attention_heads
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.rank = cfg.kv_lora_rank
        H, nh, qk = cfg.hidden_size, cfg.num_attention_heads, cfg.qk_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(H, nh * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(H, cfg.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, _LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, nh * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(H, self.rank + self.rope, bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(self.rank, _LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.rank, nh * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(nh * self.v_dim, H, bias=cfg.attention_bias)
        self.rotate = apply_rope_interleaved if cfg.rope_interleave else apply_rope
        self.scale = softmax_scale(cfg)
        self.kv_prefix = None  # prefix adapters have no MLA form; see forward

    def forward(self, x, cos, sin, mask, cache):
        if self.kv_prefix is not None:
            raise ConfigError("prefix / P-tuning v2 adapters are not supported on DeepSeek's multi-head latent "
                              "attention: its cache holds latents, not per-head keys and values")
        B, T, _ = x.shape
        q = self.q_proj(x) if hasattr(self, "q_proj") else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_rot = q.view(B, T, self.n_heads, -1).transpose(1, 2).split([self.nope, self.rope], dim=-1)
        latent, k_rot = self.kv_a_proj_with_mqa(x).split([self.rank, self.rope], dim=-1)
        latent = self.kv_a_layernorm(latent)[:, None]  # [B, 1, T, rank]: one "head" for the cache
        q_rot = self.rotate(q_rot, cos, sin)
        k_rot = self.rotate(k_rot[:, None], cos, sin)  # [B, 1, T, rope], shared by all heads
        if cache is not None:
            latent, k_rot = cache.update(self.layer_idx, latent, k_rot)
        S = latent.shape[2]
        kv = self.kv_b_proj(latent[:, 0]).view(B, S, self.n_heads, -1).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_rot.expand(-1, self.n_heads, -1, -1)], dim=-1)
        q = torch.cat([q_nope, q_rot], dim=-1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           scale=self.scale)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class DeepseekRouter(nn.Module):
    """`mlp.gate`: weight [E, H] (frozen unless asked) and, for V3, `e_score_correction_bias`
    [E], a buffer that only steers which experts are picked."""

    def __init__(self, cfg: DeepseekConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.zeros(cfg.n_routed_experts, cfg.hidden_size), requires_grad=False)
        if cfg.scoring_func == "sigmoid":
            self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts))

    def _group_mask(self, group_scores: torch.Tensor) -> torch.Tensor:
        """[N, E] True for the experts of each token's `topk_group` best groups."""
        cfg = self.cfg
        best = group_scores.topk(cfg.topk_group, dim=-1, sorted=False).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
        return keep.repeat_interleave(cfg.n_routed_experts // cfg.n_group, dim=1)

    def forward(self, x: torch.Tensor):
        """x [N, H] -> (logits [N, E], weights [N, k], expert ids [N, k]), all fp32."""
        cfg = self.cfg
        logits = F.linear(x.float(), self.weight.float())
        per_group = (-1, cfg.n_group, cfg.n_routed_experts // cfg.n_group)
        if cfg.scoring_func == "softmax":  # V2
            scores = logits.softmax(dim=-1)
            if cfg.topk_method == "group_limited_greedy":
                keep = self._group_mask(scores.view(per_group).amax(dim=-1))
                scores = scores.masked_fill(~keep, 0.0)
            weights, ids = scores.topk(cfg.num_experts_per_tok, dim=-1, sorted=False)
        else:  # V3, noaux_tc
            scores = logits.sigmoid()
            choice = scores + self.e_score_correction_bias.float()
            keep = self._group_mask(choice.view(per_group).topk(2, dim=-1).values.sum(dim=-1))
            ids = choice.masked_fill(~keep, float("-inf")).topk(cfg.num_experts_per_tok, dim=-1, sorted=False).indices
            weights = scores.gather(1, ids)
            if cfg.norm_topk_prob:
                weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return logits, weights * cfg.routed_scaling_factor, ids


class DeepseekMoe(nn.Module):
    def __init__(self, cfg: DeepseekConfig):
        super().__init__()
        H, I = cfg.hidden_size, cfg.moe_intermediate_size
        self.gate = DeepseekRouter(cfg)
        self.experts = nn.ModuleList(MLP(H, I) for _ in range(cfg.n_routed_experts))
        self.shared_experts = MLP(H, I * cfg.n_shared_experts)

    def forward(self, x):
        """x [B, T, H] -> (y [B, T, H], router logits [B*T, E])."""
        flat = x.reshape(-1, x.shape[-1])
        logits, weights, ids = self.gate(flat)
        y = dispatch(flat, ids, weights, self.experts).view_as(x)
        return y + self.shared_experts(x), logits


def _layer(cfg: DeepseekConfig, i: int) -> MoeDecoderLayer:
    mlp = DeepseekMoe(cfg) if cfg.is_sparse(i) else MLP(cfg.hidden_size, cfg.intermediate_size)
    return MoeDecoderLayer(MLAttention(cfg, i), mlp, cfg.hidden_size, cfg.rms_norm_eps)


class DeepseekForCausalLM(MoeCausalLM):
    """deepseek_v2 and deepseek_v3."""

    def __init__(self, cfg: DeepseekConfig):
        decoder = MoeDecoder(cfg, lambda i: _layer(cfg, i), cfg.qk_rope_head_dim,
                             cfg.n_routed_experts, cfg.num_experts_per_tok)
        super().__init__(cfg, decoder)
