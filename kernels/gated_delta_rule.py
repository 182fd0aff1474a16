"""The gated delta rule: Gated DeltaNet's linear attention (Qwen3-Next, Qwen3.5), FLA's API.

Per head, with a state S [K, V] kept in fp32 whatever the inputs' dtype, for t = 1..T:

    S   = exp(g_t) * S                          g_t <= 0: the log-decay
    u_t = beta_t * (v_t - S^T k_t)              the delta: what S mispredicts for k_t
    S   = S + k_t u_t^T
    o_t = scale * S^T q_t

`gated_delta_rule_reference` runs exactly that, a token at a time: the spec and the test oracle.

The chunked form (chunks of C = 64, "WY representation" + "UT transform", FLA's design).
Inside a chunk, with G_i = sum_{j<=i} g_j (the cumulative log-decay) and S0 the state at the
chunk's start, unrolling the recurrence gives for the whole chunk at once

    (I + L) U = diag(beta) V - diag(beta exp(G)) K S0,    L_ij = beta_i exp(G_i - G_j) k_i.k_j  (i > j)

so with T = (I + L)^-1 (unit lower triangular: one triangular solve per chunk, no dependence on S0)

    W  = T diag(beta exp(G)) K        U0 = T diag(beta) V             (the chunk-local part)
    U  = U0 - W S0                                                    (the deltas of the chunk)
    O  = scale * [diag(exp(G)) Q S0 + (Q K^T * D) U]                  D_ij = exp(G_i - G_j), i >= j
    S1 = exp(G_C) S0 + (diag(exp(G_C - G)) K)^T U

W, U0 and the intra-chunk matrices are computed for all chunks in parallel; only U, O and S1
need the previous chunk's state, a [C, K] x [K, V] product per chunk. Every exp takes a
non-positive argument (G is non-increasing), so nothing overflows. A T that is not a multiple
of C is padded with k = v = q = 0, beta = 0, g = 0 rows: a zero key and beta is the identity
update, so the state is as if the padding were not there.

Three paths, one answer within dtype tolerance:
  - `gated_delta_rule_reference`: the recurrence above (the spec);
  - `chunk_gated_delta_rule_torch`: the chunked form in torch, differentiable by autograd (the
    CPU path and the fallback);
  - the Triton kernels in `gated_delta_rule_triton.py` for CUDA tensors (`dispatch.use_triton`).
`cu_seqlens` (packed sequences, B = 1) is handled once, here, for every path: see `varlen.py`.
`gated_delta_rule_step` is the recurrent form for decoding a few tokens onto a state.
"""

import torch

from .dispatch import kernel_choice, use_triton
from .varlen import Packing

CHUNK = 64


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(|x|^2 + eps) over the last dim, as transformers' (and FLA's) l2norm."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def state_dtype(v: torch.Tensor) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 inputs; float64 inputs (the tests' oracle) keep float64."""
    return torch.promote_types(v.dtype, torch.float32)


# --------------------------------------------------------------------------------------
# The recurrence: the spec, and the decoding step
# --------------------------------------------------------------------------------------


def _recurrence(q, k, v, g, beta, state, scale):
    """q, k [B, T, H, K], v [B, T, H, V], g, beta [B, T, H], state [B, H, K, V] or None.
    Returns (o [B, T, H, V] in the state's dtype, final state)."""
    dt, out_dtype = state_dtype(v), v.dtype
    B, T, H, K = k.shape
    S = q.new_zeros(B, H, K, v.shape[-1], dtype=dt) if state is None else state.to(dt)
    q, k, v, g, beta = (x.to(dt) for x in (q, k, v, g, beta))
    outs = []
    for t in range(T):
        S = S * g[:, t].exp()[..., None, None]
        kv_mem = torch.einsum("bhk,bhkv->bhv", k[:, t], S)
        delta = (v[:, t] - kv_mem) * beta[:, t, :, None]
        S = S + k[:, t, :, :, None] * delta[:, :, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, S))
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(v.shape, dtype=dt)
    return o, S


