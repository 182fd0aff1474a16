"""The gated delta rule: Gated DeltaNet's linear attention (Qwen3-Next, Qwen3.5), FLA's API.

Per head, with a state S [K, V] kept in fp32 whatever the inputs' dtype, for t = 1..T:

    S   = exp(g_t) * S                          g_t <= 0: the log-decay
    u_t = beta_t * (v_t - S^T k_t)              the delta: what S mispredicts for k_t
    S   = S + k_t u_t^T
    o_t = scale * S^T q_t

`gated_delta_rule_reference` runs exactly that, a token at a time: the spec and the test oracle.

The chunked form (chunks of C = 64, 32 in the torch path on a CPU; "WY representation" + "UT
transform", FLA's design).
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
  - `chunk_gated_delta_rule_torch`: the chunked form in torch, an autograd Function with a
    written-out backward (the CPU path and the fallback);
  - the Triton kernels for CUDA tensors (`dispatch.use_triton`), forward and backward: the autograd
    Function in `gated_delta_rule_triton.py`, its kernels in `_triton_fwd.py` and `_triton_bwd.py`.
`cu_seqlens` (packed sequences, B = 1) is handled once, here, for every path: see `varlen.py`.
`gated_delta_rule_step` is the recurrent form for decoding a few tokens onto a state.
"""

from .dispatch import kernel_choice, use_triton
from .gated_delta_rule_torch import (CHUNK, check_args, chunk_gated_delta_rule_torch,  # noqa: F401
                                     gated_delta_rule_reference, gated_delta_rule_step, l2norm, per_value_head,
                                     state_dtype)
from .varlen import Packing


def chunk_gated_delta_rule(q, k, v, g, beta, initial_state=None, output_final_state=False,
                           cu_seqlens=None, scale=None, use_qk_l2norm_in_kernel=False):
    """Gated DeltaNet's linear attention over whole sequences (training, prefill).

    q, k: [B, T, H_k, K] with H = r * H_k (value head j reads key head j // r, as Qwen3.5's
    grouped value heads; r = 1 is plain); v: [B, T, H, V]; g: [B, T, H] log-decay (<= 0);
    beta: [B, T, H] in (0, 1).
    initial_state: [B, H, K, V] ([N, H, K, V] with cu_seqlens) or None for zeros.
    cu_seqlens: int [N + 1] sequence starts of a packed batch (B = 1); the state restarts at each.
    scale: defaults to K ** -0.5. use_qk_l2norm_in_kernel: l2-normalise q and k (eps 1e-6) first.
    Returns (o [B, T, H, V] in v's dtype, final state [B or N, H, K, V] fp32, or None).
    Differentiable in q, k, v, g, beta and initial_state.
    """
    check_args(q, k, v, g, beta, initial_state, cu_seqlens)
    scale = k.shape[-1] ** -0.5 if scale is None else float(scale)
    if use_qk_l2norm_in_kernel:  # in fp32 (kept so), before the chunks: autograd carries its gradient
        q, k = l2norm(q.to(state_dtype(v))), l2norm(k.to(state_dtype(v)))
    packing = Packing(cu_seqlens, q.shape[1]) if cu_seqlens is not None else None
    if packing is not None:
        q, k, v, g, beta = (packing.pad(x) for x in (q, k, v, g, beta))
    triton = q.shape[1] > 0 and use_triton(v)  # T = 0: nothing to launch
    if triton:  # the kernels take one q/k head per value head; the torch path shares them
        q, k = per_value_head(q, v), per_value_head(k, v)
    if triton and _takes_triton(q, k, v, g, beta, initial_state):
        from .gated_delta_rule_triton import chunk_gated_delta_rule_triton

        o, S = chunk_gated_delta_rule_triton(q, k, v, g, beta, initial_state, scale)
    else:
        o, S = chunk_gated_delta_rule_torch(q, k, v, g, beta, initial_state, scale)
    if packing is not None:
        o = packing.unpad(o)
    return o, (S if output_final_state else None)


def _takes_triton(q, k, v, g, beta, initial_state) -> bool:
    from .gated_delta_rule_triton import check_supported  # imports triton: only reached when it imports

    why = check_supported(q, k, v, g, beta, initial_state)
    if why is None:
        return True
    if kernel_choice() == "triton":
        raise ValueError(f"LOWRANK_KERNEL=triton, but the gated delta rule kernels do not take {why}")
    return False  # auto: the torch path serves what the kernels do not
