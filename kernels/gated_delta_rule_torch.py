"""The gated delta rule in torch (the math is in gated_delta_rule.py's docstring): the token-by-
token recurrence that is the spec and the test oracle, the decode step, and the chunked form that
is the CPU path and the fallback. Kept apart from the dispatch in gated_delta_rule.py so the
Triton path can build on the chunked form without an import cycle."""

import torch

CHUNK = 64


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(|x|^2 + eps) over the last dim, as transformers' (and FLA's) l2norm."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def per_value_head(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q or k [B, T, H_k, K] -> [B, T, H_v, K]: value head j reads key head j // (H_v / H_k)."""
    r = v.shape[2] // x.shape[2]
    return x if r == 1 else x.repeat_interleave(r, dim=2)


def state_dtype(v: torch.Tensor) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 inputs; float64 inputs (the tests' oracle) keep float64."""
    return torch.promote_types(v.dtype, torch.float32)


# --------------------------------------------------------------------------------------
# The recurrence: the spec, and the decoding step
# --------------------------------------------------------------------------------------


def _recurrence(q, k, v, g, beta, state, scale):
    """q, k [B, T, H_k, K], v [B, T, H, V], g, beta [B, T, H], state [B, H, K, V] or None.
    Returns (o [B, T, H, V] in the state's dtype, final state)."""
    dt = state_dtype(v)
    q, k = per_value_head(q, v), per_value_head(k, v)
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
    check_args(q, k, v, g, beta, initial_state, cu_seqlens)
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
    """[B, T, H, ...] -> [NT, B * H, C, ...] contiguous, zero-padded at the end of T: chunk i of
    every (batch, head) is then one contiguous [B * H, C, ...] block for the loop's bmm."""
    B, T, H = x.shape[:3]
    pad = (-T) % chunk
    if pad:
        x = torch.cat([x, x.new_zeros(B, pad, *x.shape[2:])], dim=1)
    x = x.reshape(B, (T + pad) // chunk, chunk, H, *x.shape[3:]).movedim(3, 1).movedim(2, 0)
    return x.reshape(x.shape[0], B * H, chunk, *x.shape[4:])


class _UnitLowerInverse(torch.autograd.Function):
    """(I + L)^-1 for strictly lower triangular L [..., C, C].

    On the CPU a triangular solve against the identity, then plain matmuls with the inverse, is
    ~3x faster (forward and backward) than solving for the right-hand sides directly: batched
    trsm is slow and scales badly with threads, matmul is not. The backward is two matmuls,
    d(M^-1) = -M^-T dT M^-T, kept strictly lower as L is."""

    @staticmethod
    def forward(ctx, L):
        eye = torch.eye(L.shape[-1], dtype=L.dtype, device=L.device)
        T = torch.linalg.solve_triangular(L + eye, eye.expand(L.shape), upper=False, unitriangular=True)
        ctx.save_for_backward(T)
        return T

    @staticmethod
    def backward(ctx, dT):
        (T,) = ctx.saved_tensors
        Tt = T.transpose(-1, -2)
        return -(Tt @ dT @ Tt).tril(-1)


def chunk_gated_delta_rule_torch(q, k, v, g, beta, initial_state, scale, chunk=CHUNK):
    """The chunked form for a dense batch (no cu_seqlens), computed in the state's dtype.
    q, k may have H_k = H / r heads, each read by r consecutive value heads: the products of
    keys and queries alone (K K^T, Q K^T, [C, C] per chunk) are then computed once per key head
    and shared by its r value heads, and no repeated copy of q or k is made.
    Returns (o [B, T, H, V] in v's dtype, final state [B, H, K, V])."""
    dt, out_dtype = state_dtype(v), v.dtype
    B, T, Hk, K = k.shape
    H, Vd = v.shape[2], v.shape[-1]
    r = H // Hk
    S = q.new_zeros(B, H, K, Vd, dtype=dt) if initial_state is None else initial_state.to(dt)
    if T == 0:  # an empty sequence (of a packed batch, say): the state passes through
        return v.new_zeros(v.shape), S
    q, k = (_chunked(x.to(dt), chunk) for x in (q, k))  # [NT, B * H_k, C, K]
    # The value side grouped by key head: [NT, B * H_k, r, C, ...] (value head j = key head j // r).
    v, g, beta = (_chunked(x.to(dt), chunk).unflatten(1, (B * Hk, r)) for x in (v, g, beta))
    G = g.cumsum(-1)
    G_last = G[..., -1:]
    upper = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).triu(1)
    # exp(G_i - G_j) on and below the diagonal; above it masked before the exp (it would overflow).
    D = (G[..., :, None] - G[..., None, :]).masked_fill(upper, -torch.inf).exp()
    kk = (k @ k.transpose(-1, -2)).unsqueeze(2)  # one per key head
    Tinv = _UnitLowerInverse.apply((kk * D * beta[..., None]).tril(-1))  # T = (I + L)^-1, L = diag(beta) K K^T * D
    # W = T diag(beta exp(G)) K: the diagonal folded into T's columns, then all r value heads'
    # [C, C] blocks stacked against their key head's shared K in one matmul.
    W = ((Tinv * (beta * G.exp())[..., None, :]).flatten(2, 3) @ k).view(*Tinv.shape[:-1], K)
    U0 = Tinv @ (v * beta[..., None])
    q = q * scale
    A = (q @ k.transpose(-1, -2)).unsqueeze(2) * D  # the intra-chunk attention, zero above the diagonal
    q_decayed = q.unsqueeze(2) * G.exp()[..., None]
    k_decayed_t = (k.unsqueeze(2) * (G_last - G).exp()[..., None]).transpose(-1, -2)
    chunk_decay = G_last.exp()[..., None]  # [NT, B * H_k, r, 1, 1]
    U0, W, q_decayed, A, k_decayed_t, chunk_decay = (x.flatten(1, 2) for x in (U0, W, q_decayed, A, k_decayed_t,
                                                                               chunk_decay))  # [NT, B * H, ...]

    S = S.reshape(B * H, K, Vd)
    outs = []
    # unbind, not x[i]: the backward of each x[i] would write a whole zero tensor of x's size.
    for U0_i, W_i, q_i, A_i, k_i, decay_i in zip(*(x.unbind(0) for x in (U0, W, q_decayed, A, k_decayed_t,
                                                                         chunk_decay))):
        U = torch.baddbmm(U0_i, W_i, S, alpha=-1)
        outs.append(torch.baddbmm(q_i @ S, A_i, U))
        S = torch.baddbmm(S * decay_i, k_i, U)
    o = torch.stack(outs).reshape(-1, B, H, chunk, Vd).permute(1, 0, 3, 2, 4).reshape(B, -1, H, Vd)[:, :T]
    return o.to(out_dtype), S.reshape(B, H, K, Vd)


# --------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------


def check_args(q, k, v, g, beta, initial_state, cu_seqlens):
    if q.dim() != 4 or q.shape != k.shape:
        raise ValueError(f"q and k must both be [B, T, H_k, K], got {tuple(q.shape)} and {tuple(k.shape)}")
    B, T, Hk, K = k.shape
    if v.dim() != 4 or v.shape[:2] != (B, T) or v.shape[2] % max(Hk, 1):
        raise ValueError(f"v must be [B, T, H, V] = [{B}, {T}, H, V] with H a multiple of q and k's "
                         f"{Hk} heads, got {tuple(v.shape)}")
    H = v.shape[2]
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
