"""Fused linear cross-entropy: the LM head and the summed loss without the [N, V] logits.

For hidden states h [N, H], head weight W [V, H] and labels y [N] (IGNORE_INDEX = -100 skipped):

    z_i = W h_i (+ b)            loss = sum_{i: y_i != -100} lse(z_i) - z_i[y_i]
    dloss/dz_i = softmax(z_i) - onehot(y_i)      (zero for ignored rows)
    dh_i = W^T dz_i              dW = sum_i dz_i h_i^T          db = sum_i dz_i

The loss is linear in its upstream gradient, so the forward computes the gradients too and
the backward only scales them. Rows are processed in chunks: a chunk's logits [C, V] are
computed in fp32 (whatever the input dtype), one step turns them *in place* into dz and the
per-row losses, two matmuls fold dz into dh and dW, and the buffer is dropped. No [N, V]
tensor ever exists: for Qwen (V = 151,936) the unfused loss holds 0.6 MB of fp32 logits per
token, plus as much again for their softmax and gradient; here a chunk costs C * V * 4 bytes.

Ignored rows contribute nothing, so they are dropped before the first matmul: prompt-masked
SFT batches skip the head's cost for every prompt token.

The step (lse, loss, softmax - onehot, in place) has a Triton kernel and a torch twin; the
matmuls stay in cuBLAS/oneDNN. Pick with LOWRANK_KERNEL (see dispatch.py). Why fuse the step:
it is memory-bound. The kernel reads each row twice (online max/sum, then the gradient) and
writes it once, 12 bytes per fp32 logit; the torch twin's five passes (max, exp, sum, divide,
mask) move about 32. The two GEMMs around it do 4H flops per logit: 3,584 for Qwen2.5-0.5B
(H = 896), while an H100 moves a byte in the time of ~300 bf16 flops, so the kernel's 12 bytes
cost about as much as the matmuls and the twin's 32 bytes more than twice as much. With a
small hidden size the step, not the matmuls, sets the loss's speed (estimate, not measured).
"""

from functools import partial

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .dispatch import use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # the library works without triton: every call takes the torch path
    triton = None

IGNORE_INDEX = -100

# A chunk's fp32 logits take at most this many bytes (Qwen's vocabulary: 256 rows, 155 MB).
_CHUNK_BYTES = 256 * 2**20
# An upcast block of a half-precision head (CPUs) takes at most this many bytes: 4,681 rows of
# Qwen2.5-7B's, still a wide GEMM, and a quarter of the scratch of a chunk-sized block.
_HEAD_BLOCK_BYTES = 64 * 2**20
# One program streams one row; chunks have few rows, so each program must be wide (Liger's sizes).
_MAX_BLOCK_V = 32768

# fp32-output GEMMs on half inputs (torch >= 2.8, CUDA only); elsewhere half inputs are upcast.
_HAS_FP32_OUT_MM = "dtype" in torch.ops.aten.mm.overloads()


def _fp32_out_gemm(t: torch.Tensor) -> bool:
    return t.is_cuda and _HAS_FP32_OUT_MM


