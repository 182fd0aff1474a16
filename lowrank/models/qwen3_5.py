"""Qwen3.5 / Qwen3.6 (dense and MoE) and Qwen3-Next: hybrid decoders of Gated DeltaNet layers
(`linear_attn`) and gated full attention (`self_attn`), mostly 3:1 as `layer_types` lists them.

A linear layer (Gated DeltaNet): projections of x give q, k, v (Qwen3.5: `in_proj_qkv`,
contiguous [q | k | v]; Qwen3-Next: `in_proj_qkvz` / `in_proj_ba`, grouped per key head), the
output gate z and the per-value-head b, a. q, k, v pass a depthwise causal conv (`conv1d`,
kernel 4) with SiLU; value head j reads key head j // r (r = value heads / key heads, as
`repeat_interleave`); beta = sigmoid(b), the log-decay g = -exp(A_log) softplus(a + dt_bias);
the gated delta rule (l2-normalised q, k, q scaled by K^-0.5; state [B, H_v, K, V] fp32) runs
in `kernels`; a gated RMSNorm (plain weight, SiLU(z) gate) per head, then `out_proj`.

A full layer: `q_proj` gives, per head, [query | output gate] (2 * head_dim); q and k get a
per-head RMSNorm; RoPE on the first `rotary_dim` dims of each head only; attention; the output
is scaled by sigmoid(gate) before `o_proj`. Every other RMSNorm is zero-centred: x * (1 + w),
computed in fp32.

Padding and packing, as transformers does and beyond: linear layers zero the hidden states at
pad positions before the projections (exact for left padding; the decay still runs there). Packed
rows (position_ids restarting at 0, no cache) run as one sequence per example: `cu_seqlens` from
the restarts, so neither the conv nor the recurrent state crosses an example's start.

Names mirror the checkpoint. A multimodal checkpoint (Qwen3_5ForConditionalGeneration) keeps
the text model under `model.language_model.`; the module is built as `model.*` all the same (so
every adapter and the training loop see the usual layout) and `checkpoint_key` / `model_key` are
the one mapping between the two, used by loading, saving and the PEFT adapter files.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..kernels import causal_conv1d, causal_conv1d_update, chunk_gated_delta_rule, gated_delta_rule_step
from .decoder import MLP, KVCache, attention_mask_for
from .moe import MoeCausalLM, load_balancing_loss
from .qwen3_5_config import Qwen35Config
from .qwen_moe import QwenSparseMoe
from .rope import Rotary, apply_rope

LANGUAGE_MODEL = "model.language_model."
# Weights of a multimodal checkpoint that are not the causal LM: the vision tower, and the
# multi-token-prediction layers (also in the text-only ones). transformers skips them too.
OUTSIDE = ("model.visual.", "mtp.")


class ZeroCentredRMSNorm(nn.Module):
    """x / rms(x) * (1 + w), in fp32, cast back: w is stored zero-centred."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).type_as(x)


