"""Routed experts and the decoder shared by the MoE families (DeepSeek-V2/V3, Qwen2/3-MoE).

Experts stay as the checkpoint names them: `mlp.experts.N.{gate,up,down}_proj`, one `MLP`
each in an `nn.ModuleList`. Loading is `load_state_dict` with no renaming, and a LoRA on an
expert's projection is an ordinary wrapped `nn.Linear` whose key is PEFT's.

`dispatch` runs them grouped by expert: the N*k (token, expert) pairs are sorted by expert id,
the tokens gathered into one contiguous block per expert, each expert run once on its block,
and the weighted outputs put back in token order and summed over each token's k experts.
Work is a loop over experts (E small GEMM triples per MoE layer), never over tokens; memory is
a gathered copy of the routed activations and of their outputs (N*k rows each); one host sync
per layer reads the per-expert counts.

The router of each MoE layer (`mlp.gate`) is not an `nn.Linear`, so LoRA never wraps it, and
its weight is built frozen: routing stays as pretrained unless `set_routers_trainable` asks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .decoder import KVCache, RMSNorm, attention_mask_for
from .rope import Rotary


def dispatch(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, experts: nn.ModuleList) -> torch.Tensor:
    """y[t] = sum_j weights[t, j] * experts[expert_ids[t, j]](x[t]).

    x: [N, H]; expert_ids, weights: [N, k]. The products are taken in the weights' dtype (fp32
    for DeepSeek's router, the model's for Qwen's); each token's k outputs are put back in
    (token, slot) order and summed there, as transformers' grouped path does: no atomics, so
    the sum is deterministic on GPUs too.
    """
    N, k = expert_ids.shape
    if N == 0:
        return torch.zeros_like(x)
    flat = expert_ids.reshape(-1)
    order = flat.argsort(stable=True)  # (token, slot) pairs grouped by expert
    counts = torch.bincount(flat, minlength=len(experts)).tolist()
    blocks = x[order // k].split(counts)
    y = torch.cat([experts[e](block) for e, block in enumerate(blocks) if counts[e]])
    y = y * weights.reshape(-1)[order, None]
    y = y.new_empty(y.shape).index_copy(0, order, y)  # back to (token, slot) order
    return y.view(N, k, -1).sum(dim=1).to(x.dtype)


def load_balancing_loss(router_logits: list[torch.Tensor], num_experts: int, top_k: int,
                        attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch Transformer's auxiliary loss, as transformers computes it for Qwen-MoE
    (`load_balancing_loss_func`): E * sum_e f_e * P_e, where over all MoE layers and (unpadded)
    tokens, f_e counts how often expert e is among a token's top-k of softmax(logits) and P_e
    is its mean softmax probability, both divided by the number of (layer, token) rows.
    Minimal (= top_k) when routing is uniform. Only P_e carries a gradient.

    router_logits: one [N, E] tensor per MoE layer; attention_mask: [B, T] with B * T = N.
    """
    counts = probs = 0.0
    rows = 0.0
    mask = None if attention_mask is None else attention_mask.reshape(-1, 1).float()
    for logits in router_logits:
        p = logits.float().softmax(dim=-1)
        chosen = torch.zeros_like(p).scatter_(1, p.topk(top_k, dim=-1).indices, 1.0)
        if mask is not None:
            m = mask.to(p.device)
            chosen, p = chosen * m, p * m
            rows = rows + m.sum()
        else:
            rows = rows + p.shape[0]
        counts = counts + chosen.sum(dim=0)
        probs = probs + p.sum(dim=0)
    return num_experts * torch.sum((counts / rows) * (probs / rows))


def set_routers_trainable(model: nn.Module, trainable: bool = True) -> int:
    """Let full fine-tuning train the routers (`mlp.gate.weight`), frozen by default.
    Returns how many router weights were switched."""
    n = 0
    for name, p in model.named_parameters():
        if name.endswith("mlp.gate.weight"):
            p.requires_grad_(trainable)
            n += 1
    return n


class MoeDecoderLayer(nn.Module):
    """Pre-norm block; `mlp` is a dense `MLP` or a sparse block returning (y, router_logits)."""

    def __init__(self, self_attn: nn.Module, mlp: nn.Module, hidden: int, eps: float):
        super().__init__()
        self.input_layernorm = RMSNorm(hidden, eps)
        self.self_attn = self_attn
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        self.mlp = mlp

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        out = self.mlp(self.post_attention_layernorm(x))
        y, router_logits = out if isinstance(out, tuple) else (out, None)
        return x + y, router_logits


class MoeDecoder(nn.Module):
    """Embeddings, decoder layers and the final norm (HF's `model.` prefix), like `Decoder`.

    When `config.aux_loss_coef > 0`, a forward without a cache leaves
    `aux_loss = aux_loss_coef * load_balancing_loss(...)` over its MoE layers (padding excluded
    through `attention_mask`), for the training loop to add to the LM loss; else None.
    """

    def __init__(self, cfg, make_layer: Callable[[int], nn.Module], rope_dim: int, num_experts: int, top_k: int):
        super().__init__()
        self.config = cfg
        self.num_experts, self.top_k = num_experts, top_k
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(make_layer(i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = Rotary(rope_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings)
        self.gradient_checkpointing = False
        self.aux_loss: torch.Tensor | None = None

    def prefix_tokens(self) -> int:
        hook = getattr(self.layers[0].self_attn, "kv_prefix", None)
        return 0 if hook is None else hook.num_tokens

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache: KVCache | None = None):
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        prefix = self.prefix_tokens()
        if position_ids is None:
            position_ids = torch.arange(prefix + past, prefix + past + T, device=input_ids.device).expand(B, T)
            packed_ids = None
        else:
            packed_ids = position_ids
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary(position_ids, x.dtype)
        mask = attention_mask_for(attention_mask, packed_ids, T, past, prefix, input_ids.device)
        collect = self.config.aux_loss_coef > 0 and cache is None
        router_logits = []
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x, logits = checkpoint(layer, x, cos, sin, mask, cache, use_reentrant=False)
            else:
                x, logits = layer(x, cos, sin, mask, cache)
            if collect and logits is not None:
                router_logits.append(logits)
        self.aux_loss = None
        if router_logits:
            loss = load_balancing_loss(router_logits, self.num_experts, self.top_k, attention_mask)
            self.aux_loss = self.config.aux_loss_coef * loss
        return self.norm(x)


class MoeCausalLM(nn.Module):
    """`model(input_ids) -> logits [B, T, V]`; `model.model(input_ids) -> hidden [B, T, H]`;
    `model.aux_loss`: the weighted load-balancing loss of the last forward, or None."""

    def __init__(self, cfg, decoder: MoeDecoder):
        super().__init__()
        self.config = cfg
        self.model = decoder
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def aux_loss(self) -> torch.Tensor | None:
        return self.model.aux_loss

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache: KVCache | None = None):
        return self.lm_head(self.model(input_ids, attention_mask, position_ids, cache))

    def new_cache(self) -> KVCache:
        return KVCache(self.config.num_hidden_layers)
