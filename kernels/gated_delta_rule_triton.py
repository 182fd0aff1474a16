"""The Triton path of `gated_delta_rule.py`: the autograd Function over the chunked kernels.

The forward kernels are in gated_delta_rule_triton_fwd.py (W and U0 by the UT transform, the
state pass, the output), the backward ones in gated_delta_rule_triton_bwd.py (the reverse
state-gradient pass, then dq, dk, dv, dg, dbeta per chunk). The Function saves only its operands:
the backward recomputes W, U0, U and the per-chunk states with the forward's first two launches
(about the forward's cost again) rather than keep [B*H, T/64, K, V] fp32 states per layer
alive between forward and backward.

This module imports triton unguarded: `gated_delta_rule.py` imports it only once the Triton path is taken.
"""

import torch
import triton

from . import gated_delta_rule_triton_bwd as bwd
from . import gated_delta_rule_triton_fwd as fwd
from .gated_delta_rule_torch import CHUNK

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# A whole K (and, in _wy_kernel, V) row per tile. At 256 the state passes and _dqk_kernel need
# 256-281 KB of shared memory (ptxas, sm_90a), over an H100's 227 KB; at 128 they fit (Qwen3.5's size).
MAX_HEAD_DIM = 128


# --------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------


class ChunkGatedDeltaRule(torch.autograd.Function):
    """(o, final_state) = the chunked gated delta rule, forward and backward in Triton. Saves only
    the operands: the backward recomputes W, U0, U and the per-chunk states (two launches)."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, initial_state, scale):
        o, final = fwd.forward(q, k, v, g, beta, initial_state, scale)
        ctx.save_for_backward(q, k, v, g, beta, initial_state)
        ctx.scale = scale
        ctx.set_materialize_grads(False)  # an unused final state sends None: no zeros to read
        return o, final

    @staticmethod
    def backward(ctx, do, dfinal):
        q, k, v, g, beta, initial_state = ctx.saved_tensors
        do = torch.zeros_like(v) if do is None else do.contiguous()
        dfinal = None if dfinal is None else dfinal.float().contiguous()
        grads = bwd.backward(q, k, v, g, beta, initial_state, ctx.scale, do, dfinal)
        return *(d if need else None for d, need in zip(grads, ctx.needs_input_grad[:6])), None


def check_supported(q, k, v, g, beta, initial_state) -> str | None:
    """Why the Triton path cannot take these operands, or None when it can."""
    for t in (q, k, v):
        if t.dtype not in DTYPES:
            return f"dtype {t.dtype} (the kernels take {', '.join(map(str, DTYPES))})"
        if t.dtype == torch.bfloat16 and not v.is_cuda:
            return "bf16 under Triton's interpreter (its tl.dot on bf16 returns garbage in triton 3.9)"
    for name, t in (("q", q), ("k", k), ("g", g), ("beta", beta), ("initial_state", initial_state)):
        if t is not None and t.device != v.device:
            return f"{name} on {t.device}, v on {v.device}"
    if max(k.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        return f"head dims K = {k.shape[-1]}, V = {v.shape[-1]} (at most {MAX_HEAD_DIM})"
    if v.shape[1] == 0 or v.numel() == 0:
        return "an empty input"
    if max(q.numel(), v.numel()) >= 2**31 or v.shape[0] * v.shape[2] * triton.cdiv(v.shape[1], CHUNK) \
            * k.shape[-1] * v.shape[-1] >= 2**31:  # int32 offsets, the per-chunk states included
        return "2^31 elements or more in an operand"
    return None


def chunk_gated_delta_rule_triton(q, k, v, g, beta, initial_state, scale):
    """The Triton path for a dense batch (no cu_seqlens). Returns (o, final state fp32)."""
    if initial_state is not None:
        initial_state = initial_state.float().contiguous()
    return ChunkGatedDeltaRule.apply(q.contiguous(), k.contiguous(), v.contiguous(), g.contiguous(),
                                     beta.contiguous(), initial_state, float(scale))
