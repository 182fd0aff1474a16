"""The forward kernels of the Triton path (gated_delta_rule_triton.py), in three launches.

Notation as in gated_delta_rule.py (chunks of C = 64 rows, G the in-chunk cumulative log-decay).

  _wy_kernel      per (chunk, head), all in parallel: G, L, T = (I + L)^-1 (forward substitution
                  in 16-row blocks, then the blocks joined by products), W = T diag(beta exp(G)) K
                  and U0 = T diag(beta) V   (fp32 out)
  _state_kernel   per (head, V tile), sequential over chunks: stores the state at each chunk's
                  start, U = U0 - W S0 (the deltas), and S1 = exp(G_C) S0 + (exp(G_C - G) K)^T U
  _output_kernel  per (chunk, head, V tile), in parallel: O = scale [exp(G) Q S0 + (Q K^T * D) U]

Only the state pass walks T; it does two [C, K] x [K, BV] products per chunk and keeps S in
registers ([K, BV] fp32). Intermediates (W, U0, U, G, the per-chunk states) are fp32 whatever
the inputs' dtype. Products take fp32 operands: "ieee" for fp32 inputs (unless torch allows
TF32), "tf32" for bf16/fp16 inputs, whose own rounding is coarser than TF32's. The first two
launches (`chunk_states`) run again in the backward, which saves no intermediates.
"""

import torch
import triton
import triton.language as tl

from .gated_delta_rule_torch import CHUNK

# --------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------


@triton.jit
def _chunk_rows(i_b, i_h, i_t, T, H, BT: tl.constexpr):
    """Rows of chunk i_t of (batch i_b, head i_h) in the [B * T * H] flattening, and which are < T."""
    offs_t = i_t * BT + tl.arange(0, BT)
    return (i_b * T + offs_t) * H + i_h, offs_t < T


@triton.jit
def _load_rows(ptr, rows, t_ok, offs, n):
    """[BT, len(offs)] fp32 tile of a [B * T * H, n] tensor, zero outside."""
    return tl.load(ptr + rows[:, None] * n + offs[None, :], mask=t_ok[:, None] & (offs[None, :] < n),
                   other=0.0).to(tl.float32)


@triton.jit
def _chunk_attention(q_ptr, k_ptr, rows, t_ok, offs_k, K, G, scale, BT: tl.constexpr, PRECISION: tl.constexpr):
    """Q = scale q and A = Q K^T * D for a chunk: D_ij = exp(G_i - G_j) on and below the diagonal,
    0 above (masked before the exp, which would overflow there)."""
    q = _load_rows(q_ptr, rows, t_ok, offs_k, K) * scale
    k = _load_rows(k_ptr, rows, t_ok, offs_k, K)
    o_i = tl.arange(0, BT)
    causal = o_i[:, None] >= o_i[None, :]
    A = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    return q, tl.where(causal, A * tl.exp(tl.where(causal, G[:, None] - G[None, :], 0.0)), 0.0)