class GatedRMSNorm(nn.Module):
    """`linear_attn.norm`: w * (x / rms(x)) * silu(z), per head, the weight plain (ones)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x, z):
        h = x.float()
        h = self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return (h * F.silu(z.float())).to(x.dtype)


class HybridCache(KVCache):
    """Keys / values of the full layers, conv and recurrent states of the linear ones."""

    def __init__(self, num_layers: int):
        super().__init__(num_layers)
        self.conv: list = [None] * num_layers  # [B, D, W - 1]: the last pre-conv inputs
        self.state: list = [None] * num_layers  # [B, H_v, K, V] fp32
        self.seen = 0

    @property
    def length(self) -> int:
        return self.seen


class GatedDeltaNet(nn.Module):
    def __init__(self, cfg: Qwen35Config, layer_idx: int):
        super().__init__()
        self.layer_idx, self.fused = layer_idx, cfg.fused_projections
        self.k_heads, self.v_heads = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        self.k_dim, self.v_dim = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        H, K, V = cfg.hidden_size, self.k_heads * self.k_dim, self.v_heads * self.v_dim
        W = cfg.linear_conv_kernel_dim
        self.conv1d = nn.Conv1d(2 * K + V, 2 * K + V, W, groups=2 * K + V, padding=W - 1, bias=False)
        if self.fused:
            self.in_proj_qkvz = nn.Linear(H, 2 * K + 2 * V, bias=False)
            self.in_proj_ba = nn.Linear(H, 2 * self.v_heads, bias=False)
        else:
            self.in_proj_qkv = nn.Linear(H, 2 * K + V, bias=False)
            self.in_proj_z = nn.Linear(H, V, bias=False)
            self.in_proj_b = nn.Linear(H, self.v_heads, bias=False)
            self.in_proj_a = nn.Linear(H, self.v_heads, bias=False)
        self.dt_bias = nn.Parameter(torch.ones(self.v_heads))
        self.A_log = nn.Parameter(torch.zeros(self.v_heads))
        self.norm = GatedRMSNorm(self.v_dim, cfg.rms_norm_eps)
        self.out_proj = nn.Linear(V, H, bias=False)
        self.in_proj_fn = None  # as decoder.Attention's qkv_fn: f(projections, x) -> their outputs

    def project(self, x):
        """x [B, T, H] -> (mixed q|k|v [B, T, 2K + V], z [B, T, H_v, V], b, a [B, T, H_v])."""
        B, T, _ = x.shape
        projections = ((self.in_proj_qkvz, self.in_proj_ba) if self.fused else
                       (self.in_proj_qkv, self.in_proj_z, self.in_proj_b, self.in_proj_a))
        outs = self.in_proj_fn(projections, x) if self.in_proj_fn else [p(x) for p in projections]
        if not self.fused:
            qkv, z, b, a = outs
            return qkv, z.view(B, T, self.v_heads, self.v_dim), b, a
        # Qwen3-Next: per key head [q | k | v of its r value heads | z of them], and [b | a].
        r = self.v_heads // self.k_heads
        qkvz = outs[0].view(B, T, self.k_heads, -1)
        q, k, v, z = qkvz.split([self.k_dim, self.k_dim, r * self.v_dim, r * self.v_dim], dim=-1)
        b, a = outs[1].view(B, T, self.k_heads, 2 * r).split([r, r], dim=-1)
        mixed = torch.cat([q.reshape(B, T, -1), k.reshape(B, T, -1), v.reshape(B, T, -1)], dim=-1)
        return (mixed, z.reshape(B, T, self.v_heads, self.v_dim), b.reshape(B, T, self.v_heads),
                a.reshape(B, T, self.v_heads))

    def forward(self, x, pad_mask, cu_seqlens, cache: HybridCache | None):
        if pad_mask is not None:
            x = x * pad_mask[:, :, None].to(x.dtype)
        B, T, _ = x.shape
        mixed, z, b, a = self.project(x)
        conv_state = cache.conv[self.layer_idx] if cache is not None else None
        state = cache.state[self.layer_idx] if cache is not None else None
        if cu_seqlens is not None:  # packed: every row's examples as one B = 1 sequence
            mixed, b, a = (t.reshape(1, B * T, -1) for t in (mixed, b, a))
        if conv_state is not None and T == 1:
            mixed, conv_state = causal_conv1d_update(mixed, conv_state, self.conv1d.weight)
        else:
            mixed, conv_state = causal_conv1d(mixed, self.conv1d.weight, initial_state=conv_state,
                                              output_final_state=cache is not None, cu_seqlens=cu_seqlens)
        n = mixed.shape[:2]
        K = self.k_heads * self.k_dim
        q, k, v = mixed.split([K, K, self.v_heads * self.v_dim], dim=-1)
        # One q/k head per key head: the kernels read key head j // r for value head j themselves
        # (normalising and, on the CPU, the K K^T / Q K^T products once per key head).
        q = q.reshape(*n, self.k_heads, self.k_dim)
        k = k.reshape(*n, self.k_heads, self.k_dim)
        v = v.reshape(*n, self.v_heads, self.v_dim)
        beta = b.sigmoid()
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)
        if state is not None and T == 1:
            o, state = gated_delta_rule_step(q, k, v, g, beta, state, use_qk_l2norm_in_kernel=True)
        else:
            o, state = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=state,
                                              output_final_state=cache is not None, cu_seqlens=cu_seqlens,
                                              use_qk_l2norm_in_kernel=True)
        if cache is not None:
            cache.conv[self.layer_idx], cache.state[self.layer_idx] = conv_state, state
        o = self.norm(o.reshape(B, T, self.v_heads, self.v_dim), z)
        return self.out_proj(o.reshape(B, T, -1))


class GatedAttention(nn.Module):
    """`self_attn`; hooks as `decoder.Attention` (`qkv_fn`, `kv_prefix`)."""

    def __init__(self, cfg: Qwen35Config, layer_idx: int):
        super().__init__()
        self.layer_idx, self.rotary_dim = layer_idx, cfg.rotary_dim
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        H, D, bias = cfg.hidden_size, cfg.head_dim, cfg.attention_bias
        self.q_proj = nn.Linear(H, self.n_heads * D * 2, bias=bias)
        self.k_proj = nn.Linear(H, self.n_kv * D, bias=bias)
        self.v_proj = nn.Linear(H, self.n_kv * D, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * D, H, bias=bias)
        self.q_norm = ZeroCentredRMSNorm(D, cfg.rms_norm_eps)
        self.k_norm = ZeroCentredRMSNorm(D, cfg.rms_norm_eps)
        self.kv_prefix = None
        self.qkv_fn = None

    def _rope(self, x, cos, sin):
        d = self.rotary_dim
        return torch.cat([apply_rope(x[..., :d], cos, sin), x[..., d:]], dim=-1)

    def forward(self, x, cos, sin, mask, cache: HybridCache | None):
        B, T, _ = x.shape
        projections = (self.q_proj, self.k_proj, self.v_proj)
        q, k, v = self.qkv_fn(projections, x) if self.qkv_fn else (p(x) for p in projections)
        q, gate = q.view(B, T, self.n_heads, 2 * self.head_dim).chunk(2, dim=-1)  # per head [query | gate]
        q = self._rope(self.q_norm(q).transpose(1, 2), cos, sin)
        k = self._rope(self.k_norm(k.view(B, T, self.n_kv, self.head_dim)).transpose(1, 2), cos, sin)
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        if self.kv_prefix is not None:
            pk, pv = self.kv_prefix(B)
            k = torch.cat([pk.to(k.dtype), k], dim=2)
            v = torch.cat([pv.to(v.dtype), v], dim=2)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, enable_gqa=self.n_kv != self.n_heads
        )
        y = y.transpose(1, 2).reshape(B, T, -1) * torch.sigmoid(gate.reshape(B, T, -1))
        return self.o_proj(y)


class HybridLayer(nn.Module):
    def __init__(self, cfg: Qwen35Config, i: int):
        super().__init__()
        self.linear = cfg.layer_types[i] == "linear_attention"
        if self.linear:
            self.linear_attn = GatedDeltaNet(cfg, i)
        else:
            self.self_attn = GatedAttention(cfg, i)
        self.mlp = QwenSparseMoe(cfg) if cfg.is_sparse(i) else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = ZeroCentredRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = ZeroCentredRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, pad_mask, cu_seqlens, cache):
        h = self.input_layernorm(x)
        if self.linear:
            x = x + self.linear_attn(h, pad_mask, cu_seqlens, cache)
        else:
            x = x + self.self_attn(h, cos, sin, mask, cache)
        out = self.mlp(self.post_attention_layernorm(x))
        y, router_logits = out if isinstance(out, tuple) else (out, None)
        return x + y, router_logits


def packed_cu_seqlens(position_ids: torch.Tensor) -> torch.Tensor:
    """Sequence starts of the B * T flattened tokens: each row's start and every position 0."""
    starts = position_ids == 0
    starts[:, 0] = True
    idx = starts.reshape(-1).nonzero().flatten()
    end = torch.tensor([position_ids.numel()], device=idx.device)
    return torch.cat([idx, end]).to(torch.int32)