def gated_delta_rule_reference(q, k, v, g, beta, initial_state=None, output_final_state=False,
                               cu_seqlens=None, scale=None, use_qk_l2norm_in_kernel=False):
    """The recurrence a token at a time; same arguments and results as `chunk_gated_delta_rule`."""
    _check(q, k, v, g, beta, initial_state, cu_seqlens)
    scale = k.shape[-1] ** -0.5 if scale is None else scale
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q.to(state_dtype(v))), l2norm(k.to(state_dtype(v)))
    if cu_seqlens is None:
        o, S = _recurrence(q, k, v, g, beta, initial_state, scale)
        return o.to(v.dtype), (S if output_final_state else None)
    outs, states = [], []
    bounds = cu_seqlens.tolist()
    for n, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        init = None if initial_state is None else initial_state[n:n + 1]
        o, S = _recurrence(*(x[:, lo:hi] for x in (q, k, v, g, beta)), init, scale)
        outs.append(o)
        states.append(S)
    return torch.cat(outs, dim=1).to(v.dtype), (torch.cat(states) if output_final_state else None)


def gated_delta_rule_step(q, k, v, g, beta, state=None, scale=None, use_qk_l2norm_in_kernel=False):
    """Decoding: run the recurrence over a few new tokens (usually T = 1) from `state`.

    q, k [B, T, H, K], v [B, T, H, V], g, beta [B, T, H]; state [B, H, K, V] (fp32) or None for zeros.
    Returns (o [B, T, H, V] in v's dtype, the new state, fp32). Nothing is updated in place.
    A token costs a few [B, H, K, V] elementwise passes: cheaper than a chunk of 64 for T = 1.
    """
    o, S = gated_delta_rule_reference(q, k, v, g, beta, state, True, None, scale, use_qk_l2norm_in_kernel)
    return o, S


# --------------------------------------------------------------------------------------
# The chunked form in torch
# --------------------------------------------------------------------------------------


