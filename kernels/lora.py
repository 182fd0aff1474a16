"""Low-rank (LoRA) linear: y = x @ W.T + bias + scale * (dropout(x) @ A.T) @ B.T.

The torch reference below is the spec, the CPU fallback and the test oracle.
(The fused Triton path is being written; until it lands every call takes the reference.)
"""

import torch
import torch.nn.functional as F


def lora_linear_reference(x, weight, bias, lora_a, lora_b, scale, dropout_p=0.0, training=True):
    """The plain torch computation, as PEFT does it: base matmul, dropout, x@A, @B, scale-and-add."""
    base = F.linear(x, weight, bias)
    h = F.dropout(x, dropout_p, training) if dropout_p > 0.0 else x
    return base + scale * F.linear(F.linear(h, lora_a), lora_b)


def lora_linear(x, weight, bias, lora_a, lora_b, scale, dropout_p=0.0, training=True):
    """x: [..., K]; weight: [N, K] (frozen); bias: [N] or None; lora_a: [r, K]; lora_b: [N, r]."""
    return lora_linear_reference(x, weight, bias, lora_a, lora_b, scale, dropout_p, training)
