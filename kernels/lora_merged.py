"""The fused Triton path of `lora.py`: one or several LoRA projections of the same input.

A "segment" is one projection (W_s, bias_s, A_s, B_s, scale_s); q/k/v are three segments and
gate/up two, a lone projection is one. All segments run as one wide GEMM over the concatenated
output columns, with the LoRA factors kept separate (concatenated A, block-diagonal B), so
a narrow k or v projection (N = 512 on Qwen2.5-7B) rides along with q instead of running
as a GEMM too small to fill the GPU. Nothing is concatenated in memory: the per-segment
weights come in as tuples of pointers and the kernels loop over them statically.

Forward, two launches:
  _xs_kernel   xs[:, seg s] = scale_s * dropout_s(x) @ A_s.T          [M, sum r]  (small)
  _fwd_kernel  y[:, seg s]  = x @ W_s.T + xs[:, seg s] @ B_s.T + bias_s
The second is the base GEMM with the r-wide LoRA product added to the same fp32 accumulator
after the K loop: no second pass over y. Dropout is applied while x is read for xs; the
base branch reads x unmasked.

Backward, three launches (dy is [M, sum N], grads of the split outputs):
  _lora_bwd_kernel  dxs[:, s] = scale_s * dy_s @ B_s  and  dB_s = dy_s.T @ xs_s, from one read of dy
  _dx_kernel        dx = sum_s dy_s @ W_s + sum_s (dxs_s @ A_s) * keep_s / (1 - p)
  _da_kernel        dA_s = dxs_s.T @ dropout_s(x)
dB is reduced over M-blocks with fp32 atomics (each program owns a row block of dy and walks
all its columns, so dxs needs no reduction); dA is split over M the same way for parallelism.
Atomics make dA and dB run-to-run nondeterministic in the last fp32 bits.

Dropout keeps no mask: keep_s(m, k) is a pure function of (seed, s, m, k) (Philox), made
again in the backward. 16 random bits per element, 8 elements per Philox call, so p is
rounded to a multiple of 2^-16 (p_eff); kept values are scaled by 1/(1 - p_eff).

This module imports triton unguarded: `lora.py` imports it only once the Triton path is taken.
"""

import torch
import triton
import triton.language as tl

# --------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------


