"""The gated delta rule in torch (the math is in gated_delta_rule.py's docstring): the token-by-
token recurrence that is the spec and the test oracle, the decode step, and the chunked form that
is the CPU path and the fallback. Kept apart from the dispatch in gated_delta_rule.py so the
Triton path can build on the chunked form without an import cycle."""

import torch

CHUNK = 64  # the Triton kernels' chunk (and FLA's)
# The torch path's on the CPU: C = 32 does a little over half the [C, C]-sized work of C = 64 for
# twice the loop steps, and a layer's forward and backward ran 5-15% faster here (2-core EPYC;
# Qwen3.5-9B's head shapes and a small model's). On a GPU the torch path keeps C = 64.
CPU_CHUNK = 32


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
# The chunked form in torch: an autograd Function with a written-out backward
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


def _unchunked(x, B, T):
    """_chunked's inverse: [NT, B * H, C, ...] -> [B, T, H, ...] (the padding dropped)."""
    NT, BH, C = x.shape[:3]
    x = x.reshape(NT, B, BH // B, C, *x.shape[3:]).permute(1, 0, 3, 2, *range(4, x.dim() + 1))
    return x.reshape(B, NT * C, BH // B, *x.shape[4:])[:, :T]


def _operands(q, k, v, g, beta, scale, chunk):
    """The chunked operands in the state's dtype: q (scaled), k [NT, N, C, K] with N = B * H_k
    (one per key head); v, g, beta [NT, N, r, C, ...] (value head j = key head j // r)."""
    dt = state_dtype(v)
    N, r = k.shape[0] * k.shape[2], v.shape[2] // k.shape[2]
    return (_chunked(q.to(dt), chunk) * scale, _chunked(k.to(dt), chunk),
            *(_chunked(x.to(dt), chunk).unflatten(1, (N, r)) for x in (v, g, beta)))


def _unit_lower_inverse(L):
    """(I + L)^-1 for strictly lower triangular L [..., C, C]. On the CPU one triangular solve
    against the identity, then matmuls with the inverse, is ~3x faster than solving for each
    right-hand side: batched trsm is slow and scales badly with threads, matmul does not."""
    eye = torch.eye(L.shape[-1], dtype=L.dtype, device=L.device)
    return torch.linalg.solve_triangular(L + eye, eye.expand(L.shape), upper=False, unitriangular=True)


def _flat(x):
    """[n, N, r, ...] -> [n, B * H, ...] for the per-chunk bmm."""
    return x.flatten(1, 2)


class _Chunks:
    """What the chunks need that does not depend on the state, for all of them at once (operands
    as `_operands` gives them). K K^T and Q K^T are computed once per key head and shared
    by its r value heads. The backward passes the forward's T = (I + L)^-1 and W in, not to make
    them again."""

    def __init__(self, q, k, v, g, beta, Tinv=None, W=None):
        self.q, self.k, self.v, self.beta = q, k, v, beta
        G = g.cumsum(-1)
        self.eG = G.exp()
        G_last = G[..., -1:]
        self.e_rest = (G_last - G).exp()  # exp(G_C - G_i): the decay from row i to the chunk's end
        self.decay = G_last.exp()  # [n, N, r, 1]
        C = q.shape[-2]
        upper = torch.ones(C, C, dtype=torch.bool, device=q.device).triu(1)
        # exp(G_i - G_j) on and below the diagonal; above it masked before the exp (it would overflow).
        self.D = (G[..., :, None] - G[..., None, :]).masked_fill(upper, -torch.inf).exp()
        self.kk = (k @ k.mT).unsqueeze(2)  # [n, N, 1, C, C]
        self.qk = (q @ k.mT).unsqueeze(2)
        if Tinv is None:  # T = (I + L)^-1, L = diag(beta) K K^T * D below the diagonal
            Tinv = _unit_lower_inverse((self.kk * self.D * beta[..., None]).tril(-1))
        self.Tinv = Tinv
        self.beta_eG = beta * self.eG
        # W = T diag(beta exp(G)) K: the diagonal folded into T's columns, then all r value heads'
        # [C, C] blocks stacked against their key head's shared K in one matmul.
        if W is None:
            W = ((Tinv * self.beta_eG[..., None, :]).flatten(2, 3) @ k).view(*Tinv.shape[:-1], k.shape[-1])
        self.W = W
        self.A = self.qk * self.D  # the intra-chunk attention, zero above the diagonal
        self.q_decayed = q.unsqueeze(2) * self.eG[..., None]
        self.k_decayed = k.unsqueeze(2) * self.e_rest[..., None]


class _ChunkGatedDeltaRule(torch.autograd.Function):
    """The chunked form (gated_delta_rule.py's docstring), forward and backward in torch.

    It saves its operands, T = (I + L)^-1, W, U0, the deltas U and the state at each chunk's
    start, and recomputes the rest: 60% of what autograd kept through the same steps (some 15
    [C, C]-per-row intermediates) at Qwen3.5-9B's head shape, at the same speed (docs/kernels.md).
    The backward is the Triton one's (notation and derivation in gated_delta_rule_triton_bwd.py):
    only the state gradient runs across chunks,
        dU  = A^T dO + Kd dS1,     dS0 = exp(G_C) dS1 + (diag(exp(G)) Q)^T dO - W^T dU,
    and the rest is local to each chunk, batched over all of them. What involves a state runs
    per chunk, in the loops: batching it would copy every state into one tensor, and the
    states ([B * H, K, V] each) are the biggest thing here."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, initial_state, scale, chunk):
        ops = _operands(q, k, v, g, beta, scale, chunk)
        c = _Chunks(*ops)
        B, T, H, Vd = v.shape
        NT, BH, C, K = ops[0].shape[0], B * H, chunk, k.shape[-1]
        U0 = c.Tinv @ (c.v * c.beta[..., None])  # [NT, N, r, C, V]: U's chunk-local part, T diag(beta) V
        W, A, U0_flat = _flat(c.W), _flat(c.A), _flat(U0)
        q_decayed, k_decayed_t, decay = _flat(c.q_decayed), _flat(c.k_decayed).mT, _flat(c.decay)[..., None]
        S = [q.new_zeros(BH, K, Vd, dtype=U0.dtype) if initial_state is None
             else initial_state.reshape(BH, K, Vd)]  # S[i]: the state at chunk i's start
        U, O = (torch.empty_like(U0_flat) for _ in range(2))
        for i in range(NT):
            torch.baddbmm(U0_flat[i], W[i], S[i], alpha=-1, out=U[i])
            torch.baddbmm(torch.bmm(q_decayed[i], S[i]), A[i], U[i], out=O[i])
            S.append((S[i] * decay[i]).baddbmm_(k_decayed_t[i], U[i]))  # in place: no copy of S * decay
        # save_for_backward, not ctx attributes, so that checkpointing can drop and recompute them.
        ctx.save_for_backward(q, k, v, g, beta, c.Tinv, c.W, U0, U, *S[:-1])
        ctx.scale, ctx.chunk = scale, chunk
        ctx.set_materialize_grads(False)  # an unused final state sends None: no zeros to read
        return _unchunked(O, B, T).to(v.dtype), S[-1].reshape(B, H, K, Vd)

    @staticmethod
    def backward(ctx, do, dfinal):
        q, k, v, g, beta, Tinv, W, U0, U, *S = ctx.saved_tensors
        ops = _operands(q, k, v, g, beta, ctx.scale, ctx.chunk)
        c = _Chunks(*ops, Tinv, W)
        B, T, H, Vd = v.shape
        NT, N, r = c.D.shape[:3]
        K, dt = k.shape[-1], U.dtype
        W, A, k_decayed, q_decayed = _flat(c.W), _flat(c.A), _flat(c.k_decayed), _flat(c.q_decayed)
        decay = _flat(c.decay)[..., None]
        dO = _chunked(do.to(dt), ctx.chunk) if do is not None else torch.zeros_like(U)  # [NT, B * H, C, V]
        dS = dfinal.to(dt).reshape(B * H, K, Vd) if dfinal is not None else torch.zeros_like(S[0])
        # The state gradient, backward over chunks (what does not depend on it is batched first),
        # and beside it every product with a state or its gradient.
        dU = A.mT @ dO
        dS_local = q_decayed.mT @ dO
        dq_decayed, dk_decayed, dW = (torch.empty_like(W) for _ in range(3))
        d_decay = decay.new_empty(decay.shape)
        for i in reversed(range(NT)):
            dU[i].baddbmm_(k_decayed[i], dS)
            torch.bmm(dO[i], S[i].mT, out=dq_decayed[i])
            torch.bmm(U[i], dS.mT, out=dk_decayed[i])
            torch.bmm(dU[i], S[i].mT, out=dW[i]).neg_()
            torch.bmm(S[i].view(-1, 1, K * Vd), dS.view(-1, K * Vd, 1), out=d_decay[i])  # <S0, dS1>
            dS = torch.addcmul(dS_local[i], decay[i], dS).baddbmm_(W[i].mT, dU[i], alpha=-1)
        dq, dk, dv, dg, d_beta = _local_backward(c, *(x.unflatten(1, (N, r)) for x in (
            dO @ U.mT, dq_decayed, dk_decayed, dW, dU, d_decay[..., 0])), U0)
        grads = (_unchunked(dq * ctx.scale, B, T), _unchunked(dk, B, T),
                 *(_unchunked(_flat(d), B, T) for d in (dv, dg, d_beta)))
        d_initial = dS.reshape(B, H, K, Vd) if ctx.needs_input_grad[5] else None
        return *(d.to(x.dtype) for d, x in zip(grads, (q, k, v, g, beta))), d_initial, None, None


def _local_backward(c: _Chunks, dA, dq_decayed, dk_decayed, dW, dU, d_decay, U0):
    """The chunk-local gradients, [NT, N, r, ...] in, (dq of the scaled q, dk, dv, dg, dbeta) out:
    from those of A, the decayed q and k, W, U (= U0's) and the chunk decay exp(G_C)."""
    # Through the decayed q and k and the chunk's decay: each exp sends its value times its
    # gradient to G (and to G_C).
    t = (dk_decayed * c.k_decayed).sum(-1)
    dG = (dq_decayed * c.q_decayed).sum(-1) - t
    dG_last = t.sum(-1, keepdim=True) + d_decay * c.decay
    dq = (dq_decayed * c.eG[..., None]).sum(2)
    dk = (dk_decayed * c.e_rest[..., None]).sum(2)
    # A = Q K^T * D
    dD = dA * c.qk
    dqk = (dA * c.D).sum(2)
    dq += dqk @ c.k
    dk += dqk.mT @ c.q
    # [W | U0] = T [diag(beta exp(G)) K | diag(beta) V]
    dv_beta = c.Tinv.mT @ dU
    dk_beta_eG = c.Tinv.mT @ dW  # the gradient of diag(beta exp(G)) K
    dv = dv_beta * c.beta[..., None]
    d_beta_eG = (dk_beta_eG * c.k.unsqueeze(2)).sum(-1)
    d_beta = (dv_beta * c.v).sum(-1) + d_beta_eG * c.eG
    dG += d_beta_eG * c.beta_eG
    dk += (dk_beta_eG * c.beta_eG[..., None]).sum(2)
    # T = (I + L)^-1: dL = -T^T dT T^T, strictly lower as L is. With Y = T X for
    # X = [diag(beta exp(G)) K | diag(beta) V], dT = dY X^T, so T^T dT T^T = (T^T dY)(T X)^T
    # = [dX_K | dX_V] [W | U0]^T: two [C, C] products fewer than through dT.
    dL = (dk_beta_eG @ c.W.mT).add_(dv_beta @ U0.mT).tril_(-1).neg_()
    # L = diag(beta) K K^T * D
    d_beta += (dL * c.kk * c.D).sum(-1)
    dL *= c.beta[..., None]
    dkk = (dL * c.D).sum(2)
    dD += dL * c.kk
    dk += (dkk + dkk.mT) @ c.k
    # D_ij = exp(G_i - G_j): +z to G_i, -z to G_j; G = cumsum(g), G_C = G at the last row.
    z = dD.mul_(c.D)
    dG += z.sum(-1) - z.sum(-2)
    dG[..., -1:] += dG_last
    dg = dG.flip(-1).cumsum(-1).flip(-1)
    return dq, dk, dv, dg, d_beta


def chunk_gated_delta_rule_torch(q, k, v, g, beta, initial_state, scale, chunk=None):
    """The chunked form for a dense batch (no cu_seqlens), computed in the state's dtype.
    q, k may have H_k = H / r heads, each read by r consecutive value heads: the products of
    keys and queries alone (K K^T, Q K^T, [C, C] per chunk) are then computed once per key head
    and shared by its r value heads, and no repeated copy of q or k is made.
    Returns (o [B, T, H, V] in v's dtype, final state [B, H, K, V])."""
    dt = state_dtype(v)
    if q.shape[1] == 0:  # an empty sequence (of a packed batch, say): the state passes through
        B, _, H, Vd = v.shape
        S = q.new_zeros(B, H, k.shape[-1], Vd, dtype=dt) if initial_state is None else initial_state.to(dt)
        return v.new_zeros(v.shape), S
    if initial_state is not None:
        initial_state = initial_state.to(dt)
    chunk = chunk or (CHUNK if v.is_cuda else CPU_CHUNK)
    return _ChunkGatedDeltaRule.apply(q, k, v, g, beta, initial_state, scale, chunk)


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
