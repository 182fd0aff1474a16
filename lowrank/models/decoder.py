"""The Llama-like decoder shared by Qwen2 / Qwen2.5, Qwen3, DeepSeek-LLM and the R1 distills.

Families differ by small switches read from the config: Qwen2's q/k/v biases, Qwen3's
per-head q/k RMSNorm, Llama's attention / MLP biases. Module names mirror the Hugging Face
checkpoint (`model.layers.3.self_attn.q_proj`), so loading is `load_state_dict` and adapter
keys come out in PEFT's form.

Hooks for adapters, which wrap the model from outside:
- every `nn.Linear` is a plain module that an adapter may replace;
- `Attention.qkv_fn` / `MLP.gate_up_fn`: None, or `f(projections, x) -> outputs` called in
  place of running each projection of the same input on its own (LoRA uses it to run q/k/v
  and gate/up as one wide GEMM, since k or v alone is too narrow for a GPU);
- `Attention.kv_prefix`: None, or an object with `num_tokens` and `__call__(batch_size)`
  returning key / value prefixes `[B, n_kv_heads, P, head_dim]` (P-tuning v2). The prefix is
  always visible, carries no rotation, and shifts every position (given or default) by P,
  as PEFT does, so prefix adapters trained with PEFT match.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig
from .rope import Rotary, apply_rope


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # Normalise in fp32 and scale after casting back, as the checkpoints were trained.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class KVCache:
    """Keys and values of the tokens seen so far, one entry per layer."""

    def __init__(self, num_layers: int):
        self.keys: list = [None] * num_layers
        self.values: list = [None] * num_layers

    @property
    def length(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        H, D = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(H, self.n_heads * D, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(H, self.n_kv * D, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(H, self.n_kv * D, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * D, H, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(D, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(D, cfg.rms_norm_eps)
        self.kv_prefix = None
        self.qkv_fn = None

    def forward(self, x, cos, sin, mask, cache: KVCache | None):
        B, T, _ = x.shape
        projections = (self.q_proj, self.k_proj, self.v_proj)
        q, k, v = self.qkv_fn(projections, x) if self.qkv_fn else (p(x) for p in projections)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv, self.head_dim)
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cos, sin)
        k = apply_rope(k.transpose(1, 2), cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        if self.kv_prefix is not None:
            pk, pv = self.kv_prefix(B)
            k = torch.cat([pk.to(k.dtype), k], dim=2)
            v = torch.cat([pv.to(v.dtype), v], dim=2)
        # mask None means plain causal attention over keys aligned with the queries.
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, enable_gqa=self.n_kv != self.n_heads
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)
        self.gate_up_fn = None
        self.tiles = 1  # > 1: in training, the tokens in this many slices, each recomputed in the backward

    def forward(self, x):
        if self.tiles > 1 and self.training and torch.is_grad_enabled() and x.shape[:-1].numel() > 1:
            return self._tiled(x)
        return self._mlp(x)

    def _mlp(self, x):
        projections = (self.gate_proj, self.up_proj)
        gate, up = self.gate_up_fn(projections, x) if self.gate_up_fn else (p(x) for p in projections)
        return self.down_proj(F.silu(gate) * up)

    def _tiled(self, x):
        """The MLP over slices of the tokens, each slice checkpointed (Arctic's TiledMLP): the
        [tokens, intermediate] activations of one slice live at a time instead of all of them,
        which is most of a layer's backward peak at long sequences. The same values; each slice's
        projections run again in the backward, one more MLP forward per layer and step."""
        rows = x.reshape(-1, x.shape[-1])
        slices = rows.tensor_split(min(self.tiles, rows.shape[0]))
        parts = [checkpoint(self._mlp, part, use_reentrant=False) for part in slices]
        return torch.cat(parts).view(*x.shape[:-1], -1)


def set_mlp_tiles(model: nn.Module, tiles: int) -> None:
    """`MLP.tiles` of every MLP of `model` (dense layers and experts, of every family)."""
    for module in model.modules():
        if isinstance(module, MLP):
            module.tiles = tiles


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


def attention_mask_for(attention_mask, position_ids, T, past, prefix, device):
    """The boolean SDPA mask [B, 1, T, prefix + past + T] (True = attend), or None where
    plain causal attention is exact (no padding, no packing, no prefix, no cached keys).

    Packed rows are recognised from `position_ids` restarting at 0: a token attends only to
    tokens of its own example. Every query may attend to itself, so a padded row never
    becomes an all-masked softmax (whose NaN would leak through the zero weights of later
    layers).
    """
    packed = position_ids is not None and past == 0 and bool((position_ids[:, 1:] == 0).any())
    padded = attention_mask is not None and not bool(attention_mask.all())
    if not (packed or padded or prefix or past):
        return None
    if past and T == 1 and not padded and not prefix:
        return None  # one new token attends to everything cached
    S = past + T
    q_pos = torch.arange(past, S, device=device)[:, None]
    k_pos = torch.arange(S, device=device)[None, :]
    allowed = (k_pos <= q_pos)[None]  # [1, T, S]
    if padded:
        allowed = allowed & attention_mask[:, None, :S].bool()
    if packed:
        seg = (position_ids == 0).cumsum(dim=1)
        allowed = allowed & (seg[:, :, None] == seg[:, None, :])
    allowed = allowed | (k_pos == q_pos)[None]
    if prefix:
        allowed = torch.cat([allowed.new_ones(allowed.shape[0], T, prefix), allowed], dim=2)
    return allowed[:, None]


class Decoder(nn.Module):
    """Embeddings, decoder layers and the final norm: HF's `model.` prefix."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings)
        self.gradient_checkpointing = False

    def prefix_tokens(self) -> int:
        hook = self.layers[0].self_attn.kv_prefix
        return 0 if hook is None else hook.num_tokens

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache: KVCache | None = None):
        """Final normed hidden states [B, T, H]; `CausalLM` applies the LM head to them."""
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        prefix = self.prefix_tokens()
        packed_ids = position_ids
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        x = self.embed_tokens(input_ids)
        # Real tokens sit after the prefix, given positions or not, as in PEFT.
        cos, sin = self.rotary(position_ids + prefix, x.dtype)
        mask = attention_mask_for(attention_mask, packed_ids, T, past, prefix, input_ids.device)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, mask, cache, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache)
        return self.norm(x)


class CausalLM(nn.Module):
    """`model(input_ids) -> logits [B, T, V]`; `model.model(input_ids) -> hidden [B, T, H]`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache: KVCache | None = None):
        return self.lm_head(self.model(input_ids, attention_mask, position_ids, cache))

    def new_cache(self) -> KVCache:
        return KVCache(self.config.num_hidden_layers)
