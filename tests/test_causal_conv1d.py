"""causal_conv1d and causal_conv1d_update against the formula, a loop in float64:

    y[b, t, d] = silu(bias[d] + sum_w weight[d, w] * x[b, t - (W-1) + w, d]),  x before t=0 from the state

and against transformers' causal_conv1d_update, whose cache keeps W positions instead of W - 1.
"""

import pytest
import torch
import torch.nn.functional as F

from lowrank.kernels import causal_conv1d, causal_conv1d_update
from tests.conftest import TOL

D, W = 10, 4


def conv_formula(x, weight, bias, state):
    """The loop: x [B, T, D] float64, weight [D, W], state [B, D, W - 1]."""
    xp = torch.cat([state.transpose(1, 2), x], dim=1)  # [B, W - 1 + T, D]
    T = x.shape[1]
    y = torch.stack([(xp[:, t:t + W] * weight.T).sum(1) for t in range(T)], dim=1) if T else x
    return F.silu(y + bias), xp[:, T:].transpose(1, 2)


def make(B, T, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, D, generator=g, dtype=torch.float64), torch.randn(D, W, generator=g, dtype=torch.float64),
            torch.randn(D, generator=g, dtype=torch.float64), torch.randn(B, D, W - 1, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("T", [1, 2, 37])
def test_matches_formula_with_state_and_gradients(T):
    """T = 1 and 2 are shorter than the state: the final state is partly the initial one."""
    x, w, b, s = (t.requires_grad_() for t in make(2, T, seed=T))
    y, final = causal_conv1d(x, w[:, None, :], b, initial_state=s, output_final_state=True)  # checkpoint layout
    y_ref, final_ref = conv_formula(x, w, b, s)
    torch.testing.assert_close(y, y_ref, **TOL[torch.float64])
    torch.testing.assert_close(final, final_ref, **TOL[torch.float64])
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours = torch.autograd.grad((y * dy).sum() + final.sum(), (x, w, b, s))
    theirs = torch.autograd.grad((y_ref * dy).sum() + final_ref.sum(), (x, w, b, s))
    for a, c in zip(ours, theirs):
        torch.testing.assert_close(a, c, **TOL[torch.float64])


def test_no_state_is_zeros_and_no_activation():
    x, w, b, _ = make(1, 9, seed=1)
    y, final = causal_conv1d(x, w, None, activation=None)
    assert final is None
    ref = F.conv1d(F.pad(x.transpose(1, 2), (W - 1, 0)), w[:, None, :], groups=D).transpose(1, 2)
    torch.testing.assert_close(y, ref, **TOL[torch.float64])


def test_packed_sequences_restart_the_state():
    """cu_seqlens: each sequence (lengths 5, 2, 0, 30) as run alone from its own state."""
    x, w, b, _ = make(1, 37, seed=2)
    states = torch.randn(4, D, W - 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    cu = torch.tensor([0, 5, 7, 7, 37])
    y, final = causal_conv1d(x, w, b, initial_state=states, output_final_state=True, cu_seqlens=cu)
    assert y.shape == x.shape and final.shape == (4, D, W - 1)
    bounds = cu.tolist()
    for n, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        y_ref, final_ref = conv_formula(x[:, lo:hi], w, b, states[n:n + 1])
        torch.testing.assert_close(y[:, lo:hi], y_ref, **TOL[torch.float64])
        torch.testing.assert_close(final[n:n + 1], final_ref, **TOL[torch.float64])


def test_update_steps_equal_one_call():
    """A 20-token prefill then 6 single-token updates = one call over 26, state carried."""
    x, w, b, s = make(2, 26, seed=4)
    whole, whole_state = causal_conv1d(x, w, b, initial_state=s, output_final_state=True)
    y, state = causal_conv1d(x[:, :20], w, b, initial_state=s, output_final_state=True)
    outs = [y]
    for t in range(20, 26):
        y_t, state = causal_conv1d_update(x[:, t:t + 1], state, w, b)
        outs.append(y_t)
    torch.testing.assert_close(torch.cat(outs, dim=1), whole, **TOL[torch.float64])
    torch.testing.assert_close(state, whole_state, **TOL[torch.float64])


def test_update_matches_transformers_with_its_w_long_state():
    hf = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")
    x, w, b, _ = make(2, 3, seed=5)
    state = torch.randn(2, D, W, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    hf_state = state.clone()
    theirs = hf.causal_conv1d_update(x.transpose(1, 2), hf_state, w, b, "silu")  # updates hf_state in place
    ours, new_state = causal_conv1d_update(x, state, w, b)
    torch.testing.assert_close(ours, theirs.transpose(1, 2), **TOL[torch.float64])
    torch.testing.assert_close(new_state, hf_state, **TOL[torch.float64])


def test_shapes_are_checked():
    x, w, b, s = make(2, 5, seed=7)
    with pytest.raises(ValueError, match=r"\[D, W\] or \[D, 1, W\]"):
        causal_conv1d(x, w[:, None, None], b)
    with pytest.raises(ValueError, match=r"initial_state must be \[2, 10, 3\]"):
        causal_conv1d(x, w, b, initial_state=s[:, :, :2])
    with pytest.raises(ValueError, match=">= 3"):
        causal_conv1d_update(x[:, :1], s[:, :, :2], w, b)
    with pytest.raises(ValueError, match="activation 'gelu'"):
        causal_conv1d(x, w, b, activation="gelu")
