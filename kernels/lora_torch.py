"""The torch computations of the LoRA linear (see lora.py for the math): PEFT's reference, the
CPU fallback, and the shape check every path shares. Kept apart from `lora.py`'s dispatch so the
quantised path (lora_quantized.py), which `lora.py` dispatches to, can use them without a cycle."""

import torch
import torch.nn.functional as F

from .frozen_linear import compute_dtype, frozen_linear, intended_dtype, no_autocast


def lora_linear_reference(x, weight, bias, lora_a, lora_b, scale, dropout_p=0.0, training=True):
    """The plain torch computation, as PEFT does it: base matmul, dropout, x@A, @B, scale-and-add."""
    base = F.linear(x, weight, bias)
    h = F.dropout(x, dropout_p, training) if dropout_p > 0.0 else x
    return base + scale * F.linear(F.linear(h, lora_a), lora_b)


def lora_linear_torch(x, weight, bias, lora_a, lora_b, scale, dropout_p=0.0, training=True):
    """The reference with two full-width passes fewer, for devices without the Triton path:
    the scale goes on the r-wide product instead of the N-wide output, and the low-rank
    product is added by the same addmm that computes it. Equal to the reference up to rounding.

    `weight` may be quantised (nf4.NF4Weight, int8.Int8Weight): `frozen_linear` dequantises it
    for its matmul. On a CPU without bf16 / fp16 units a half-precision call is computed in fp32
    and rounded once at the end (`frozen_linear.compute_dtype`: those GEMMs run there 5-500x
    slower than fp32 ones)."""
    dtype, out_dtype = compute_dtype(x), intended_dtype(x)
    with no_autocast(x):
        xc = x.to(dtype)
        h = F.dropout(xc, dropout_p, training) if dropout_p > 0.0 else xc
        xa = F.linear(h, lora_a.to(dtype)) * scale
        out = _plus_low_rank(frozen_linear(xc, weight, bias, dtype), xa, lora_b, dtype)
    return out.to(out_dtype)


def _plus_low_rank(base, xa, lora_b, dtype):
    """base + xa @ B^T, as one addmm into a copy of base. B^T as a row-major [r, N] copy (r * N
    elements): autograd then computes dB^T = xa^T @ dy, a GEMM with r output rows, rather than
    (dy^T @ xa)^T for the column-major view, whose [N, r] output was ~2.5x slower on the CPU
    (r = 8, N = 1408)."""
    bt = lora_b.to(dtype).t().contiguous()
    return torch.addmm(base.reshape(-1, base.shape[-1]), xa.reshape(-1, xa.shape[-1]), bt).view(base.shape)


def lora_linear_merged_torch(x, weights, biases, lora_as, lora_bs, scales, dropout_p=0.0, training=True):
    """Several projections of one x, as separate `lora_linear_torch` calls would compute them,
    with the r-wide products of x done together: x @ [A_1; A_2; ...]^T is one GEMM, so x is read
    once for all of them (and its backward, dA and the LoRA part of dx, one GEMM each, not one per
    projection). These products are memory-bound on a CPU: their cost is the passes over x.
    With dropout each projection draws its own mask, so the products stay separate."""
    if (dropout_p > 0.0 and training) or len(weights) == 1:
        return [lora_linear_torch(x, w, b, a, bb, sc, dropout_p, training)
                for w, b, a, bb, sc in zip(weights, biases, lora_as, lora_bs, scales)]
    dtype, out_dtype = compute_dtype(x), intended_dtype(x)
    ranks = [a.shape[0] for a in lora_as]
    with no_autocast(x):
        xc = x.to(dtype)
        col_scale = torch.cat([torch.full((r,), float(sc), dtype=dtype, device=x.device)
                               for r, sc in zip(ranks, scales)])
        xa = F.linear(xc, torch.cat([a.to(dtype) for a in lora_as])) * col_scale
        return [_plus_low_rank(frozen_linear(xc, w, b, dtype), xa_s, bb, dtype).to(out_dtype)
                for w, b, bb, xa_s in zip(weights, biases, lora_bs, xa.split(ranks, dim=-1))]


def lora_linear_merged_reference(x, weights, biases, lora_as, lora_bs, scales, dropout_p=0.0, training=True):
    """Separate reference calls, one per projection."""
    return [lora_linear_reference(x, w, b, a, bb, s, dropout_p, training)
            for w, b, a, bb, s in zip(weights, biases, lora_as, lora_bs, scales, strict=True)]


def check_shapes(x, weights, biases, lora_as, lora_bs, scales):
    counts = {len(weights), len(biases), len(lora_as), len(lora_bs), len(scales)}
    if len(counts) != 1 or not weights:
        raise ValueError("weights, biases, lora_as, lora_bs and scales need one entry per projection")
    K = x.shape[-1]
    for i, (w, b, a, bb) in enumerate(zip(weights, biases, lora_as, lora_bs)):
        n, r = w.shape[0], a.shape[0]
        expected = {"weight": (w, (n, K)), "lora_a": (a, (r, K)), "lora_b": (bb, (n, r))}
        if b is not None:
            expected["bias"] = (b, (n,))
        for name, (t, shape) in expected.items():
            if tuple(t.shape) != shape:
                raise ValueError(
                    f"projection {i}: {name} has shape {tuple(t.shape)}, expected {shape} "
                    f"for x [..., {K}], weight [{n}, {K}], rank {r}"
                )