@triton.jit
def _keep_mask(seed, offs_m, k0, K, threshold, SEG: tl.constexpr, BLOCK_K: tl.constexpr):
    """Dropout keep-mask of x[offs_m, k0:k0+BLOCK_K] for segment SEG; the same bits in every kernel
    whatever its tiling, as long as k0 is a multiple of 8 (every K tile start is)."""
    # One Philox counter per 8 elements of a row; the segment sits above any row*col counter
    # (M * K / 8 < 2^40), so q, k and v draw independent masks from one seed.
    cols = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    ctr = offs_m[:, None].to(tl.int64) * ((K + 7) // 8) + cols[None, :] + SEG * (1 << 40)
    r0, r1, r2, r3 = tl.randint4x(seed, ctr)
    words = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), (offs_m.shape[0], BLOCK_K // 2))
    bits = tl.reshape(tl.join(words & 0xFFFF, words >> 16), (offs_m.shape[0], BLOCK_K))
    return bits >= threshold


@triton.jit
def _dropped_x(x_ptr, offs_m, k0, M, K, stride_xm, stride_xk, seed, threshold, inv_keep,
               SEG: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_K: tl.constexpr):
    """x[offs_m, k0:k0+BLOCK_K] through segment SEG's dropout (as is without DROPOUT), zero outside x."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
    if DROPOUT:
        keep = _keep_mask(seed, offs_m, k0, K, threshold, SEG, BLOCK_K)
        x = tl.where(keep, x * inv_keep, 0.0).to(x_ptr.dtype.element_ty)
    return x


@triton.jit(do_not_specialize=["seed"])
def _xs_kernel(
    # pointers: x [M, K] (strided), A_s [r_s, K] (tuple), xs [M, R_TOTAL] (out)
    x_ptr, a_ptrs, xs_ptr,
    # sizes and per-segment values (tuples)
    M, K, R_TOTAL, r_sizes, scales,
    stride_xm, stride_xk,
    # dropout
    seed, threshold, inv_keep,
    NSEG: tl.constexpr, DROPOUT: tl.constexpr, R_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, R_PAD)
    r_lo = 0
    for s in tl.static_range(NSEG):
        acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = _dropped_x(x_ptr, offs_m, k0, M, K, stride_xm, stride_xk, seed, threshold, inv_keep,
                           s, DROPOUT, BLOCK_K)
            a = tl.load(a_ptrs[s] + offs_r[None, :] * K + offs_k[:, None],
                        mask=(offs_r[None, :] < r_sizes[s]) & (offs_k[:, None] < K), other=0.0)
            acc += tl.dot(x, a, input_precision=PRECISION)
        acc = acc * scales[s]
        tl.store(xs_ptr + offs_m[:, None] * R_TOTAL + r_lo + offs_r[None, :],
                 acc.to(xs_ptr.dtype.element_ty),
                 mask=(offs_m[:, None] < M) & (offs_r[None, :] < r_sizes[s]))
        r_lo += r_sizes[s]


@triton.jit
def _fwd_tile(
    x_ptr, xs_ptr, y_ptr, w_ptr, b_ptr, bias_ptr,
    M, K, n_size, col_lo, r_size, r_lo, R_TOTAL, N_TOTAL, stride_xm, stride_xk,
    pid_m, pid_n,
    HAS_BIAS: tl.constexpr, R_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] tile of one segment: base GEMM, then the LoRA term, same accumulator."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        w = tl.load(w_ptr + offs_n[None, :] * K + offs_k[:, None],
                    mask=(offs_n[None, :] < n_size) & (offs_k[:, None] < K), other=0.0)
        acc += tl.dot(x, w, input_precision=PRECISION)
    # The LoRA term: r (<= 128) more steps of the same reduction.
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
def _grouped_pid(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Tutorial 03's L2-friendly launch order: GROUP_M row blocks sweep the columns together."""
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _fwd_kernel(
    # pointers: x [M, K], xs [M, R_TOTAL], y [M, N_TOTAL] (out); tuples of W_s [n_s, K], B_s [n_s, r_s], bias_s
    x_ptr, xs_ptr, y_ptr, w_ptrs, b_ptrs, bias_ptrs,
    # sizes
    M, K, R_TOTAL, N_TOTAL, n_sizes, r_sizes,
    stride_xm, stride_xk,
    M_BUCKET,  # autotune key only: M rounded up to a power of two
    NSEG: tl.constexpr, HAS_BIAS: tl.constexpr, R_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PRECISION: tl.constexpr,
):
    num_pid_n = 0
    for s in tl.static_range(NSEG):
        num_pid_n += tl.cdiv(n_sizes[s], BLOCK_N)
    pid_m, pid_n = _grouped_pid(tl.program_id(0), tl.cdiv(M, BLOCK_M), num_pid_n, GROUP_M)
    # Column blocks are numbered segment after segment; each program serves exactly one.
    blk_lo = 0
    col_lo = 0
    r_lo = 0
    for s in tl.static_range(NSEG):
        nblk = tl.cdiv(n_sizes[s], BLOCK_N)
        if (pid_n >= blk_lo) & (pid_n < blk_lo + nblk):
            _fwd_tile(x_ptr, xs_ptr, y_ptr, w_ptrs[s], b_ptrs[s], bias_ptrs[s],
                      M, K, n_sizes[s], col_lo, r_sizes[s], r_lo, R_TOTAL, N_TOTAL, stride_xm, stride_xk,
                      pid_m, pid_n - blk_lo, HAS_BIAS, R_PAD, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
        blk_lo += nblk
        col_lo += n_sizes[s]
        r_lo += r_sizes[s]


@triton.jit
def _lora_bwd_kernel(
    # pointers: dy [M, N_TOTAL], xs [M, R_TOTAL], dxs [M, R_TOTAL] (out); tuples of B_s, fp32 dB_s (atomic out)
    dy_ptr, xs_ptr, dxs_ptr, b_ptrs, db_ptrs,
    M, R_TOTAL, N_TOTAL, n_sizes, r_sizes, scales,
    NSEG: tl.constexpr, R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, R_PAD)
    col_lo = 0
    r_lo = 0
    for s in tl.static_range(NSEG):
        r_ok = offs_r < r_sizes[s]
        xs = tl.load(xs_ptr + offs_m[:, None] * R_TOTAL + r_lo + offs_r[None, :],
                     mask=(offs_m[:, None] < M) & r_ok[None, :], other=0.0)
        acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
        for n0 in range(0, n_sizes[s], BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < n_sizes[s]
            dy = tl.load(dy_ptr + offs_m[:, None] * N_TOTAL + col_lo + offs_n[None, :],
                         mask=(offs_m[:, None] < M) & n_ok[None, :], other=0.0)
            b = tl.load(b_ptrs[s] + offs_n[:, None] * r_sizes[s] + offs_r[None, :],
                        mask=n_ok[:, None] & r_ok[None, :], other=0.0)
            acc += tl.dot(dy, b, input_precision=PRECISION)
            # The same dy tile gives this row block's share of dB_s = dy_s.T @ xs_s.
            db = tl.dot(tl.trans(dy), xs, input_precision=PRECISION)
            tl.atomic_add(db_ptrs[s] + offs_n[:, None] * r_sizes[s] + offs_r[None, :], db,
                          mask=n_ok[:, None] & r_ok[None, :])
        tl.store(dxs_ptr + offs_m[:, None] * R_TOTAL + r_lo + offs_r[None, :],
                 (acc * scales[s]).to(dxs_ptr.dtype.element_ty),
                 mask=(offs_m[:, None] < M) & r_ok[None, :])
        col_lo += n_sizes[s]
        r_lo += r_sizes[s]


@triton.jit
def _halves(t, BLOCK_M: tl.constexpr, W: tl.constexpr):
    """[BLOCK_M, W] -> its left and right [BLOCK_M, W / 2] column halves."""
    return tl.split(tl.permute(tl.reshape(t, (BLOCK_M, 2, W // 2)), (0, 2, 1)))


@triton.jit
def _dxs_and_a(dxs_ptr, a_ptr, offs_m, offs_r, offs_k, M, K, R_TOTAL, r_lo, r_size):
    """One segment's dxs rows [offs_m, R_PAD] and A columns [R_PAD, offs_k], zero outside r_size."""
    dxs = tl.load(dxs_ptr + offs_m[:, None] * R_TOTAL + r_lo + offs_r[None, :],
                  mask=(offs_m[:, None] < M) & (offs_r[None, :] < r_size), other=0.0)
    a = tl.load(a_ptr + offs_r[:, None] * K + offs_k[None, :],
                mask=(offs_r[:, None] < r_size) & (offs_k[None, :] < K), other=0.0)
    return dxs, a


@triton.jit(do_not_specialize=["seed"])
def _dx_kernel(
    # pointers: dy [M, N_TOTAL], dxs [M, R_TOTAL], dx [M, K] (out); tuples of W_s [n_s, K], A_s [r_s, K]
    dy_ptr, dxs_ptr, dx_ptr, w_ptrs, a_ptrs,
    M, K, R_TOTAL, N_TOTAL, n_sizes, r_sizes,
    seed, threshold, inv_keep,
    M_BUCKET,  # autotune key only: M rounded up to a power of two
    NSEG: tl.constexpr, DROPOUT: tl.constexpr, R_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m, pid_k = _grouped_pid(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    col_lo = 0
    for s in tl.static_range(NSEG):  # base branch: dy @ W, never masked
        for n0 in range(0, n_sizes[s], BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            dy = tl.load(dy_ptr + offs_m[:, None] * N_TOTAL + col_lo + offs_n[None, :],
                         mask=(offs_m[:, None] < M) & (offs_n[None, :] < n_sizes[s]), other=0.0)
            w = tl.load(w_ptrs[s] + offs_n[:, None] * K + offs_k[None, :],
                        mask=(offs_n[:, None] < n_sizes[s]) & (offs_k[None, :] < K), other=0.0)
            acc += tl.dot(dy, w, input_precision=PRECISION)
        col_lo += n_sizes[s]
    if DROPOUT:
        # The masked LoRA term a quarter of the tile's columns at a time: a whole-tile fp32 product
        # and Philox mask beside the accumulator spilled registers in every config (ptxas, sm_90a);
        # quarters keep the dot's N >= 16 for GPU tiles (BLOCK_K >= 64).
        h0, h1 = _halves(acc, BLOCK_M, BLOCK_K)
        q0, q1 = _halves(h0, BLOCK_M, BLOCK_K // 2)
        q2, q3 = _halves(h1, BLOCK_M, BLOCK_K // 2)
        quarters = (q0, q1, q2, q3)
        for h in tl.static_range(4):
            part = quarters[h]
            k_lo = pid_k * BLOCK_K + h * (BLOCK_K // 4)
            offs_kh = k_lo + tl.arange(0, BLOCK_K // 4)
            r_lo = 0
            for s in tl.static_range(NSEG):  # the LoRA branch went through dropout_s, so its gradient does too
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


@triton.jit(do_not_specialize=["seed"])
def _da_kernel(
    # pointers: dxs [M, R_TOTAL], x [M, K] (strided); tuple of fp32 dA_s [r_s, K] (atomic out)
    dxs_ptr, x_ptr, da_ptrs,
    M, K, R_TOTAL, r_sizes, stride_xm, stride_xk,
    seed, threshold, inv_keep,
    NSEG: tl.constexpr, DROPOUT: tl.constexpr, R_PAD: tl.constexpr, SPLIT_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_k = tl.program_id(0)
    pid_split = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    r_lo = 0
    for s in tl.static_range(NSEG):
        acc = tl.zeros((R_PAD, BLOCK_K), dtype=tl.float32)
        # SPLIT_M programs share the M reduction (row blocks pid_split, pid_split + SPLIT_M, ...).
        for m0 in range(pid_split * BLOCK_M, M, SPLIT_M * BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            x = _dropped_x(x_ptr, offs_m, pid_k * BLOCK_K, M, K, stride_xm, stride_xk, seed, threshold, inv_keep,
                           s, DROPOUT, BLOCK_K)
            dxs = tl.load(dxs_ptr + offs_m[:, None] * R_TOTAL + r_lo + offs_r[None, :],
                          mask=(offs_m[:, None] < M) & (offs_r[None, :] < r_sizes[s]), other=0.0)
            acc += tl.dot(tl.trans(dxs), x, input_precision=PRECISION)
        tl.atomic_add(da_ptrs[s] + offs_r[:, None] * K + offs_k[None, :], acc,
                      mask=(offs_r[:, None] < r_sizes[s]) & (offs_k[None, :] < K))
        r_lo += r_sizes[s]


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------

MAX_RANK = 128  # one r-wide tile per segment; larger ranks take the torch reference
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def gemm_configs(out_block: str, red_block: str):
    """H100-sized tiles; `out_block` is the output column tile, `red_block` the reduction step."""
    shapes = [(128, 128, 64, 4, 8), (128, 256, 64, 3, 8), (128, 128, 64, 3, 4),
              (64, 128, 64, 4, 4), (128, 64, 64, 4, 4)]
    return [triton.Config({"BLOCK_M": bm, out_block: bo, red_block: br, "GROUP_M": 8},
                          num_stages=st, num_warps=wp) for bm, bo, br, st, wp in shapes]


_fwd_tuned = triton.autotune(gemm_configs("BLOCK_N", "BLOCK_K"), key=["M_BUCKET", "N_TOTAL", "K", "R_PAD"])(_fwd_kernel)
# DROPOUT is in the dx key: the mask's Philox words make it another kernel, with other best tiles
# (see --compile-only in benchmarks/lora_matmul.py: with dropout every config spills registers).
_dx_tuned = triton.autotune(gemm_configs("BLOCK_K", "BLOCK_N"),
                            key=["M_BUCKET", "N_TOTAL", "K", "R_PAD", "DROPOUT"])(_dx_kernel)

# Under Triton's interpreter (CPU tensors) a launch costs per program, so small tiles, and
# small enough that the odd test shapes cross tile edges; SPLIT_M > 1 exercises the dA atomics.
_INTERPRETER_BLOCKS = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2)


def small_kernel_meta(on_gpu: bool, r_pad: int) -> dict:
    """Tiles of the r-wide kernels (xs, dxs/dB, dA): fixed, not autotuned (two of them use atomics)."""
    if not on_gpu:  # K tiles unlike the dx kernel's: the dropout bits must not depend on tiling
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16)
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4 if r_pad <= 32 else 8)


def _precision(dtype: torch.dtype) -> str:
    # fp32 follows torch's own switch: exact unless the user allowed TF32 for matmuls.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def dropout_params(dropout_p: float, training: bool):
    """(seed, threshold, 1/(1-p_eff)) for an active dropout, None otherwise. p_eff = threshold / 2^16."""
    if not training or dropout_p == 0.0:
        return None
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p={dropout_p}: expected a probability in [0, 1]")
    threshold = round(dropout_p * 65536)
    inv_keep = 65536 / (65536 - threshold) if threshold < 65536 else 0.0
    # torch's CPU generator: seeded by torch.manual_seed, and no device sync to read it.
    seed = int(torch.randint(0, 2**31 - 1, ()))
    return seed, threshold, inv_keep


def new_output(x: torch.Tensor, *shape: int) -> torch.Tensor:
    """Every buffer a kernel writes in full comes from here, so tests can poison it with NaN."""
    return x.new_empty(shape)


def _sizes(weights, lora_as):
    n_sizes = tuple(w.shape[0] for w in weights)
    r_sizes = tuple(a.shape[0] for a in lora_as)
    r_pad = max(16, triton.next_power_of_2(max(r_sizes)))  # tl.dot needs every dim >= 16
    return n_sizes, r_sizes, r_pad


def forward(x, weights, biases, lora_as, lora_bs, scales, drop):
    """x: [M, K]. Returns y [M, sum n_s] and xs [M, sum r_s] (saved for the backward)."""
    M, K = x.shape
    n_sizes, r_sizes, r_pad = _sizes(weights, lora_as)
    y = new_output(x, M, sum(n_sizes))
    xs = new_output(x, M, sum(r_sizes))
    seed, threshold, inv_keep = drop or (0, 0, 1.0)
    precision = _precision(x.dtype)
    meta = small_kernel_meta(x.is_cuda, r_pad)
    _xs_kernel[(triton.cdiv(M, meta["BLOCK_M"]),)](
        x, tuple(lora_as), xs, M, K, xs.shape[1], r_sizes, tuple(float(s) for s in scales),
        x.stride(0), x.stride(1), seed, threshold, inv_keep,
        NSEG=len(weights), DROPOUT=drop is not None, R_PAD=r_pad,
        BLOCK_M=meta["BLOCK_M"], BLOCK_K=meta["BLOCK_K"], PRECISION=precision,
        **({"num_warps": meta["num_warps"]} if "num_warps" in meta else {}))

    def grid(m):
        return (triton.cdiv(M, m["BLOCK_M"]) * sum(triton.cdiv(n, m["BLOCK_N"]) for n in n_sizes),)

    has_bias = biases[0] is not None
    bias_ptrs = tuple(biases) if has_bias else tuple(weights)  # any pointer: never read without HAS_BIAS
    args = (x, xs, y, tuple(weights), tuple(lora_bs), bias_ptrs,
            M, K, xs.shape[1], y.shape[1], n_sizes, r_sizes, x.stride(0), x.stride(1),
            triton.next_power_of_2(M))
    consts = dict(NSEG=len(weights), HAS_BIAS=has_bias, R_PAD=r_pad, PRECISION=precision)
    if x.is_cuda:
        _fwd_tuned[grid](*args, **consts)
    else:
        _fwd_kernel[grid](*args, **consts, **_INTERPRETER_BLOCKS)
    return y, xs


def backward(dy, x, xs, weights, lora_as, lora_bs, scales, drop, need_dx: bool):
    """dy: [M, sum n_s]. Returns dx (or None), [dA_s], [dB_s] in the parameters' dtypes."""
    M, K = x.shape
    n_sizes, r_sizes, r_pad = _sizes(weights, lora_as)
    R_TOTAL, N_TOTAL = xs.shape[1], dy.shape[1]
    seed, threshold, inv_keep = drop or (0, 0, 1.0)
    precision = _precision(x.dtype)
    meta = small_kernel_meta(x.is_cuda, r_pad)
    warps = {"num_warps": meta["num_warps"]} if "num_warps" in meta else {}
    nseg, dropout = len(weights), drop is not None

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

        args = (dy, dxs, dx, tuple(weights), tuple(lora_as), M, K, R_TOTAL, N_TOTAL, n_sizes, r_sizes,
                seed, threshold, inv_keep, triton.next_power_of_2(M))
        consts = dict(NSEG=nseg, DROPOUT=dropout, R_PAD=r_pad, PRECISION=precision)
        if x.is_cuda:
            _dx_tuned[grid](*args, **consts)
        else:
            _dx_kernel[grid](*args, **consts, **_INTERPRETER_BLOCKS)

    da32 = tuple(torch.zeros(a.shape, device=x.device, dtype=torch.float32) for a in lora_as)
    k_blocks, m_blocks = triton.cdiv(K, meta["BLOCK_K"]), triton.cdiv(M, meta["BLOCK_M"])
    if x.is_cuda:  # enough programs for two waves, each still walking several row blocks
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


class LoraProjections(torch.autograd.Function):
    """y = [x @ W_s.T + bias_s + scale_s * dropout_s(x) @ A_s.T @ B_s.T for each s], concatenated.

    Parameters come flattened (autograd only tracks tensors passed directly):
    W_0..W_{n-1}, bias_0.., A_0.., B_0... Base weights are normally frozen; if one requires
    grad it gets dW_s = dy_s.T @ x from torch (correct, not fused).
    """

    @staticmethod
    def forward(ctx, x, scales, dropout_p, training, nseg, *params):
        weights, biases, lora_as, lora_bs = (list(params[i * nseg:(i + 1) * nseg]) for i in range(4))
        x2d = x.reshape(-1, x.shape[-1])
        drop = dropout_params(dropout_p, training)
        y, xs = forward(x2d, weights, biases, lora_as, lora_bs, scales, drop)
        ctx.save_for_backward(x2d, xs, *weights, *lora_as, *lora_bs)
        ctx.scales, ctx.drop, ctx.nseg, ctx.x_shape = scales, drop, nseg, x.shape
        ctx.has_bias = [b is not None for b in biases]
        return y.reshape(*x.shape[:-1], y.shape[1])

    @staticmethod
    def backward(ctx, dy):
        nseg = ctx.nseg
        x2d, xs, *saved = ctx.saved_tensors
        weights, lora_as, lora_bs = saved[:nseg], saved[nseg:2 * nseg], saved[2 * nseg:]
        need = ctx.needs_input_grad[5:]  # W_s.., bias_s.., A_s.., B_s..
        dy = dy.reshape(-1, dy.shape[-1]).contiguous()
        dx, das, dbs = backward(dy, x2d, xs, weights, lora_as, lora_bs, ctx.scales, ctx.drop,
                                need_dx=ctx.needs_input_grad[0])
        dy_segs = dy.split([w.shape[0] for w in weights], dim=1)
        dws = [dys.t() @ x2d if need[s] else None for s, dys in enumerate(dy_segs)]
        dbias = [dys.sum(0) if ctx.has_bias[s] and need[nseg + s] else None for s, dys in enumerate(dy_segs)]
        das = [d if need[2 * nseg + s] else None for s, d in enumerate(das)]
        dbs = [d if need[3 * nseg + s] else None for s, d in enumerate(dbs)]
        dx = dx.reshape(ctx.x_shape) if dx is not None else None
        return dx, None, None, None, None, *dws, *dbias, *das, *dbs


def check_supported(x, weights, biases, lora_as, lora_bs) -> str | None:
    """Why the Triton path cannot take these operands, or None when it can."""
    if x.dtype not in DTYPES:
        return f"dtype {x.dtype} (the kernels take {', '.join(map(str, DTYPES))})"
    if x.dtype == torch.bfloat16 and not x.is_cuda:
        return "bf16 under Triton's interpreter (its tl.dot on bf16 returns garbage in triton 3.9)"
    for t in (*weights, *lora_as, *lora_bs, *(b for b in biases if b is not None)):
        if t.dtype != x.dtype or t.device != x.device:
            return f"a parameter is {t.dtype} on {t.device}, x is {x.dtype} on {x.device}"
    if max(a.shape[0] for a in lora_as) > MAX_RANK:
        return f"rank {max(a.shape[0] for a in lora_as)} > {MAX_RANK}"
    if x.numel() == 0:
        return "an empty input"
    rows, width = x.numel() // x.shape[-1], max(x.shape[-1], sum(w.shape[0] for w in weights))
    if rows * width >= 2**31:  # the kernels index with int32 offsets
        return f"{rows} x {width} elements (2^31 or more)"
    return None


def lora_projections(x, weights, biases, lora_as, lora_bs, scales, dropout_p, training):
    """The Triton path: returns the outputs of all segments concatenated on the last dim."""
    if any(b is not None for b in biases):  # one HAS_BIAS for all segments: zeros stand in
        biases = [b if b is not None else w.new_zeros(w.shape[0]) for b, w in zip(biases, weights)]
    params = [t.contiguous() if t is not None else None for t in (*weights, *biases, *lora_as, *lora_bs)]
    return LoraProjections.apply(x, tuple(scales), float(dropout_p), bool(training), len(weights), *params)
