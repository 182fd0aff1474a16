"""The backward kernels of the Triton path (gated_delta_rule_triton.py; forward in _fwd.py).

Notation as in gated_delta_rule.py, per chunk: Q = scale q, S0 / S1 the states at the chunk's
start / end, A = Q K^T * D (D_ij = exp(G_i - G_j), i >= j), Kd = diag(exp(G_C - G)) K, and

    O  = diag(exp(G)) Q S0 + A U,     S1 = exp(G_C) S0 + Kd^T U,     U = U0 - W S0,
    [W | U0] = T [diag(beta exp(G)) K | diag(beta) V],     T = (I + L)^-1.

Only the state gradient runs across chunks: U's gradient is local plus what the next chunk's
state gradient dS1 sends back, and dS1 is all a chunk passes to the one before it:

    dU  = A^T dO + Kd dS1
    dS0 = exp(G_C) dS1 + (diag(exp(G)) Q)^T dO - W^T dU

The rest is per chunk and parallel. Through T (Y = T X): dX = T^T dY and dL = -dX Y^T below the
diagonal, with dY = [dW | dU0] = [-dU S0^T | dU]. Every exp(G_i - G_j) term sends +z to G_i and
-z to G_j; exp(G_C) and Kd send theirs to G_C; since G_i = g_1 + ... + g_i and G_C is the
chunk's sum, dg is the reverse cumsum of dG plus dG_C.

Launches (the forward's inputs are all that is saved; its first two launches run again):

  chunk_states       the forward's _wy_kernel and _state_kernel: W, U0, U and every S0
  _dv_local_kernel   per (V tile, chunk, head): dU = A^T dO, in parallel
  _dstate_kernel     per (V tile, head), backward over chunks: stores each dS1, adds Kd dS1
                     to dU, and ends with d(initial_state)
  _dqk_kernel        per (chunk, head), over V tiles: dq, the A / Kd / exp(G) parts of dk and dG,
                     dW = -dU S0^T
  _dwy_kernel        per (chunk, head), over V tiles: T again, dv, dbeta, the rest of dk and dG
                     (through L and X), then dg as the reverse cumsum

G is recomputed in each kernel from g with the padded rows held at the chunk's total (g = 0
there), so exp(G_i - G_j) never overflows on a padded row. Buffers between launches are fp32.
"""

import triton
import triton.language as tl

from . import gated_delta_rule_triton_fwd as fwd
from .gated_delta_rule_triton_fwd import _chunk_attention, _chunk_rows, _inverse_unit_lower, _load_rows
from .gated_delta_rule_torch import CHUNK

# --------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------


@triton.jit
def _chunk_decay(g_ptr, rows, t_ok, BT: tl.constexpr):
    """G (the in-chunk cumsum of g, padded rows at the total) and G_C (that total), fp32."""
    g = tl.load(g_ptr + rows, mask=t_ok, other=0.0).to(tl.float32)
    G = tl.cumsum(g, axis=0)
    return G, tl.sum(tl.where(tl.arange(0, BT) == BT - 1, G, 0.0), axis=0)


@triton.jit
def _store_rows(ptr, rows, t_ok, offs, n, x):
    """Store a [BT, len(offs)] tile into a [B * T * H, n] tensor, in its dtype."""
    tl.store(ptr + rows[:, None] * n + offs[None, :], x.to(ptr.dtype.element_ty),
             mask=t_ok[:, None] & (offs[None, :] < n))