if triton is not None:

    @triton.jit
    def _cross_entropy_grad_kernel(
        # pointers: logits [C, V] fp32, overwritten with d loss / d logits; labels [C]; loss [C]
        logits_ptr,
        labels_ptr,
        loss_ptr,
        # sizes and strides
        V,
        stride_row,
        # meta-parameters
        IGNORE: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + row * stride_row
        label = tl.load(labels_ptr + row)

        if label == IGNORE:
            zeros = tl.zeros([BLOCK_V], dtype=tl.float32)
            for start in range(0, V, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                tl.store(row_ptr + cols, zeros, mask=cols < V)
            tl.store(loss_ptr + row, 0.0)
            return

        # Pass 1: running max m and sum d of exp(z - m) over the row (online softmax).
        m = float("-inf")
        d = 0.0
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            z = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf"))
            m_new = tl.maximum(m, tl.max(z, axis=0))
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
            m = m_new
        lse = m + tl.log(d)
        # Read the target logit before pass 2 overwrites it.
        target = tl.load(row_ptr + label)

        # Pass 2: softmax - onehot, written over the logits.
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            z = tl.load(row_ptr + cols, mask=cols < V, other=0.0)
            grad = tl.exp(z - lse) - tl.where(cols == label, 1.0, 0.0)
            tl.store(row_ptr + cols, grad, mask=cols < V)
        tl.store(loss_ptr + row, lse - target)


def cross_entropy_grad_triton_(logits, labels, loss_out, block_v=None):
    """The Triton step: logits [C, V] fp32 become d loss / d logits; loss_out [C] gets each row's loss."""
    C, V = logits.shape
    if logits.dtype != torch.float32 or logits.stride(1) != 1:
        raise ValueError(f"the kernel takes row-contiguous fp32 logits, got {logits.dtype}")
    if labels.shape != (C,) or loss_out.shape != (C,) or loss_out.dtype != torch.float32:
        raise ValueError(f"labels and loss_out must be [{C}] (loss_out fp32)")
    if C == 0:
        return loss_out
    block = block_v or min(_MAX_BLOCK_V, triton.next_power_of_2(V))
    _cross_entropy_grad_kernel[(C,)](
        logits, labels, loss_out, V, logits.stride(0),
        IGNORE=IGNORE_INDEX, BLOCK_V=block, num_warps=32 if block >= 8192 else 8,
    )
    return loss_out


def cross_entropy_grad_torch_(logits, labels, loss_out, all_valid=False):
    """The torch step, and the spec of the kernel: same contract, any float dtype. all_valid: the
    caller has dropped the ignored rows (as `_chunked_forward` does), so the pass that zeroes
    them is skipped (one of the six passes over the chunk's logits)."""
    if all_valid:
        m = logits.amax(dim=1, keepdim=True)
        target = logits.gather(1, labels[:, None]).squeeze(1)
        logits.sub_(m).exp_()
        s = logits.sum(dim=1, keepdim=True)
        logits.div_(s)
        torch.sub((m + s.log()).squeeze(1), target, out=loss_out)
        logits.scatter_add_(1, labels[:, None], logits.new_full((labels.shape[0], 1), -1.0))
        return loss_out
    valid = labels != IGNORE_INDEX
    safe = labels.masked_fill(~valid, 0)
    target = logits.gather(1, safe[:, None]).squeeze(1)
    # exp(z - max) computed in place is reused as the softmax: no second [C, V] buffer.
    m = logits.amax(dim=1, keepdim=True)
    logits.sub_(m).exp_()
    s = logits.sum(dim=1, keepdim=True)
    logits.div_(s)
    loss_out.copy_(torch.where(valid, (m + s.log()).squeeze(1) - target, 0.0))
    logits.scatter_add_(1, safe[:, None], -valid[:, None].to(logits.dtype))
    logits.masked_fill_(~valid[:, None], 0.0)
    return loss_out


def _matmul_fp32(a, b):
    """a @ b with at least fp32 output: half inputs reach here only where the GEMM can emit fp32."""
    if a.dtype in (torch.float16, torch.bfloat16):
        return torch.mm(a, b, out_dtype=torch.float32)
    return a @ b


def _head_blocks(weight, compute, half_gemm):
    """(start, W[start:end] in the GEMM's dtype) over the head's vocabulary rows. Where no
    fp32-output GEMM takes half inputs (CPUs), a half W is upcast one block at a time, since a
    whole fp32 copy would be V * H * 4 bytes (2.2 GB for Qwen2.5-7B's head, on top of its bf16)."""
    if half_gemm or weight.dtype == compute:
        return [(0, weight)]
    rows = max(1, _HEAD_BLOCK_BYTES // (4 * weight.shape[1]))
    return ((v, weight[v : v + rows].to(compute)) for v in range(0, weight.shape[0], rows))


def _default_chunk_size(vocab):
    """The largest power of two of rows whose fp32 logits fit in _CHUNK_BYTES."""
    rows = max(1, _CHUNK_BYTES // (4 * vocab))
    return 1 << (rows.bit_length() - 1)


def _chunked_forward(hidden, weight, bias, labels, chunk_size, needs, triton_step, row_scale=None):
    """Per-row losses [N] (0 on ignored rows) and, for the inputs flagged in `needs` (hidden,
    weight, bias), their gradients; with `row_scale` [N], the gradients of sum_i row_scale_i * loss_i.

    Everything is returned in the compute dtype (fp32, or fp64 for fp64 inputs): the backward
    scales before it rounds to the parameters' dtype.
    """
    N, H = hidden.shape
    V = weight.shape[0]
    compute = torch.promote_types(hidden.dtype, torch.float32)
    # Half inputs: cuBLAS emits fp32 logits directly; elsewhere W is upcast block by block.
    half_gemm = hidden.dtype != compute and _fp32_out_gemm(hidden)
    b = None if bias is None else bias.to(compute)
    # The kernel computes in fp32; fp64 (a test dtype) takes the torch step.
    triton_step = triton_step and compute == torch.float32

    rows = (labels != IGNORE_INDEX).nonzero().squeeze(1)
    h, y = hidden[rows], labels[rows]
    n = rows.numel()
    chunk = chunk_size or _default_chunk_size(V)
    step = cross_entropy_grad_triton_ if triton_step else partial(cross_entropy_grad_torch_, all_valid=True)

    new = dict(dtype=compute, device=hidden.device)
    loss_rows = torch.empty(n, **new)
    grad_h = torch.empty(n, H, **new) if needs[0] else None
    grad_w = torch.zeros(V, H, **new) if needs[1] else None
    grad_b = torch.zeros(V, **new) if needs[2] else None
    scale = None if row_scale is None else row_scale[rows].to(compute)
    for s in range(0, n, chunk):
        h_c = h[s : s + chunk] if half_gemm else h[s : s + chunk].to(compute)
        blocks = _head_blocks(weight, compute, half_gemm)
        if isinstance(blocks, list):  # one block: no copy of the logits
            z = _matmul_fp32(h_c, blocks[0][1].t())
        else:
            z = torch.empty(h_c.shape[0], V, **new)
            for v, w in blocks:
                z[:, v : v + w.shape[0]] = _matmul_fp32(h_c, w.t())
                del w  # else the next block is made while this one is still held
        if b is not None:
            z += b
        step(z, y[s : s + chunk], loss_rows[s : s + chunk])
        if row_scale is not None:
            z *= scale[s : s + chunk, None]
        if grad_h is not None:
            g = grad_h[s : s + chunk].zero_()
            for v, w in _head_blocks(weight, compute, half_gemm):
                g += z[:, v : v + w.shape[0]].to(w.dtype) @ w
                del w
        if grad_w is not None:
            grad_w.addmm_(z.t(), h_c.to(compute))
        if grad_b is not None:
            grad_b += z.sum(dim=0)
        del z  # else the next chunk's logits are allocated while these are still held

    if grad_h is not None:  # ignored rows get a zero gradient
        grad_h = torch.zeros(N, H, **new).index_copy_(0, rows, grad_h)
    return torch.zeros(N, **new).index_copy_(0, rows, loss_rows), (grad_h, grad_w, grad_b)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_size, triton_step):
        needs = ctx.needs_input_grad[:3]
        loss, grads = _chunked_forward(hidden, weight, bias, labels, chunk_size, needs, triton_step)
        ctx.save_for_backward(*grads)
        ctx.dtypes = [None if t is None else t.dtype for t in (hidden, weight, bias)]
        return loss.sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        # The loss is linear in each stored gradient: scaling is the whole backward.
        grads = [
            None if g is None else (g * grad_loss).to(dtype)
            for g, dtype in zip(ctx.saved_tensors, ctx.dtypes)
        ]
        return (*grads, None, None, None)


class _LinearCrossEntropyRows(torch.autograd.Function):
    """Per-row losses (reduction="none"). Each row's upstream gradient g_i now differs, so the
    weight's gradient sum_i g_i dz_i h_i^T cannot be computed before g is known: when the
    weight or bias trains, the backward recomputes the chunks' logits and scales dz by g (one
    GEMM per chunk more than the summed loss). When only the hidden states need a gradient
    (LoRA, prefix: the head is frozen), dh_i = W^T dz_i is stored per row as for the summed
    loss and the backward scales the rows: no recomputation."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_size, triton_step):
        needs = ctx.needs_input_grad[:3]
        ctx.dtypes = [None if t is None else t.dtype for t in (hidden, weight, bias)]
        ctx.recompute = needs[1] or needs[2]
        if ctx.recompute:
            loss, _ = _chunked_forward(hidden, weight, bias, labels, chunk_size, (False,) * 3, triton_step)
            ctx.save_for_backward(hidden, weight, bias, labels)
            ctx.args = (chunk_size, triton_step, needs)
        else:
            loss, (grad_h, _, _) = _chunked_forward(hidden, weight, bias, labels, chunk_size, needs, triton_step)
            ctx.save_for_backward(grad_h)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_rows):
        if ctx.recompute:
            hidden, weight, bias, labels = ctx.saved_tensors
            chunk_size, triton_step, needs = ctx.args
            _, grads = _chunked_forward(hidden, weight, bias, labels, chunk_size, needs, triton_step,
                                        row_scale=grad_rows)
        else:
            (grad_h,) = ctx.saved_tensors
            grads = (None if grad_h is None else grad_h * grad_rows[:, None].to(grad_h.dtype), None, None)
        grads = [None if g is None else g.to(dtype) for g, dtype in zip(grads, ctx.dtypes)]
        return (*grads, None, None, None)


def linear_cross_entropy(hidden, weight, labels, bias=None, chunk_size=None, reduction="sum"):
    """Cross-entropy of the LM head's logits, without materialising them.

    hidden [..., H], weight [V, H] (the head, or the tied embedding), labels [...] already
    shifted, IGNORE_INDEX (-100) skipped, bias [V] or None. Returns (loss, count): the fp32
    loss (fp64 for fp64 inputs) and the number of counted tokens as a plain int64 tensor.
    reduction "sum": the summed loss, so the caller divides by the count over all accumulation
    steps; "none": the loss of each position, shaped like labels (0 where ignored), i.e. minus
    the log-probability of each label (what preference losses sum per sequence).
    """
    H = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != H:
        raise ValueError(f"weight must be [V, {H}] for hidden [..., {H}], got {list(weight.shape)}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels {list(labels.shape)} must match hidden {list(hidden.shape[:-1])}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden is {hidden.dtype} but weight is {weight.dtype}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be [{weight.shape[0]}], got {list(bias.shape)}")
    if reduction not in ("sum", "none"):
        raise ValueError(f"reduction must be 'sum' or 'none', got {reduction!r}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of rows, got {chunk_size}")
    V = weight.shape[0]
    y = labels.reshape(-1)
    bad = (y != IGNORE_INDEX) & ((y < 0) | (y >= V))
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"label {int(y[i])} at position {i} is outside [0, {V}) and not {IGNORE_INDEX}")

    h = hidden.reshape(-1, H)
    triton_step = use_triton(hidden)
    grads_wanted = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias)
    )
    count = (y != IGNORE_INDEX).sum()
    if not grads_wanted:  # evaluation: the loss alone, no gradient matmuls
        loss, _ = _chunked_forward(h, weight, bias, y, chunk_size, (False,) * 3, triton_step)
        return (loss.sum() if reduction == "sum" else loss.view(labels.shape)), count
    if reduction == "sum":
        return _LinearCrossEntropy.apply(h, weight, bias, y, chunk_size, triton_step), count
    return _LinearCrossEntropyRows.apply(h, weight, bias, y, chunk_size, triton_step).view(labels.shape), count


def linear_cross_entropy_reference(hidden, weight, labels, bias=None, reduction="sum"):
    """The unfused computation (the spec and test oracle): full logits, then F.cross_entropy."""
    logits = F.linear(hidden, weight, bias)
    compute = torch.promote_types(logits.dtype, torch.float32)
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).to(compute),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction=reduction,
    )
    return (loss if reduction == "sum" else loss.view(labels.shape)), (labels != IGNORE_INDEX).sum()