def _chunked(x, chunk):
    """[B, T, H, ...] -> [B, H, NT, C, ...], zero-padded at the end of T."""
    B, T = x.shape[:2]
    pad = (-T) % chunk
    x = x.transpose(1, 2)
    if pad:
        x = torch.cat([x, x.new_zeros(B, x.shape[1], pad, *x.shape[3:])], dim=2)
    return x.reshape(B, x.shape[1], (T + pad) // chunk, chunk, *x.shape[3:])


def chunk_gated_delta_rule_torch(q, k, v, g, beta, initial_state, scale, chunk=CHUNK):
    """The chunked form for a dense batch (no cu_seqlens), computed in the state's dtype.
    Returns (o [B, T, H, V] in v's dtype, final state [B, H, K, V])."""
    dt, out_dtype = state_dtype(v), v.dtype
    B, T, H, K = k.shape
    S = q.new_zeros(B, H, K, v.shape[-1], dtype=dt) if initial_state is None else initial_state.to(dt)
    if T == 0:  # an empty sequence (of a packed batch, say): the state passes through
        return v.new_zeros(v.shape), S
    q, k, v, g, beta = (_chunked(x.to(dt), chunk) for x in (q, k, v, g, beta))  # [B, H, NT, C, ...]
    G = g.cumsum(-1)
    G_last = G[..., -1:]
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    # exp(G_i - G_j) on and below the diagonal; above it masked before the exp (it would overflow).
    D = torch.where(causal, G[..., :, None] - G[..., None, :], -torch.inf).exp()
    k_beta = k * beta[..., None]
    L = ((k_beta @ k.transpose(-1, -2)) * D).tril(-1)
    eye = torch.eye(chunk, dtype=dt, device=q.device)
    # T = (I + L)^-1 applied by one triangular solve for both right-hand sides.
    rhs = torch.cat([k_beta * G.exp()[..., None], v * beta[..., None]], dim=-1)
    WU = torch.linalg.solve_triangular(L + eye, rhs, upper=False, unitriangular=True)
    W, U0 = WU[..., :K], WU[..., K:]
    A = (q @ k.transpose(-1, -2)) * D * scale  # the intra-chunk attention
    q_decayed = q * (G.exp() * scale)[..., None]
    k_decayed = k * (G_last - G).exp()[..., None]
    chunk_decay = G_last.exp()[..., None]  # [B, H, NT, 1, 1]

    outs = []
    for i in range(q.shape[2]):
        U = U0[:, :, i] - W[:, :, i] @ S
        outs.append(q_decayed[:, :, i] @ S + A[:, :, i] @ U)
        S = S * chunk_decay[:, :, i] + k_decayed[:, :, i].transpose(-1, -2) @ U
    o = torch.stack(outs, dim=2).reshape(B, H, -1, v.shape[-1])[:, :, :T]
    return o.transpose(1, 2).to(out_dtype), S


# --------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------


def chunk_gated_delta_rule(q, k, v, g, beta, initial_state=None, output_final_state=False,
                           cu_seqlens=None, scale=None, use_qk_l2norm_in_kernel=False):
    """Gated DeltaNet's linear attention over whole sequences (training, prefill).

    q, k: [B, T, H, K]; v: [B, T, H, V]; g: [B, T, H] log-decay (<= 0); beta: [B, T, H] in (0, 1).
    initial_state: [B, H, K, V] ([N, H, K, V] with cu_seqlens) or None for zeros.
    cu_seqlens: int [N + 1] sequence starts of a packed batch (B = 1); the state restarts at each.
    scale: defaults to K ** -0.5. use_qk_l2norm_in_kernel: l2-normalise q and k (eps 1e-6) first.
    Returns (o [B, T, H, V] in v's dtype, final state [B or N, H, K, V] fp32, or None).
    Differentiable in q, k, v, g, beta and initial_state.
    """
    _check(q, k, v, g, beta, initial_state, cu_seqlens)
    scale = k.shape[-1] ** -0.5 if scale is None else float(scale)
    if use_qk_l2norm_in_kernel:  # in fp32 (kept so), before the chunks: autograd carries its gradient
        q, k = l2norm(q.to(state_dtype(v))), l2norm(k.to(state_dtype(v)))
    packing = Packing(cu_seqlens, q.shape[1]) if cu_seqlens is not None else None
    if packing is not None:
        q, k, v, g, beta = (packing.pad(x) for x in (q, k, v, g, beta))
    if q.shape[1] > 0 and _takes_triton(q, k, v, g, beta, initial_state):  # T = 0: nothing to launch
        from .gated_delta_rule_triton import chunk_gated_delta_rule_triton

        o, S = chunk_gated_delta_rule_triton(q, k, v, g, beta, initial_state, scale)
    else:
        o, S = chunk_gated_delta_rule_torch(q, k, v, g, beta, initial_state, scale)
    if packing is not None:
        o = packing.unpad(o)
    return o, (S if output_final_state else None)


def _takes_triton(q, k, v, g, beta, initial_state) -> bool:
    if not use_triton(v):
        return False
    from .gated_delta_rule_triton import check_supported  # imports triton: only reached when it imports

    why = check_supported(q, k, v, g, beta, initial_state)
    if why is None:
        return True
    if kernel_choice() == "triton":
        raise ValueError(f"LOWRANK_KERNEL=triton, but the gated delta rule kernels do not take {why}")
    return False  # auto: the torch path serves what the kernels do not


def _check(q, k, v, g, beta, initial_state, cu_seqlens):
    if q.dim() != 4 or q.shape != k.shape:
        raise ValueError(f"q and k must both be [B, T, H, K], got {tuple(q.shape)} and {tuple(k.shape)}")
    B, T, H, K = k.shape
    if v.dim() != 4 or v.shape[:3] != (B, T, H):
        raise ValueError(f"v must be [B, T, H, V] = [{B}, {T}, {H}, V], got {tuple(v.shape)}")
    for name, t in (("g", g), ("beta", beta)):
        if tuple(t.shape) != (B, T, H):
            raise ValueError(f"{name} must be [B, T, H] = [{B}, {T}, {H}], got {tuple(t.shape)}")
    if cu_seqlens is not None and B != 1:
        raise ValueError(f"cu_seqlens needs a packed batch with B = 1, got B = {B}")
    if initial_state is not None:
        n = B if cu_seqlens is None else len(cu_seqlens) - 1
        if tuple(initial_state.shape) != (n, H, K, v.shape[-1]):
            raise ValueError(f"initial_state must be [{n}, {H}, {K}, {v.shape[-1]}], "
                             f"got {tuple(initial_state.shape)}")