class Qwen35Decoder(nn.Module):
    """Embeddings, hybrid layers and the final norm (HF's `model.`, or its `model.language_model.`)."""

    def __init__(self, cfg: Qwen35Config):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(HybridLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = ZeroCentredRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = Rotary(cfg.rotary_dim, cfg.rope_theta, None, cfg.max_position_embeddings)
        self.gradient_checkpointing = False
        self.aux_loss: torch.Tensor | None = None

    def prefix_tokens(self) -> int:
        hooks = [layer.self_attn.kv_prefix for layer in self.layers if not layer.linear]
        return 0 if not hooks or hooks[0] is None else hooks[0].num_tokens

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache: HybridCache | None = None):
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        prefix = self.prefix_tokens()
        packed_ids = position_ids
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary(position_ids + prefix, x.dtype)
        mask = attention_mask_for(attention_mask, packed_ids, T, past, prefix, input_ids.device)
        # Linear layers: pad positions zeroed (as transformers), packed examples restarted.
        pad_mask = None
        if attention_mask is not None and T > 1 and not bool(attention_mask.all()):
            pad_mask = attention_mask[:, -T:]
        cu_seqlens = None
        if cache is None and packed_ids is not None and bool((packed_ids[:, 1:] == 0).any()):
            cu_seqlens = packed_cu_seqlens(packed_ids)
        collect = self.config.aux_loss_coef > 0 and cache is None
        router_logits = []
        for layer in self.layers:
            args = (x, cos, sin, mask, pad_mask, cu_seqlens, cache)
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x, logits = checkpoint(layer, *args, use_reentrant=False)
            else:
                x, logits = layer(*args)
            if collect and logits is not None:
                router_logits.append(logits)
        if cache is not None:
            cache.seen += T
        self.aux_loss = None
        if router_logits:
            cfg = self.config
            loss = load_balancing_loss(router_logits, cfg.num_experts, cfg.num_experts_per_tok, attention_mask)
            self.aux_loss = cfg.aux_loss_coef * loss
        return self.norm(x)


class Qwen35ForCausalLM(MoeCausalLM):
    """`model(input_ids) -> logits [B, T, V]`; `model.model(input_ids) -> hidden [B, T, H]`;
    `model.aux_loss` as the MoE families' (None for the dense ones)."""

    def __init__(self, cfg: Qwen35Config):
        super().__init__(cfg, Qwen35Decoder(cfg))

    def new_cache(self) -> HybridCache:
        return HybridCache(self.config.num_hidden_layers)

    # The one mapping between module names and a multimodal checkpoint's keys.
    def checkpoint_key(self, name: str) -> str:
        """`model.layers.0...` -> the checkpoint's name for it."""
        if self.config.multimodal and name.startswith("model."):
            return LANGUAGE_MODEL + name[len("model."):]
        return name

    def model_key(self, key: str) -> str | None:
        """A checkpoint key -> the module's name for it; None for weights outside the causal LM."""
        if key.startswith(OUTSIDE):
            return None
        if self.config.multimodal:
            if key.startswith(LANGUAGE_MODEL):
                return "model." + key[len(LANGUAGE_MODEL):]
            if not key.startswith("lm_head."):
                return "?" + key  # names no module: the loader refuses it as unexpected
        return key