@triton.jit
def _inverse_unit_lower(L, BT: tl.constexpr):
    """(I + L)^-1 for a strictly lower triangular [BT, BT] L, BT = 64.

    Forward substitution, T_i = e_i - sum_{j<i} L_ij T_j, inside the four 16-row diagonal blocks
    at once (15 steps of one product each instead of 63 row steps); then the blocks are joined:
    with D the block diagonal of I + L and E = D^-1 (L below the blocks),
    (I + L)^-1 = (I + E)^-1 D^-1 = (I - E)(I + E^2) D^-1, exact because E^4 = 0 for four blocks.
    Products in full fp32: the inverse feeds every output, and it is O(BT^3) per chunk, not per V.
    """
    o = tl.arange(0, BT)
    same_block = (o[:, None] // 16) == (o[None, :] // 16)
    eye = tl.where(o[:, None] == o[None, :], 1.0, 0.0)
    inv = tl.where(same_block, -L, 0.0)  # T - I inside the blocks, rows done so far
    for i in range(1, 16):
        rows = tl.where((o % 16 == i)[:, None], inv, 0.0)  # row i of each block: -L_i. still
        inv += tl.dot(rows, inv, input_precision="ieee")  # + sum_j (-L_ij) (T_j - e_j); other rows + 0
    d_inv = inv + eye
    E = tl.dot(d_inv, tl.where(same_block, 0.0, L), input_precision="ieee")
    E2 = tl.dot(E, E, input_precision="ieee")
    return tl.dot(tl.dot(eye - E, eye + E2, input_precision="ieee"), d_inv, input_precision="ieee")


@triton.jit
def _wy_kernel(
    # pointers: k [B*T*H, K], v [B*T*H, V], g, beta [B*T*H]; out (fp32): w [B*T*H, K], u0 [B*T*H, V], G [B*T*H]
    k_ptr, v_ptr, g_ptr, beta_ptr, w_ptr, u0_ptr, gcum_ptr,
    # sizes
    T, H, K, V,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr,
):
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    rows, t_ok = _chunk_rows(i_bh // H, i_bh % H, i_t, T, H, BT)
    offs_k, offs_v, o_i = tl.arange(0, BK), tl.arange(0, BV), tl.arange(0, BT)
    k = _load_rows(k_ptr, rows, t_ok, offs_k, K)
    v = _load_rows(v_ptr, rows, t_ok, offs_v, V)
    g = tl.load(g_ptr + rows, mask=t_ok, other=0.0).to(tl.float32)  # padded rows: g = beta = 0, identity
    beta = tl.load(beta_ptr + rows, mask=t_ok, other=0.0).to(tl.float32)
    G = tl.cumsum(g, axis=0)
    tl.store(gcum_ptr + rows, G, mask=t_ok)

    k_beta = k * beta[:, None]
    below = o_i[:, None] > o_i[None, :]
    L = tl.dot(k_beta, tl.trans(k), input_precision=PRECISION)
    L = tl.where(below, L * tl.exp(tl.where(below, G[:, None] - G[None, :], 0.0)), 0.0)
    inv = _inverse_unit_lower(L, BT)
    w = tl.dot(inv, k_beta * tl.exp(G)[:, None], input_precision=PRECISION)
    u0 = tl.dot(inv, v * beta[:, None], input_precision=PRECISION)
    tl.store(w_ptr + rows[:, None] * K + offs_k[None, :], w, mask=t_ok[:, None] & (offs_k[None, :] < K))
    tl.store(u0_ptr + rows[:, None] * V + offs_v[None, :], u0, mask=t_ok[:, None] & (offs_v[None, :] < V))


@triton.jit
def _state_kernel(
    # pointers: k [B*T*H, K], w, u0, G from _wy_kernel, h0 [B*H, K, V] fp32 (if HAS_INITIAL);
    # out (fp32): h [B*H, NT, K, V] (state at each chunk's start), u [B*T*H, V], ht [B*H, K, V]
    k_ptr, w_ptr, u0_ptr, gcum_ptr, h0_ptr, h_ptr, u_ptr, ht_ptr,
    # sizes
    T, H, K, V, NT,
    HAS_INITIAL: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr,
):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    offs_k, offs_v = tl.arange(0, BK), i_v * BV + tl.arange(0, BV)
    kv_ok = (offs_k[:, None] < K) & (offs_v[None, :] < V)
    kv_offs = offs_k[:, None] * V + offs_v[None, :]
    if HAS_INITIAL:
        S = tl.load(h0_ptr + i_bh * K * V + kv_offs, mask=kv_ok, other=0.0)
    else:
        S = tl.zeros((BK, BV), dtype=tl.float32)
    for i_t in range(NT):
        tl.store(h_ptr + (i_bh * NT + i_t) * K * V + kv_offs, S, mask=kv_ok)
        rows, t_ok = _chunk_rows(i_b, i_h, i_t, T, H, BT)
        w = _load_rows(w_ptr, rows, t_ok, offs_k, K)
        u = _load_rows(u0_ptr, rows, t_ok, offs_v, V)
        u -= tl.dot(w, S, input_precision=PRECISION)
        tl.store(u_ptr + rows[:, None] * V + offs_v[None, :], u, mask=t_ok[:, None] & (offs_v[None, :] < V))
        last = tl.minimum(i_t * BT + BT, T) - 1
        G_last = tl.load(gcum_ptr + (i_b * T + last) * H + i_h)
        G = tl.load(gcum_ptr + rows, mask=t_ok, other=0.0)
        k = _load_rows(k_ptr, rows, t_ok, offs_k, K)
        k_decayed = k * tl.exp(G_last - G)[:, None]
        S = S * tl.exp(G_last) + tl.dot(tl.trans(k_decayed), u, input_precision=PRECISION)
    tl.store(ht_ptr + i_bh * K * V + kv_offs, S, mask=kv_ok)


@triton.jit
def _output_kernel(
    # pointers: q, k [B*T*H, K], u and G from _state_kernel / _wy_kernel, h [B*H, NT, K, V]; out: o [B*T*H, V]
    q_ptr, k_ptr, u_ptr, gcum_ptr, h_ptr, o_ptr,
    # sizes and the query scale
    T, H, K, V, NT, scale,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr,
):
    i_v, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows, t_ok = _chunk_rows(i_bh // H, i_bh % H, i_t, T, H, BT)
    offs_k, offs_v = tl.arange(0, BK), i_v * BV + tl.arange(0, BV)
    G = tl.load(gcum_ptr + rows, mask=t_ok, other=0.0)
    q, A = _chunk_attention(q_ptr, k_ptr, rows, t_ok, offs_k, K, G, scale, BT, PRECISION)
    S = tl.load(h_ptr + (i_bh * NT + i_t) * K * V + offs_k[:, None] * V + offs_v[None, :],
                mask=(offs_k[:, None] < K) & (offs_v[None, :] < V), other=0.0)
    o = tl.dot(q * tl.exp(G)[:, None], S, input_precision=PRECISION)
    u = _load_rows(u_ptr, rows, t_ok, offs_v, V)
    o += tl.dot(A, u, input_precision=PRECISION)
    tl.store(o_ptr + rows[:, None] * V + offs_v[None, :], o.to(o_ptr.dtype.element_ty),
             mask=t_ok[:, None] & (offs_v[None, :] < V))


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------

def matmul_precision(dtype: torch.dtype) -> str:
    """v's dtype decides (q and k may be fp32 l2-normalised copies of bf16 ones)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def new_output(x: torch.Tensor, *shape: int, dtype=torch.float32) -> torch.Tensor:
    """Every buffer a kernel writes in full comes from here, so tests can poison it with NaN."""
    return x.new_empty(shape, dtype=dtype)


# Every launch, forward and backward, runs 8 warps: at K = V = 128 ptxas (sm_90a, bf16) found 4 warps
# spilling 4-20 KB (stores + loads) in all but the two output-side kernels, 8 warps a third of that
# or nothing (`python -m benchmarks.gated_delta_rule --compile-only`). The interpreter ignores it.
NUM_WARPS = 8


def blocks(K, V, on_gpu):
    """(BK, BV_full, BV_seq, BV_par): all of K, all of V (for _wy_kernel), and the V tiles of the
    sequential state passes and the kernels that loop over V (32: with a [K, BV] state or [64, K]
    accumulators held across the loop, 64-wide tiles spilled more, and _dqk_kernel wanted 232 KB
    of shared memory, over an H100's 227 KB) and of the parallel output-side kernels (64 on a GPU:
    fewer recomputations of Q K^T, no spill at either width)."""
    BK = max(16, triton.next_power_of_2(K))  # tl.dot needs every dim >= 16
    BV_full = max(16, triton.next_power_of_2(V))
    BV_seq = min(BV_full, 32)
    BV_par = min(BV_full, 64 if on_gpu else 32)  # the interpreter: V tiles small enough that V = 40 crosses one
    return BK, BV_full, BV_seq, BV_par


def chunk_states(k, v, g, beta, initial_state):
    """The first two launches, shared by the forward and the backward (which recomputes them).
    Returns fp32 w [B*T*H, K], u0, u [B*T*H, V], G [B*T*H], h [B*H, NT, K, V] (the state at
    each chunk's start) and the final state [B, H, K, V]."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    NT = triton.cdiv(T, CHUNK)
    BK, BV_full, BV, _ = blocks(K, V, v.is_cuda)
    precision = matmul_precision(v.dtype)
    w = new_output(v, B * T * H, K)
    u0 = new_output(v, B * T * H, V)
    gcum = new_output(v, B * T * H)
    _wy_kernel[(NT, B * H)](k, v, g, beta, w, u0, gcum, T, H, K, V,
                            BT=CHUNK, BK=BK, BV=BV_full, PRECISION=precision, num_warps=NUM_WARPS)
    h = new_output(v, B * H, NT, K, V)
    u = new_output(v, B * T * H, V)
    final = new_output(v, B, H, K, V)
    h0 = initial_state if initial_state is not None else final  # any pointer: never read without HAS_INITIAL
    _state_kernel[(triton.cdiv(V, BV), B * H)](k, w, u0, gcum, h0, h, u, final, T, H, K, V, NT,
                                               HAS_INITIAL=initial_state is not None,
                                               BT=CHUNK, BK=BK, BV=BV, PRECISION=precision, num_warps=NUM_WARPS)
    return w, u0, u, gcum, h, final


def forward(q, k, v, g, beta, initial_state, scale):
    """q, k [B, T, H, K], v [B, T, H, V], g, beta [B, T, H] (contiguous); initial_state fp32 or None.
    Returns o [B, T, H, V] (v's dtype) and the final state [B, H, K, V] (fp32)."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    NT = triton.cdiv(T, CHUNK)
    BK, _, _, BV = blocks(K, V, v.is_cuda)
    _, _, u, gcum, h, final = chunk_states(k, v, g, beta, initial_state)
    o = new_output(v, B, T, H, V, dtype=v.dtype)
    _output_kernel[(triton.cdiv(V, BV), NT, B * H)](q, k, u, gcum, h, o, T, H, K, V, NT, scale,
                                                    BT=CHUNK, BK=BK, BV=BV, PRECISION=matmul_precision(v.dtype),
                                                    num_warps=NUM_WARPS)
    return o, final
