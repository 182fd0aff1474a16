"""Low-rank (LoRA) linear: y = x @ W.T + bias + scale * (dropout(x) @ A.T) @ B.T.

Shapes: x [..., K], W [N, K] (frozen), bias [N] or None, A [r, K], B [N, r].
With h = dropout(x) = x * keep / (1 - p) and xs = scale * h @ A.T ([M, r], small), the
gradients are
    dB = dy.T @ xs            dxs = scale * dy @ B            dA = dxs.T @ h
    dx = dy @ W + (dxs @ A) * keep / (1 - p)
The base branch never saw dropout, so only the LoRA branch of dx is masked.

Two paths, one answer within dtype tolerance (`dispatch` chooses):
  - torch: `lora_linear_reference` is PEFT's computation (the spec, and the baseline the
    benchmark compares with); `lora_linear_torch`, the fallback on CPUs and without triton,
    is the same math with the scale on the r-wide product and the low-rank term added by
    its own addmm (two passes over the [M, N] output fewer: ~12% of a CPU LoRA training step
    on a 512-wide Qwen2 shape);
  - the fused Triton kernels in `lora_merged.py`: the LoRA product is accumulated into the base
    GEMM's tile, dropout is applied as x is read and regenerated from a seed in the backward
    (no mask kept), and one read of dy gives both dxs and dB. See docs/kernels.md.

`lora_linear_merged` runs several projections of the same x (q/k/v, gate/up) as one wide
GEMM; the Triton kernels are written for that case and a single projection is a merge of one.
Each projection keeps its own dropout mask, as separate calls would. The Triton path draws its
dropout seed from torch's CPU generator and rounds p to a multiple of 2^-16.
"""

import torch

from .dispatch import kernel_choice, use_triton
from .lora_torch import (check_shapes as _check_shapes, lora_linear_merged_reference,  # noqa: F401
                         lora_linear_merged_torch, lora_linear_reference, lora_linear_torch)


def lora_linear(x, weight, bias, lora_a, lora_b, scale, dropout_p=0.0, training=True):
    """x: [..., K]; weight: [N, K] (frozen), a tensor or a quantised weight (nf4.NF4Weight,
    int8.Int8Weight); bias: [N] or None; lora_a: [r, K]; lora_b: [N, r]."""
    if not isinstance(weight, torch.Tensor):
        from .lora_quantized import lora_linear_quantized

        return lora_linear_quantized(x, weight, bias, lora_a, lora_b, scale, dropout_p, training)
    _check_shapes(x, [weight], [bias], [lora_a], [lora_b], [scale])
    if not _takes_triton(x, [weight], [bias], [lora_a], [lora_b]):
        return lora_linear_torch(x, weight, bias, lora_a, lora_b, scale, dropout_p, training)
    from .lora_merged import lora_projections

    return lora_projections(x, [weight], [bias], [lora_a], [lora_b], [scale], dropout_p, training)


def lora_linear_merged(x, weights, biases, lora_as, lora_bs, scales, dropout_p=0.0, training=True):
    """Several LoRA projections of one input, e.g. q/k/v or gate/up, as one wide GEMM.

    weights, biases, lora_as, lora_bs, scales: one entry per projection (a bias may be None).
    Returns the list of outputs, [..., N_s] each: views into one [..., sum N_s] tensor, so
    reshaping the last dim into heads is free. Equal to separate `lora_linear` calls.
    The weights may be quantised (nf4.NF4Weight, int8.Int8Weight).
    """
    if not all(isinstance(w, torch.Tensor) for w in weights):
        from .lora_quantized import lora_linear_merged_quantized

        return lora_linear_merged_quantized(x, weights, biases, lora_as, lora_bs, scales, dropout_p, training)
    _check_shapes(x, weights, biases, lora_as, lora_bs, scales)
    if not _takes_triton(x, weights, biases, lora_as, lora_bs):
        return lora_linear_merged_torch(x, weights, biases, lora_as, lora_bs, scales, dropout_p, training)
    from .lora_merged import lora_projections

    y = lora_projections(x, weights, biases, lora_as, lora_bs, scales, dropout_p, training)
    return list(y.split([w.shape[0] for w in weights], dim=-1))


def _takes_triton(x, weights, biases, lora_as, lora_bs) -> bool:
    if not use_triton(x):
        return False
    from .lora_merged import check_supported  # imports triton: only reached when it imports

    why = check_supported(x, weights, biases, lora_as, lora_bs)
    if why is None:
        return True
    if kernel_choice() == "triton":
        raise ValueError(f"LOWRANK_KERNEL=triton, but the LoRA kernels do not take {why}")
    return False  # auto: the reference serves what the kernels do not