@triton.jit
def _dv_local_kernel(
    # pointers: q, k [B*T*H, K], g [B*T*H], do [B*T*H, V]; out (fp32): du [B*T*H, V]
    q_ptr, k_ptr, g_ptr, do_ptr, du_ptr,
    # sizes and the query scale
    T, H, K, V, scale,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr,
):
    i_v, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows, t_ok = _chunk_rows(i_bh // H, i_bh % H, i_t, T, H, BT)
    offs_k, offs_v = tl.arange(0, BK), i_v * BV + tl.arange(0, BV)
    G, _ = _chunk_decay(g_ptr, rows, t_ok, BT)
    _, A = _chunk_attention(q_ptr, k_ptr, rows, t_ok, offs_k, K, G, scale, BT, PRECISION)
    do = _load_rows(do_ptr, rows, t_ok, offs_v, V)
    _store_rows(du_ptr, rows, t_ok, offs_v, V, tl.dot(tl.trans(A), do, input_precision=PRECISION))


@triton.jit
def _dstate_kernel(
    # pointers: q, k, w [B*T*H, K], g [B*T*H], do [B*T*H, V], dht [B*H, K, V] (if HAS_FINAL_GRAD);
    # du [B*T*H, V] (A^T dO in, dU out); out (fp32): dh [B*H, NT, K, V] (dS1 of each chunk),
    # dh0 [B*H, K, V] (if HAS_INITIAL)
    q_ptr, k_ptr, w_ptr, g_ptr, do_ptr, dht_ptr, du_ptr, dh_ptr, dh0_ptr,
    # sizes and the query scale
    T, H, K, V, NT, scale,
    HAS_INITIAL: tl.constexpr, HAS_FINAL_GRAD: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr,
):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    offs_k, offs_v = tl.arange(0, BK), i_v * BV + tl.arange(0, BV)
    kv_ok = (offs_k[:, None] < K) & (offs_v[None, :] < V)
    kv_offs = offs_k[:, None] * V + offs_v[None, :]
    if HAS_FINAL_GRAD:
        dS = tl.load(dht_ptr + i_bh * K * V + kv_offs, mask=kv_ok, other=0.0).to(tl.float32)
    else:
        dS = tl.zeros((BK, BV), dtype=tl.float32)
    for i in range(NT):
        i_t = NT - 1 - i
        tl.store(dh_ptr + (i_bh * NT + i_t) * K * V + kv_offs, dS, mask=kv_ok)
        rows, t_ok = _chunk_rows(i_b, i_h, i_t, T, H, BT)
        G, G_last = _chunk_decay(g_ptr, rows, t_ok, BT)
        k = _load_rows(k_ptr, rows, t_ok, offs_k, K)
        du = _load_rows(du_ptr, rows, t_ok, offs_v, V)
        du += tl.dot(k * tl.exp(G_last - G)[:, None], dS, input_precision=PRECISION)
        _store_rows(du_ptr, rows, t_ok, offs_v, V, du)
        q = _load_rows(q_ptr, rows, t_ok, offs_k, K) * (scale * tl.exp(G))[:, None]
        w = _load_rows(w_ptr, rows, t_ok, offs_k, K)
        do = _load_rows(do_ptr, rows, t_ok, offs_v, V)
        dS = dS * tl.exp(G_last) + tl.dot(tl.trans(q), do, input_precision=PRECISION) \
            - tl.dot(tl.trans(w), du, input_precision=PRECISION)
    if HAS_INITIAL:
        tl.store(dh0_ptr + i_bh * K * V + kv_offs, dS, mask=kv_ok)


@triton.jit
def _dqk_kernel(
    # pointers: q, k [B*T*H, K], g [B*T*H], do [B*T*H, V], u, du [B*T*H, V] (fp32), h, dh
    # [B*H, NT, K, V] (S0 and dS1 of each chunk); out: dq [B*T*H, K] (q's dtype), and (fp32)
    # dk_part, dw [B*T*H, K], dG_part [B*T*H]
    q_ptr, k_ptr, g_ptr, do_ptr, u_ptr, du_ptr, h_ptr, dh_ptr, dq_ptr, dk_ptr, dw_ptr, dG_ptr,
    # sizes and the query scale
    T, H, K, V, NT, scale,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr,
):
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    rows, t_ok = _chunk_rows(i_bh // H, i_bh % H, i_t, T, H, BT)
    offs_k, o_i = tl.arange(0, BK), tl.arange(0, BT)
    state = (i_bh * NT + i_t) * K * V
    R = tl.zeros((BT, BK), dtype=tl.float32)  # dO S0^T
    dA = tl.zeros((BT, BT), dtype=tl.float32)  # dO U^T
    dKd = tl.zeros((BT, BK), dtype=tl.float32)  # U dS1^T
    dw = tl.zeros((BT, BK), dtype=tl.float32)  # -dU S0^T
    d_decay = 0.0  # sum(S0 * dS1): exp(G_C)'s share
    for i_v in range(tl.cdiv(V, BV)):
        offs_v = i_v * BV + tl.arange(0, BV)
        kv = state + offs_k[:, None] * V + offs_v[None, :]
        kv_ok = (offs_k[:, None] < K) & (offs_v[None, :] < V)
        S0 = tl.load(h_ptr + kv, mask=kv_ok, other=0.0)
        dS1 = tl.load(dh_ptr + kv, mask=kv_ok, other=0.0)
        do = _load_rows(do_ptr, rows, t_ok, offs_v, V)
        u = _load_rows(u_ptr, rows, t_ok, offs_v, V)
        du = _load_rows(du_ptr, rows, t_ok, offs_v, V)
        R += tl.dot(do, tl.trans(S0), input_precision=PRECISION)
        dA += tl.dot(do, tl.trans(u), input_precision=PRECISION)
        dKd += tl.dot(u, tl.trans(dS1), input_precision=PRECISION)
        dw -= tl.dot(du, tl.trans(S0), input_precision=PRECISION)
        d_decay += tl.sum(S0 * dS1)
    q = _load_rows(q_ptr, rows, t_ok, offs_k, K) * scale
    k = _load_rows(k_ptr, rows, t_ok, offs_k, K)
    G, G_last = _chunk_decay(g_ptr, rows, t_ok, BT)
    causal = o_i[:, None] >= o_i[None, :]
    D = tl.where(causal, tl.exp(tl.where(causal, G[:, None] - G[None, :], 0.0)), 0.0)
    A = tl.dot(q, tl.trans(k), input_precision=PRECISION) * D
    dP = tl.where(causal, dA, 0.0) * D  # the gradient of Q K^T
    dq = (R * tl.exp(G)[:, None] + tl.dot(dP, k, input_precision=PRECISION)) * scale
    k_decay = tl.exp(G_last - G)
    dk = tl.dot(tl.trans(dP), q, input_precision=PRECISION) + dKd * k_decay[:, None]
    zA = tl.where(causal, dA, 0.0) * A
    z_kd = tl.sum(dKd * k, axis=1) * k_decay
    dG = tl.sum(q * R, axis=1) * tl.exp(G) + tl.sum(zA, axis=1) - tl.sum(zA, axis=0) - z_kd
    # G_C's share goes on the chunk's last real row: the reverse cumsum hands it to every row.
    dG_last = tl.sum(z_kd, axis=0) + tl.exp(G_last) * d_decay
    dG += tl.where(o_i == tl.minimum(BT, T - i_t * BT) - 1, dG_last, 0.0)
    _store_rows(dq_ptr, rows, t_ok, offs_k, K, dq)
    _store_rows(dk_ptr, rows, t_ok, offs_k, K, dk)
    _store_rows(dw_ptr, rows, t_ok, offs_k, K, dw)
    tl.store(dG_ptr + rows, dG, mask=t_ok)


@triton.jit
def _dwy_kernel(
    # pointers: k [B*T*H, K], v, du [B*T*H, V], g, beta [B*T*H], and (fp32) w, u0 from chunk_states,
    # dk_part, dw [B*T*H, K], dG_part from _dqk_kernel; out (the inputs' dtypes): dk, dv, dg, dbeta
    k_ptr, v_ptr, du_ptr, g_ptr, beta_ptr, w_ptr, u0_ptr, dk_part_ptr, dw_ptr, dG_ptr,
    dk_ptr, dv_ptr, dg_ptr, dbeta_ptr,
    # sizes
    T, H, K, V,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr,
):
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    rows, t_ok = _chunk_rows(i_bh // H, i_bh % H, i_t, T, H, BT)
    offs_k, o_i = tl.arange(0, BK), tl.arange(0, BT)
    k = _load_rows(k_ptr, rows, t_ok, offs_k, K)
    beta = tl.load(beta_ptr + rows, mask=t_ok, other=0.0).to(tl.float32)
    G, _ = _chunk_decay(g_ptr, rows, t_ok, BT)
    below = o_i[:, None] > o_i[None, :]
    KD = tl.dot(k, tl.trans(k), input_precision=PRECISION)  # k_i . k_j exp(G_i - G_j), below the diagonal
    KD = tl.where(below, KD * tl.exp(tl.where(below, G[:, None] - G[None, :], 0.0)), 0.0)
    L = KD * beta[:, None]
    inv = _inverse_unit_lower(L, BT)  # as the forward's: the same T to fp32 rounding

    dL = tl.zeros((BT, BT), dtype=tl.float32)
    dbeta = tl.zeros((BT,), dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        offs_v = i_v * BV + tl.arange(0, BV)
        dx = tl.dot(tl.trans(inv), _load_rows(du_ptr, rows, t_ok, offs_v, V), input_precision=PRECISION)
        _store_rows(dv_ptr, rows, t_ok, offs_v, V, dx * beta[:, None])
        dbeta += tl.sum(dx * _load_rows(v_ptr, rows, t_ok, offs_v, V), axis=1)
        dL -= tl.dot(dx, tl.trans(_load_rows(u0_ptr, rows, t_ok, offs_v, V)), input_precision=PRECISION)
    dx = tl.dot(tl.trans(inv), _load_rows(dw_ptr, rows, t_ok, offs_k, K), input_precision=PRECISION)
    dL -= tl.dot(dx, tl.trans(_load_rows(w_ptr, rows, t_ok, offs_k, K)), input_precision=PRECISION)
    dL = tl.where(below, dL, 0.0)

    # X_w = diag(beta exp(G)) K: its share of dk, dbeta and dG
    dk = _load_rows(dk_part_ptr, rows, t_ok, offs_k, K) + dx * (beta * tl.exp(G))[:, None]
    x_share = tl.sum(dx * k, axis=1) * tl.exp(G)
    # L = diag(beta) (K K^T * D) below the diagonal: its share
    dKK = tl.where(below, dL * beta[:, None] * tl.exp(tl.where(below, G[:, None] - G[None, :], 0.0)), 0.0)
    dk += tl.dot(dKK, k, input_precision=PRECISION) + tl.dot(tl.trans(dKK), k, input_precision=PRECISION)
    dbeta += x_share + tl.sum(dL * KD, axis=1)
    zL = dL * L
    dG = tl.load(dG_ptr + rows, mask=t_ok, other=0.0) + x_share * beta + tl.sum(zL, axis=1) - tl.sum(zL, axis=0)
    _store_rows(dk_ptr, rows, t_ok, offs_k, K, dk)
    tl.store(dbeta_ptr + rows, dbeta.to(dbeta_ptr.dtype.element_ty), mask=t_ok)
    tl.store(dg_ptr + rows, tl.cumsum(dG, axis=0, reverse=True).to(dg_ptr.dtype.element_ty), mask=t_ok)


# --------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------



def backward(q, k, v, g, beta, initial_state, scale, do, dfinal):
    """The forward's operands (contiguous; initial_state fp32 or None), do [B, T, H, V] and
    dfinal [B, H, K, V] or None (no gradient reached the final state). Returns dq, dk, dv, dg,
    dbeta in their operands' dtypes and d(initial_state) fp32 (None without an initial state)."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    NT = triton.cdiv(T, CHUNK)
    BK, _, BV_seq, BV_par = fwd.blocks(K, V, v.is_cuda)
    meta = dict(BT=CHUNK, BK=BK, BV=BV_seq, PRECISION=fwd.matmul_precision(v.dtype), num_warps=fwd.NUM_WARPS)
    w, u0, u, _, h, _ = fwd.chunk_states(k, v, g, beta, initial_state)

    du = fwd.new_output(v, B * T * H, V)
    _dv_local_kernel[(triton.cdiv(V, BV_par), NT, B * H)](q, k, g, do, du, T, H, K, V, scale, **dict(meta, BV=BV_par))
    dh = fwd.new_output(v, B * H, NT, K, V)
    dh0 = fwd.new_output(v, B, H, K, V) if initial_state is not None else None
    _dstate_kernel[(triton.cdiv(V, BV_seq), B * H)](
        q, k, w, g, do, dfinal if dfinal is not None else dh, du, dh, dh0 if dh0 is not None else dh,
        T, H, K, V, NT, scale, HAS_INITIAL=dh0 is not None, HAS_FINAL_GRAD=dfinal is not None, **meta)

    dq = fwd.new_output(v, B, T, H, K, dtype=q.dtype)
    dk_part, dw = fwd.new_output(v, B * T * H, K), fwd.new_output(v, B * T * H, K)
    dG = fwd.new_output(v, B * T * H)
    _dqk_kernel[(NT, B * H)](q, k, g, do, u, du, h, dh, dq, dk_part, dw, dG, T, H, K, V, NT, scale, **meta)

    dk = fwd.new_output(v, B, T, H, K, dtype=k.dtype)
    dv = fwd.new_output(v, B, T, H, V, dtype=v.dtype)
    dg = fwd.new_output(v, B, T, H, dtype=g.dtype)
    dbeta = fwd.new_output(v, B, T, H, dtype=beta.dtype)
    _dwy_kernel[(NT, B * H)](k, v, du, g, beta, w, u0, dk_part, dw, dG, dk, dv, dg, dbeta, T, H, K, V, **meta)
    return dq, dk, dv, dg, dbeta, dh0

