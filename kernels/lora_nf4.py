"""The fused Triton path of `lora_quantized.py` for NF4 base weights: QLoRA without a dense weight.

`lora_merged.py`'s five kernels with the base GEMMs reading NF4: where `_fwd_kernel` and
`_dx_kernel` load a tile of W, `_fwd_nf4_kernel` and `_dx_nf4_kernel` load the packed bytes and
the block scales of that tile and dequantise it in registers (`_nf4_tile`), exactly as
`nf4.dequantize_nf4` does: NF4[q] * absmax in fp32, rounded to the compute dtype, then `tl.dot`.
With double quantisation the scale is DYN[code] * nested_absmax[block // 256] + offset, also
made in the tile. So the base term reads 0.5 byte per weight plus one absmax byte per 64 (bf16
would be 2 bytes): the GEMMs of a memory-bound QLoRA step (small M) read a quarter as much.

    forward   _xs_kernel (as is)        xs = scale * dropout(x) @ A.T
              _fwd_nf4_kernel           y  = x @ deq(W).T + xs @ B.T + bias
    backward  _lora_bwd_kernel (as is)  dxs, dB
              _dx_nf4_kernel            dx = dy @ deq(W) + mask(dxs @ A)
              _da_kernel (as is)        dA

The r-wide kernels never touch W and are `lora_merged.py`'s own; so are the dropout masks
(the same Philox bits, so a quantised and a dense call with one seed drop the same elements).
Several NF4 projections of one x (q/k/v, gate/up) run as one launch, as in `lora_merged.py`;
they must agree on double quantisation and block size. A tile's scales are read a block at a
time, so each row must hold whole blocks: in_features a multiple of the block size, and blocks of
at most 64 values (bitsandbytes' default, every Qwen and DeepSeek width is a multiple of 64);
other NF4 weights, and int8 ones, take the torch path.

This module imports triton unguarded: `lora_quantized.py` imports it only on the Triton path.
"""

from functools import cache

import torch
import triton
import triton.language as tl

from .lora_merged import (_INTERPRETER_BLOCKS, DTYPES, MAX_RANK, _da_kernel, _dxs_and_a, _grouped_pid, _halves,
                          _keep_mask, _lora_bwd_kernel, _precision, _sizes, _xs_kernel, dropout_params,
                          gemm_configs, new_output, small_kernel_meta)
from .nf4 import NF4Weight, dynamic_code, nf4_code

# --------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------


