"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B) and Qwen3-MoE (Qwen3-30B-A3B, 235B-A22B).

Attention is the dense Qwen attention (`decoder.Attention`: Qwen2's q/k/v biases, Qwen3's
per-head q/k RMSNorm), prefix-adapter hook included. A layer is sparse when it is not in
`mlp_only_layers` and (index + 1) is a multiple of `decoder_sparse_step`; other layers keep a
dense `MLP` of `intermediate_size`.

Sparse block: router logits = x @ gate.T in the model's dtype, softmax in fp32, top-k,
renormalised over the k when `norm_topk_prob`, cast back to the model's dtype; the experts
run through `moe.dispatch`. Qwen2-MoE adds a shared expert scaled per token by
sigmoid(shared_expert_gate(x)); Qwen3-MoE has none.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .decoder import MLP, Attention
from .moe import MoeCausalLM, MoeDecoder, MoeDecoderLayer, dispatch
from .moe_config import QwenMoeConfig


class TopKRouter(nn.Module):
    """`mlp.gate`: weight [E, H], frozen unless asked."""

    def __init__(self, cfg: QwenMoeConfig):
        super().__init__()
        self.top_k, self.normalize = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.weight = nn.Parameter(torch.zeros(cfg.num_experts, cfg.hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor):
        """x [N, H] -> (logits [N, E], weights [N, k] in x's dtype, expert ids [N, k])."""
        logits = F.linear(x, self.weight)
        weights, ids = logits.softmax(dim=-1, dtype=torch.float32).topk(self.top_k, dim=-1)
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights.to(logits.dtype), ids


class QwenSparseMoe(nn.Module):
    def __init__(self, cfg: QwenMoeConfig):
        super().__init__()
        H = cfg.hidden_size
        self.gate = TopKRouter(cfg)
        self.experts = nn.ModuleList(MLP(H, cfg.moe_intermediate_size) for _ in range(cfg.num_experts))
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = MLP(H, cfg.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(H, 1, bias=False)

    def forward(self, x):
        """x [B, T, H] -> (y [B, T, H], router logits [B*T, E])."""
        flat = x.reshape(-1, x.shape[-1])
        logits, weights, ids = self.gate(flat)
        y = dispatch(flat, ids, weights, self.experts)
        if hasattr(self, "shared_expert"):
            y = y + torch.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)
        return y.view_as(x), logits


def _layer(cfg: QwenMoeConfig, i: int) -> MoeDecoderLayer:
    mlp = QwenSparseMoe(cfg) if cfg.is_sparse(i) else MLP(cfg.hidden_size, cfg.intermediate_size)
    return MoeDecoderLayer(Attention(cfg, i), mlp, cfg.hidden_size, cfg.rms_norm_eps)


class QwenMoeForCausalLM(MoeCausalLM):
    """qwen2_moe and qwen3_moe."""

    def __init__(self, cfg: QwenMoeConfig):
        decoder = MoeDecoder(cfg, lambda i: _layer(cfg, i), cfg.head_dim, cfg.num_experts, cfg.num_experts_per_tok)
        super().__init__(cfg, decoder)
