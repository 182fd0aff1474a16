"""The frozen base matmul of the torch paths: y = x @ W.T + bias, W dense or quantised, no dW.

Two things decide how it is computed:
  - **The compute dtype.** A CPU without bf16 / fp16 matrix units (AVX2, or AVX-512 without
    AVX512_BF16 / AMX) runs torch's half-precision GEMMs far slower than fp32 ones: on a 2-core
    AVX2 EPYC, 512 x 3584 x 4736 takes 0.3 s in fp32, 1.5 s in bf16 as x @ W.T and 143 s as the
    backward's dy @ W (0.1 GFLOP/s: the layout bf16 has no fast kernel for). There the matmul is
    done in fp32 and the result rounded to x's dtype once; the model's memory stays half
    precision, and the answer is the bf16 one computed more exactly. Everywhere else (GPUs, CPUs
    with those units, fp32 models) the dtype is x's, and a dense W goes through plain `F.linear`.
  - **What is made of W.** A quantised W (`nf4.NF4Weight`, `int8.Int8Weight`) is dequantised for
    the matmul and dropped, and dequantised again in the backward for dx: nothing weight-sized is
    saved. In fp32 the weight is made a block of rows (about `CHUNK` elements) at a time, so the
    scratch is a block's, not the weight's (a 7B MLP weight would be 271 MB of fp32 at each
    matmul); dx then sums the blocks' products in fp32. A dense half-precision W computed in
    fp32 is handled the same way: upcast a block of rows at a time, never saved upcast.
"""

import contextlib
import functools
import math

import torch
import torch.nn.functional as F

from . import chunks
from .int8 import Int8Weight, dequantize_int8
from .nf4 import NF4Weight, dequantize_nf4

CHUNK = chunks.CHUNK  # elements of W made (dequantised or upcast) at a time in the blocked form


def intended_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype x's matmuls would run in: autocast's where it is on for x's device, else x's."""
    device = x.device.type
    if device in ("cpu", "cuda") and torch.is_autocast_enabled(device) and x.is_floating_point():
        return torch.get_autocast_dtype(device)
    return x.dtype


def half_gemm_is_slow(x: torch.Tensor) -> bool:
    """Whether x's half-precision matmuls should be done in fp32 (a CPU without bf16 / fp16 units)."""
    dtype = intended_dtype(x)
    if x.device.type != "cpu" or dtype not in (torch.bfloat16, torch.float16):
        return False
    cpu = torch.cpu
    if dtype == torch.bfloat16:
        return not (_has(cpu, "_is_avx512_bf16_supported") or _has(cpu, "_is_amx_tile_supported"))
    return not _has(cpu, "_is_amx_fp16_supported")


@functools.cache  # the CPU does not change: asked once per process, not at every matmul
def _has(cpu, probe: str) -> bool:
    fn = getattr(cpu, probe, None)  # private probes: a torch without one counts as "no"
    return bool(fn()) if fn is not None else False


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 where `half_gemm_is_slow`, else x's own (autocast, if on, then casts as usual)."""
    return torch.float32 if half_gemm_is_slow(x) else x.dtype


def no_autocast(x: torch.Tensor):
    """Autocast off while a half-precision call is computed in fp32 (a training step runs under
    bf16 autocast, which would cast the fp32 matmuls straight back to bf16); a no-op otherwise."""
    return torch.autocast(x.device.type, enabled=False) if half_gemm_is_slow(x) else contextlib.nullcontext()


