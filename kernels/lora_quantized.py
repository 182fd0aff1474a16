"""LoRA on a frozen quantised base weight (QLoRA): y = x @ deq(W).T + bias + scale * dropout(x) @ A.T @ B.T.

`qweight` is an `nf4.NF4Weight` or an `int8.Int8Weight`. deq(W) is the weight dequantised in
the compute dtype (x's), exactly as `dequantize_nf4` / `dequantize_int8` give it. The gradients
are `lora.py`'s with W replaced by deq(W), and none for W:
    dx = dy @ deq(W) + (dxs @ A) * keep / (1 - p),   dA, dB as for a dense W.

Nothing weight-sized outlives the forward: the dequantised weight is made for the matmul and
dropped, and made again in the backward for dx (one more dequantisation per step, against
N * K * 2 bytes of bf16 kept per layer). Two paths (`dispatch` chooses):
  - torch: `lora_torch.lora_linear_torch`, whose base term is `frozen_linear.FrozenLinear` (an
    autograd Function whose saved state is the quantised weight only; in fp32 it dequantises a
    block of rows at a time);
  - Triton, NF4 only (`lora_nf4.py`): the dequantisation fused into the tile loops of the LoRA
    GEMMs, so the base term reads 0.5 byte per weight. int8 weights take the torch path.
"""

from .dispatch import kernel_choice, use_triton
from .frozen_linear import dequantize
from .int8 import Int8Weight
from .lora_torch import (check_shapes as _check_shapes, lora_linear_merged_torch, lora_linear_reference,
                         lora_linear_torch)
from .nf4 import NF4Weight

QUANTIZED = (NF4Weight, Int8Weight)

# The torch path: `lora_linear_torch`, whose base matmul (`frozen_linear`) dequantises W.
lora_linear_quantized_torch = lora_linear_torch


def lora_linear_quantized_reference(x, qweight, bias, lora_a, lora_b, scale, dropout_p=0.0, training=True):
    """The spec: PEFT's computation on the dequantised weight (which autograd then keeps)."""
    return lora_linear_reference(x, dequantize(qweight, x.dtype), bias, lora_a, lora_b, scale, dropout_p, training)


def lora_linear_quantized(x, qweight, bias, lora_a, lora_b, scale, dropout_p=0.0, training=True):
    """x: [..., K]; qweight: NF4Weight or Int8Weight of shape [N, K]; bias: [N] or None;
    lora_a: [r, K]; lora_b: [N, r]. `lora.lora_linear` comes here when its weight is quantised."""
    _check_shapes(x, [qweight], [bias], [lora_a], [lora_b], [scale])
    if not _takes_triton(x, [qweight], [bias], [lora_a], [lora_b]):
        return lora_linear_quantized_torch(x, qweight, bias, lora_a, lora_b, scale, dropout_p, training)
    from .lora_nf4 import lora_projections_nf4

    return lora_projections_nf4(x, [qweight], [bias], [lora_a], [lora_b], [scale], dropout_p, training)


def lora_linear_merged_quantized(x, qweights, biases, lora_as, lora_bs, scales, dropout_p=0.0, training=True):
    """`lora.lora_linear_merged` with quantised weights: one fused launch on the Triton path,
    separate projections on the torch path."""
    _check_shapes(x, qweights, biases, lora_as, lora_bs, scales)
    if not _takes_triton(x, qweights, biases, lora_as, lora_bs):
        return lora_linear_merged_torch(x, qweights, biases, lora_as, lora_bs, scales, dropout_p, training)
    from .lora_nf4 import lora_projections_nf4

    y = lora_projections_nf4(x, qweights, biases, lora_as, lora_bs, scales, dropout_p, training)
    return list(y.split([w.shape[0] for w in qweights], dim=-1))


def _takes_triton(x, qweights, biases, lora_as, lora_bs) -> bool:
    if not use_triton(x):
        return False
    from .lora_nf4 import check_supported_nf4  # imports triton: only reached when it imports

    why = check_supported_nf4(x, qweights, biases, lora_as, lora_bs)
    if why is None:
        return True
    if kernel_choice() == "triton":
        raise ValueError(f"LOWRANK_KERNEL=triton, but the quantised LoRA kernels do not take {why}")
    return False