@triton.jit
def _nf4_tile(packed_ptr, absmax_ptr, nested_ptr, offset, code_ptr, dyn_ptr, offs_n, k0, n_size, K,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, QBLOCK: tl.constexpr, NESTED: tl.constexpr):
    """fp32 W[offs_n, k0:k0 + BLOCK_K] ([BLOCK_N, BLOCK_K]) of an NF4 weight. Outside the weight
    the values are finite but not 0 (level 0 is -1, and the offset is added): both GEMMs meet
    them only with zeros of the other operand (x and dy load 0 there) or in masked stores.

    Each row holds whole blocks of QBLOCK values (K % QBLOCK == 0, QBLOCK divides BLOCK_K), so
    the tile needs BLOCK_K / QBLOCK scales per row, not one per value, and half as many bytes as
    values: loads of that size keep the software pipeline's shared memory at the x tile's order
    (per-value scale loads, fp32 with double quantisation, made it 216-464 KB at H100 tiles)."""
    row_ok = offs_n < n_size
    offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    byte = tl.load(packed_ptr + offs_n[:, None] * (K // 2) + offs_b[None, :],
                   mask=row_ok[:, None] & (offs_b[None, :] < K // 2), other=0).to(tl.int32)
    q = tl.reshape(tl.join(byte >> 4, byte & 0xF), (BLOCK_N, BLOCK_K))  # the high nibble comes first
    NB: tl.constexpr = BLOCK_K // QBLOCK
    offs_q = k0 // QBLOCK + tl.arange(0, NB)
    blk = offs_n[:, None] * (K // QBLOCK) + offs_q[None, :]
    ok = row_ok[:, None] & (offs_q[None, :] < K // QBLOCK)
    if NESTED:
        code = tl.load(absmax_ptr + blk, mask=ok, other=0).to(tl.int32)
        nested = tl.load(nested_ptr + blk // 256, mask=ok, other=0.0)  # nf4.NESTED_BLOCKSIZE
        scale = tl.load(dyn_ptr + code) * nested + offset
    else:
        scale = tl.load(absmax_ptr + blk, mask=ok, other=0.0)
    scale = tl.reshape(tl.broadcast_to(scale[:, :, None], (BLOCK_N, NB, QBLOCK)), (BLOCK_N, BLOCK_K))
    return tl.load(code_ptr + q) * scale


@triton.jit
def _fwd_nf4_tile(
    x_ptr, xs_ptr, y_ptr, packed_ptr, absmax_ptr, nested_ptr, offset, code_ptr, dyn_ptr,
    b_ptr, bias_ptr,
    M, K, n_size, col_lo, r_size, r_lo, R_TOTAL, N_TOTAL, stride_xm, stride_xk,
    pid_m, pid_n,
    NESTED: tl.constexpr, HAS_BIAS: tl.constexpr, R_PAD: tl.constexpr, QBLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """`lora_merged._fwd_tile` with W dequantised from NF4 as its tile is read."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        w = _nf4_tile(packed_ptr, absmax_ptr, nested_ptr, offset, code_ptr, dyn_ptr, offs_n, k0, n_size, K,
                      BLOCK_N, BLOCK_K, QBLOCK, NESTED)
        acc += tl.dot(x, tl.trans(w.to(x_ptr.dtype.element_ty)), input_precision=PRECISION)
    offs_r = tl.arange(0, R_PAD)
    xs = tl.load(xs_ptr + offs_m[:, None] * R_TOTAL + r_lo + offs_r[None, :],
                 mask=(offs_m[:, None] < M) & (offs_r[None, :] < r_size), other=0.0)
    b = tl.load(b_ptr + offs_n[None, :] * r_size + offs_r[:, None],
                mask=(offs_n[None, :] < n_size) & (offs_r[:, None] < r_size), other=0.0)
    acc += tl.dot(xs, b, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < n_size, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * N_TOTAL + col_lo + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < n_size))


@triton.jit
def _fwd_nf4_kernel(
    # pointers: x [M, K], xs [M, R_TOTAL], y [M, N_TOTAL] (out), NF4 and dynamic code tables;
    # tuples per segment: packed W, absmax (fp32, or uint8 codes if NESTED), nested absmax, B_s, bias_s
    x_ptr, xs_ptr, y_ptr, code_ptr, dyn_ptr, packed_ptrs, absmax_ptrs, nested_ptrs, b_ptrs, bias_ptrs,
    # sizes and per-segment values (tuples)
    M, K, R_TOTAL, N_TOTAL, n_sizes, r_sizes, offsets,
    stride_xm, stride_xk,
    M_BUCKET,  # autotune key only: M rounded up to a power of two
    NSEG: tl.constexpr, NESTED: tl.constexpr, HAS_BIAS: tl.constexpr, R_PAD: tl.constexpr, QBLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PRECISION: tl.constexpr,
):
    num_pid_n = 0
    for s in tl.static_range(NSEG):
        num_pid_n += tl.cdiv(n_sizes[s], BLOCK_N)
    pid_m, pid_n = _grouped_pid(tl.program_id(0), tl.cdiv(M, BLOCK_M), num_pid_n, GROUP_M)
    blk_lo = 0
    col_lo = 0
    r_lo = 0
    for s in tl.static_range(NSEG):
        nblk = tl.cdiv(n_sizes[s], BLOCK_N)
        if (pid_n >= blk_lo) & (pid_n < blk_lo + nblk):
            _fwd_nf4_tile(x_ptr, xs_ptr, y_ptr, packed_ptrs[s], absmax_ptrs[s], nested_ptrs[s], offsets[s],
                          code_ptr, dyn_ptr, b_ptrs[s], bias_ptrs[s],
                          M, K, n_sizes[s], col_lo, r_sizes[s], r_lo, R_TOTAL, N_TOTAL, stride_xm, stride_xk,
                          pid_m, pid_n - blk_lo, NESTED, HAS_BIAS, R_PAD, QBLOCK, BLOCK_M, BLOCK_N, BLOCK_K,
                          PRECISION)
        blk_lo += nblk
        col_lo += n_sizes[s]
        r_lo += r_sizes[s]


@triton.jit(do_not_specialize=["seed"])
def _dx_nf4_kernel(
    # pointers: dy [M, N_TOTAL], dxs [M, R_TOTAL], dx [M, K] (out), code tables; tuples per segment
    dy_ptr, dxs_ptr, dx_ptr, code_ptr, dyn_ptr, packed_ptrs, absmax_ptrs, nested_ptrs, a_ptrs,
    M, K, R_TOTAL, N_TOTAL, n_sizes, r_sizes, offsets,
    seed, threshold, inv_keep,
    M_BUCKET,  # autotune key only
    NSEG: tl.constexpr, NESTED: tl.constexpr, DROPOUT: tl.constexpr, R_PAD: tl.constexpr, QBLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """`lora_merged._dx_kernel` with W dequantised from NF4 as its tile is read."""
    pid_m, pid_k = _grouped_pid(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    col_lo = 0
    for s in tl.static_range(NSEG):  # base branch: dy @ deq(W), never masked
        for n0 in range(0, n_sizes[s], BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            dy = tl.load(dy_ptr + offs_m[:, None] * N_TOTAL + col_lo + offs_n[None, :],
                         mask=(offs_m[:, None] < M) & (offs_n[None, :] < n_sizes[s]), other=0.0)
            w = _nf4_tile(packed_ptrs[s], absmax_ptrs[s], nested_ptrs[s], offsets[s], code_ptr, dyn_ptr, offs_n,
                          pid_k * BLOCK_K, n_sizes[s], K, BLOCK_N, BLOCK_K, QBLOCK, NESTED)
            acc += tl.dot(dy, w.to(dy_ptr.dtype.element_ty), input_precision=PRECISION)
        col_lo += n_sizes[s]
    if DROPOUT:  # the masked LoRA term a quarter of the columns at a time, as _dx_kernel (register pressure)
        h0, h1 = _halves(acc, BLOCK_M, BLOCK_K)
        q0, q1 = _halves(h0, BLOCK_M, BLOCK_K // 2)
        q2, q3 = _halves(h1, BLOCK_M, BLOCK_K // 2)
        quarters = (q0, q1, q2, q3)
        for h in tl.static_range(4):
            part = quarters[h]
            k_lo = pid_k * BLOCK_K + h * (BLOCK_K // 4)
            offs_kh = k_lo + tl.arange(0, BLOCK_K // 4)
            r_lo = 0
            for s in tl.static_range(NSEG):
                dxs, a = _dxs_and_a(dxs_ptr, a_ptrs[s], offs_m, offs_r, offs_kh, M, K, R_TOTAL, r_lo, r_sizes[s])
                lora = tl.dot(dxs, a, input_precision=PRECISION)
                keep = _keep_mask(seed, offs_m, k_lo, K, threshold, s, BLOCK_K // 4)
                part += tl.where(keep, lora * inv_keep, 0.0)
                r_lo += r_sizes[s]
            tl.store(dx_ptr + offs_m[:, None] * K + offs_kh[None, :], part.to(dx_ptr.dtype.element_ty),
                     mask=(offs_m[:, None] < M) & (offs_kh[None, :] < K))
    else:
        r_lo = 0
        for s in tl.static_range(NSEG):
            dxs, a = _dxs_and_a(dxs_ptr, a_ptrs[s], offs_m, offs_r, offs_k, M, K, R_TOTAL, r_lo, r_sizes[s])
            acc = tl.dot(dxs, a, acc, input_precision=PRECISION)
            r_lo += r_sizes[s]
        tl.store(dx_ptr + offs_m[:, None] * K + offs_k[None, :], acc.to(dx_ptr.dtype.element_ty),
                 mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------

_fwd_tuned = triton.autotune(gemm_configs("BLOCK_N", "BLOCK_K"),
                             key=["M_BUCKET", "N_TOTAL", "K", "R_PAD", "NESTED"])(_fwd_nf4_kernel)
_dx_tuned = triton.autotune(gemm_configs("BLOCK_K", "BLOCK_N"),
                            key=["M_BUCKET", "N_TOTAL", "K", "R_PAD", "NESTED", "DROPOUT"])(_dx_nf4_kernel)
# The reduction tile of a W tile is BLOCK_K in both GEMMs (the dx kernel's output columns): every
# config's is at least MIN_BLOCK_K, so a quantisation block of at most that divides it. Under the
# interpreter the lora_merged tiles with a wider K tile, so the tests' K (a multiple of 64, not of
# 128) ends in a partial tile of two blocks of 64 (or four of 32).
MIN_BLOCK_K = 64
INTERPRETER_BLOCKS = dict(_INTERPRETER_BLOCKS, BLOCK_K=128)


@cache
def _code_tables(device: torch.device):
    return nf4_code(device), dynamic_code(device)


def _nf4_args(qweights):
    """The per-segment tuples the kernels take: packed, absmax, nested absmax; and the offsets."""
    nested = qweights[0].double_quant
    packed = tuple(q.packed for q in qweights)
    absmax = tuple(q.absmax for q in qweights)
    nested_absmax = tuple(q.nested_absmax for q in qweights) if nested else absmax  # never read then
    offsets = tuple(float(q.nested_offset) if nested else 0.0 for q in qweights)
    return nested, (packed, absmax, nested_absmax), offsets


def forward_nf4(x, qweights, biases, lora_as, lora_bs, scales, drop):
    """x: [M, K]. Returns y [M, sum n_s] and xs [M, sum r_s] (saved for the backward)."""
    M, K = x.shape
    n_sizes, r_sizes, r_pad = _sizes(qweights, lora_as)
    y = new_output(x, M, sum(n_sizes))
    xs = new_output(x, M, sum(r_sizes))
    seed, threshold, inv_keep = drop or (0, 0, 1.0)
    precision = _precision(x.dtype)
    meta = small_kernel_meta(x.is_cuda, r_pad)
    _xs_kernel[(triton.cdiv(M, meta["BLOCK_M"]),)](
        x, tuple(lora_as), xs, M, K, xs.shape[1], r_sizes, tuple(float(s) for s in scales),
        x.stride(0), x.stride(1), seed, threshold, inv_keep,
        NSEG=len(qweights), DROPOUT=drop is not None, R_PAD=r_pad,
        BLOCK_M=meta["BLOCK_M"], BLOCK_K=meta["BLOCK_K"], PRECISION=precision,
        **({"num_warps": meta["num_warps"]} if "num_warps" in meta else {}))

    def grid(m):
        return (triton.cdiv(M, m["BLOCK_M"]) * sum(triton.cdiv(n, m["BLOCK_N"]) for n in n_sizes),)

    nested, ptrs, offsets = _nf4_args(qweights)
    has_bias = biases[0] is not None
    bias_ptrs = tuple(biases) if has_bias else tuple(lora_bs)  # any pointer: never read without HAS_BIAS
    args = (x, xs, y, *_code_tables(x.device), *ptrs, tuple(lora_bs), bias_ptrs,
            M, K, xs.shape[1], y.shape[1], n_sizes, r_sizes, offsets, x.stride(0), x.stride(1),
            triton.next_power_of_2(M))
    consts = dict(NSEG=len(qweights), NESTED=nested, HAS_BIAS=has_bias, R_PAD=r_pad, QBLOCK=qweights[0].blocksize,
                  PRECISION=precision)
    if x.is_cuda:
        _fwd_tuned[grid](*args, **consts)
    else:
        _fwd_nf4_kernel[grid](*args, **consts, **INTERPRETER_BLOCKS)
    return y, xs


def backward_nf4(dy, x, xs, qweights, lora_as, lora_bs, scales, drop, need_dx: bool):
    """dy: [M, sum n_s]. Returns dx (or None), [dA_s], [dB_s]: `lora_merged.backward` with the NF4 dx kernel."""
    M, K = x.shape
    n_sizes, r_sizes, r_pad = _sizes(qweights, lora_as)
    R_TOTAL, N_TOTAL = xs.shape[1], dy.shape[1]
    seed, threshold, inv_keep = drop or (0, 0, 1.0)
    precision = _precision(x.dtype)
    meta = small_kernel_meta(x.is_cuda, r_pad)
    warps = {"num_warps": meta["num_warps"]} if "num_warps" in meta else {}
    nseg, dropout = len(qweights), drop is not None

    dxs = new_output(x, M, R_TOTAL)
    db32 = tuple(torch.zeros(b.shape, device=x.device, dtype=torch.float32) for b in lora_bs)
    _lora_bwd_kernel[(triton.cdiv(M, meta["BLOCK_M"]),)](
        dy, xs, dxs, tuple(lora_bs), db32, M, R_TOTAL, N_TOTAL, n_sizes, r_sizes,
        tuple(float(s) for s in scales), NSEG=nseg, R_PAD=r_pad,
        BLOCK_M=meta["BLOCK_M"], BLOCK_N=meta["BLOCK_N"], PRECISION=precision, **warps)

    dx = None
    if need_dx:
        dx = new_output(x, M, K)

        def grid(m):
            return (triton.cdiv(M, m["BLOCK_M"]) * triton.cdiv(K, m["BLOCK_K"]),)

        nested, ptrs, offsets = _nf4_args(qweights)
        args = (dy, dxs, dx, *_code_tables(x.device), *ptrs, tuple(lora_as),
                M, K, R_TOTAL, N_TOTAL, n_sizes, r_sizes, offsets,
                seed, threshold, inv_keep, triton.next_power_of_2(M))
        consts = dict(NSEG=nseg, NESTED=nested, DROPOUT=dropout, R_PAD=r_pad, QBLOCK=qweights[0].blocksize,
                      PRECISION=precision)
        if x.is_cuda:
            _dx_tuned[grid](*args, **consts)
        else:
            _dx_nf4_kernel[grid](*args, **consts, **INTERPRETER_BLOCKS)

    da32 = tuple(torch.zeros(a.shape, device=x.device, dtype=torch.float32) for a in lora_as)
    k_blocks, m_blocks = triton.cdiv(K, meta["BLOCK_K"]), triton.cdiv(M, meta["BLOCK_M"])
    if x.is_cuda:
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        split = max(1, min(m_blocks // 4, triton.cdiv(2 * sms, k_blocks)))
    else:
        split = min(2, m_blocks)
    _da_kernel[(k_blocks, split)](
        dxs, x, da32, M, K, R_TOTAL, r_sizes, x.stride(0), x.stride(1), seed, threshold, inv_keep,
        NSEG=nseg, DROPOUT=dropout, R_PAD=r_pad, SPLIT_M=split,
        BLOCK_M=meta["BLOCK_M"], BLOCK_K=meta["BLOCK_K"], PRECISION=precision, **warps)
    das = [d.to(a.dtype) for d, a in zip(da32, lora_as)]
    dbs = [d.to(b.dtype) for d, b in zip(db32, lora_bs)]
    return dx, das, dbs


# --------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------


class LoraProjectionsNF4(torch.autograd.Function):
    """`lora_merged.LoraProjections` with NF4 base weights, which get no gradient.

    The NF4 weights come as one tuple (not tensors autograd tracks); the tracked parameters come
    flattened: bias_0.., A_0.., B_0... Saved: x, xs and the LoRA factors, nothing weight-sized."""

    @staticmethod
    def forward(ctx, x, qweights, scales, dropout_p, training, nseg, *params):
        biases, lora_as, lora_bs = (list(params[i * nseg:(i + 1) * nseg]) for i in range(3))
        x2d = x.reshape(-1, x.shape[-1])
        drop = dropout_params(dropout_p, training)
        y, xs = forward_nf4(x2d, qweights, biases, lora_as, lora_bs, scales, drop)
        ctx.save_for_backward(x2d, xs, *lora_as, *lora_bs)
        ctx.qweights, ctx.scales, ctx.drop, ctx.nseg, ctx.x_shape = qweights, scales, drop, nseg, x.shape
        ctx.has_bias = [b is not None for b in biases]
        return y.reshape(*x.shape[:-1], y.shape[1])

    @staticmethod
    def backward(ctx, dy):
        nseg = ctx.nseg
        x2d, xs, *saved = ctx.saved_tensors
        lora_as, lora_bs = saved[:nseg], saved[nseg:]
        need = ctx.needs_input_grad[6:]  # bias_s.., A_s.., B_s..
        dy = dy.reshape(-1, dy.shape[-1]).contiguous()
        dx, das, dbs = backward_nf4(dy, x2d, xs, ctx.qweights, lora_as, lora_bs, ctx.scales, ctx.drop,
                                    need_dx=ctx.needs_input_grad[0])
        dy_segs = dy.split([q.shape[0] for q in ctx.qweights], dim=1)
        dbias = [dys.sum(0) if ctx.has_bias[s] and need[s] else None for s, dys in enumerate(dy_segs)]
        das = [d if need[nseg + s] else None for s, d in enumerate(das)]
        dbs = [d if need[2 * nseg + s] else None for s, d in enumerate(dbs)]
        dx = dx.reshape(ctx.x_shape) if dx is not None else None
        return dx, None, None, None, None, None, *dbias, *das, *dbs


def check_supported_nf4(x, qweights, biases, lora_as, lora_bs) -> str | None:
    """Why the NF4 Triton path cannot take these operands, or None when it can."""
    if not all(isinstance(q, NF4Weight) for q in qweights):
        return "an int8 weight (the fused kernels read NF4; int8 takes the torch path)"
    if len({q.double_quant for q in qweights}) > 1:
        return "projections of which some are double quantised and some not"
    if len({q.blocksize for q in qweights}) > 1:
        return "projections quantised with different block sizes"
    if qweights[0].blocksize > MIN_BLOCK_K:
        return f"NF4 blocks of {qweights[0].blocksize} values (the kernels take at most {MIN_BLOCK_K})"
    if x.shape[-1] % qweights[0].blocksize:
        return (f"in_features {x.shape[-1]}, not a multiple of the NF4 block size {qweights[0].blocksize} "
                "(the kernels read whole blocks per row)")
    if x.dtype not in DTYPES:
        return f"dtype {x.dtype} (the kernels take {', '.join(map(str, DTYPES))})"
    if x.dtype == torch.bfloat16 and not x.is_cuda:
        return "bf16 under Triton's interpreter (its tl.dot on bf16 returns garbage in triton 3.9)"
    for q in qweights:
        if q.device != x.device:
            return f"an NF4 weight on {q.device}, x on {x.device}"
    for t in (*lora_as, *lora_bs, *(b for b in biases if b is not None)):
        if t.dtype != x.dtype or t.device != x.device:
            return f"a parameter is {t.dtype} on {t.device}, x is {x.dtype} on {x.device}"
    if max(a.shape[0] for a in lora_as) > MAX_RANK:
        return f"rank {max(a.shape[0] for a in lora_as)} > {MAX_RANK}"
    if x.numel() == 0:
        return "an empty input"
    rows, width = x.numel() // x.shape[-1], max(x.shape[-1], sum(q.shape[0] for q in qweights))
    if rows * width >= 2**31 or max(q.shape.numel() for q in qweights) >= 2**31:
        return "2^31 elements or more in x, y or a weight (int32 offsets)"
    return None


def lora_projections_nf4(x, qweights, biases, lora_as, lora_bs, scales, dropout_p, training):
    """The Triton path: returns the outputs of all segments concatenated on the last dim."""
    if any(b is not None for b in biases):  # one HAS_BIAS for all segments: zeros stand in
        biases = [b if b is not None else x.new_zeros(q.shape[0]) for b, q in zip(biases, qweights)]
    qweights = tuple(NF4Weight(q.packed.contiguous(), q.absmax.contiguous(), q.shape, q.dtype, q.blocksize,
                               q.nested_absmax.contiguous() if q.double_quant else None, q.nested_offset)
                     for q in qweights)
    params = [t.contiguous() if t is not None else None for t in (*biases, *lora_as, *lora_bs)]
    return LoraProjectionsNF4.apply(x, qweights, tuple(scales), float(dropout_p), bool(training), len(qweights),
                                    *params)