def dequantize(qweight, dtype: torch.dtype, rows: slice | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The [N, K] weight (or its `rows`) in `dtype`, whichever format it is stored in (into `out`
    if given)."""
    if isinstance(qweight, NF4Weight):
        return dequantize_nf4(qweight, dtype, rows, out)
    if isinstance(qweight, Int8Weight):
        return dequantize_int8(qweight, dtype, rows, out)
    raise TypeError(f"expected an NF4Weight or Int8Weight, got {type(qweight).__name__}")


def weight_rows(weight, dtype: torch.dtype, rows: slice | None = None, out: torch.Tensor | None = None):
    """W[rows] in `dtype`: a dense weight sliced and cast, a quantised one dequantised; written into
    `out` (a contiguous tensor of that shape and dtype) if given."""
    if isinstance(weight, torch.Tensor):
        w = weight if rows is None else weight[rows]
        return w.to(dtype) if out is None else out.copy_(w)
    return dequantize(weight, dtype, rows, out)


def _scratch(weight, dtype: torch.dtype, blocks: list[slice], device) -> torch.Tensor:
    """One [rows, K] buffer for every block of W a blocked matmul makes: a fresh one per block
    would be a fresh mapping, and its page faults, at each (with host_memory's 1 MB mmap threshold)."""
    return torch.empty(max(b.stop - b.start for b in blocks), weight.shape[1], dtype=dtype, device=device)


def _block(weight, dtype, rows: slice, scratch: torch.Tensor) -> torch.Tensor:
    """W[rows] made into the first rows of `scratch` (a prefix of rows is contiguous)."""
    return weight_rows(weight, dtype, rows, scratch[:rows.stop - rows.start])


def _blocks(weight, dtype: torch.dtype) -> list[slice]:
    """Rows made at a time: blocks in fp32 (dx summed in fp32), the whole weight otherwise."""
    return row_blocks(weight) if dtype == torch.float32 else [slice(None)]


def row_blocks(weight) -> list[slice]:
    """Blocks of about CHUNK elements of W's rows; an NF4 block starts on a 64-value block."""
    n, k = (int(d) for d in weight.shape)
    align = weight.blocksize // math.gcd(k, weight.blocksize) if isinstance(weight, NF4Weight) else 1
    return chunks.row_blocks(n, k, CHUNK, align)


class FrozenLinear(torch.autograd.Function):
    """x @ W.T + bias in `dtype`, W made in the forward and again in the backward, never saved."""

    @staticmethod
    def forward(ctx, x, weight, bias, dtype):
        ctx.weight, ctx.dtype, ctx.x_dtype = weight, dtype, x.dtype  # W is held by its module anyway
        ctx.bias_dtype = None if bias is None else bias.dtype
        x = x.to(dtype)
        b = None if bias is None else bias.to(dtype)
        blocks = _blocks(weight, dtype)
        if len(blocks) == 1:
            return F.linear(x, weight_rows(weight, dtype), b)
        y = x.new_empty(*x.shape[:-1], weight.shape[0])
        scratch = _scratch(weight, dtype, blocks, x.device)
        for rows in blocks:
            y[..., rows] = F.linear(x, _block(weight, dtype, rows, scratch), None if b is None else b[rows])
        return y

    @staticmethod
    def backward(ctx, dy):
        dx = dbias = None
        if ctx.needs_input_grad[0]:
            dx = FrozenLinear._dx(ctx, dy)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            dbias = dy.reshape(-1, dy.shape[-1]).sum(0).to(ctx.bias_dtype)
        return dx, None, dbias, None

    @staticmethod
    def _dx(ctx, dy):
        # Autocast off: a backward called inside autocast would recast these matmuls to its dtype.
        with torch.autocast(dy.device.type, enabled=False):
            w, dtype = ctx.weight, ctx.dtype
            dy2 = dy.reshape(-1, dy.shape[-1]).to(dtype)
            blocks = _blocks(w, dtype)
            if len(blocks) == 1:
                dx = dy2 @ weight_rows(w, dtype)
            else:
                dx = dy2.new_zeros(dy2.shape[0], w.shape[1])
                scratch = _scratch(w, dtype, blocks, dy2.device)
                for rows in blocks:
                    dx.addmm_(dy2[:, rows], _block(w, dtype, rows, scratch))
            return dx.view(*dy.shape[:-1], -1).to(ctx.x_dtype)


def frozen_linear(x: torch.Tensor, weight, bias: torch.Tensor | None, dtype: torch.dtype | None = None):
    """x @ W.T + bias in `dtype` (default `compute_dtype(x)`), returned in that dtype (the caller
    rounds it to `intended_dtype(x)`). A dense W
    already in that dtype goes through `F.linear` (autograd keeps a reference to W, not a copy),
    as does one that requires grad (its dW is autograd's)."""
    dtype = dtype or compute_dtype(x)
    with no_autocast(x):
        if isinstance(weight, torch.Tensor) and (weight.dtype == dtype or weight.requires_grad):
            # W in the compute dtype, or a W that wants its gradient: autograd's own linear
            return F.linear(x.to(dtype), weight.to(dtype), bias if bias is None else bias.to(dtype))
        return FrozenLinear.apply(x, weight, bias, dtype)
