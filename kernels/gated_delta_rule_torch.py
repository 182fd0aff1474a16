"""The gated delta rule in torch (the math is in gated_delta_rule.py's docstring): the token-by-
token recurrence that is the spec and the test oracle, the decode step, and the chunked form that
is the CPU path and the fallback. Kept apart from the dispatch in gated_delta_rule.py so the
Triton path can build on the chunked form without an import cycle."""

import torch

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
    dt = state_dtype(v)
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


def check_args(q, k, v, g, beta, initial_state, cu_seqlens):
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
