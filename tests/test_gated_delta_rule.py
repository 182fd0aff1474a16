"""chunk_gated_delta_rule, both paths, against the recurrence run in float64

    S = exp(g_t) S;  u_t = beta_t (v_t - S^T k_t);  S = S + k_t u_t^T;  o_t = scale S^T q_t

on odd shapes (T = 1, 37, 130: no multiple of the chunk, 32 on the CPU and 64 on a GPU;
K = 24, V = 40: no power of two), with autograd's float64 gradients of q, k, v, g, beta and the
initial state. The Triton tests run on a GPU, or in a subprocess with TRITON_INTERPRET=1 (triton
reads it once, at import); under the interpreter tl.dot on bf16 is garbage (triton 3.9.0), so bf16
only runs on a GPU.
"""

import importlib
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from lowrank.kernels import chunk_gated_delta_rule, gated_delta_rule_reference, gated_delta_rule_step
from tests.conftest import ROOT, TOL, run_triton_tests_interpreted, triton_status

gdr = importlib.import_module("lowrank.kernels.gated_delta_rule")

H, K, V = 3, 24, 40
INTERPRETED, TRITON_RUNS = triton_status("lowrank.kernels.gated_delta_rule_triton_fwd", "_wy_kernel")
gdr_triton = importlib.import_module("lowrank.kernels.gated_delta_rule_triton") if TRITON_RUNS else None
gdr_triton_fwd = importlib.import_module("lowrank.kernels.gated_delta_rule_triton_fwd") if TRITON_RUNS else None
DEVICE = "cuda" if TRITON_RUNS and not INTERPRETED else "cpu"
needs_triton = pytest.mark.skipif(
    not TRITON_RUNS, reason="no GPU: test_interpreter_subprocess runs these under TRITON_INTERPRET=1"
)
NAMES = ("q", "k", "v", "g", "beta", "initial_state")


def dtype_id(dtype):
    return str(dtype).removeprefix("torch.")


def make_inputs(B, T, seed, with_state=True, normalised=True, n_states=None, heads=H, key_heads=None):
    """float64 q, k, v, g, beta, initial_state as a Qwen3.5 layer makes them: unit-norm keys
    (the layer l2-normalises them; unnormalised keys make the delta rule diverge), beta a sigmoid,
    g = -exp(A_log) * softplus(a + dt_bias) between about -3 and 0. Nothing is zero.
    heads: value heads; key_heads: q and k's, heads / r for grouped value heads (default: heads)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    H = heads
    q, k = randn(B, T, key_heads or H, K), randn(B, T, key_heads or H, K)
    if normalised:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    v = randn(B, T, H, V)
    g = -torch.exp(randn(H) * 0.5 - 1.0) * F.softplus(randn(B, T, H))
    beta = torch.sigmoid(randn(B, T, H))
    state = randn(n_states or B, H, K, V) * 0.5 if with_state else None
    return [q, k, v, g, beta, state]


def cast(inputs, dtype, device="cpu", grad=True):
    """Leaves of the given dtype (the state stays fp32 unless the inputs are float64)."""
    out = []
    for name, t in zip(NAMES, inputs):
        if t is None:
            out.append(None)
            continue
        dt = dtype if name != "initial_state" else torch.promote_types(dtype, torch.float32)
        out.append(t.detach().to(device, dt).requires_grad_(grad))
    return out


def run_with_grads(fn, inputs, dy, ds, **kwargs):
    """(o, final_state, grads of the inputs that are tensors) for d(sum(o * dy) + sum(S * ds))."""
    o, S = fn(*inputs[:5], initial_state=inputs[5], output_final_state=True, **kwargs)
    loss = (o * dy.to(o)).sum() + (S * ds.to(S)).sum()
    leaves = [t for t in inputs if t is not None]
    return o, S, torch.autograd.grad(loss, leaves)


def assert_matches(ours, ref, dtype, what=""):
    """TOL at the reference's scale: rounding follows the size of the terms, not of the result."""
    scale = max(ref.detach().abs().max().item(), 1.0) if ref.numel() else 1.0
    torch.testing.assert_close(ours.detach().cpu().double() / scale, ref.detach().cpu().double() / scale,
                               **TOL[dtype], msg=lambda m: f"{what}: {m}")


def check_against_recurrence(fn, B, T, dtype, with_state, seed, device="cpu", **kwargs):
    inputs = make_inputs(B, T, seed, with_state)
    gen = torch.Generator().manual_seed(seed + 100)
    dy = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    ds = torch.randn(B, H, K, V, generator=gen, dtype=torch.float64)
    ref = run_with_grads(gated_delta_rule_reference, cast(inputs, torch.float64), dy, ds, **kwargs)
    ours = run_with_grads(fn, cast(inputs, dtype, device), dy.to(device), ds.to(device), **kwargs)
    assert ours[0].dtype == dtype and ours[1].dtype == torch.promote_types(dtype, torch.float32)
    assert ours[0].shape == (B, T, H, V) and ours[1].shape == (B, H, K, V)
    names = [n for n, t in zip(NAMES, inputs) if t is not None]
    for what, a, b in [("o", ours[0], ref[0]), ("final_state", ours[1], ref[1]),
                       *((f"d{n}", a, b) for n, a, b in zip(names, ours[2], ref[2]))]:
        assert_matches(a, b, dtype, what)


# --- the chunked torch path ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("T, with_state", [(1, True), (37, False), (130, True)])
def test_torch_chunked_matches_recurrence(monkeypatch, dtype, T, with_state):
    monkeypatch.setenv("LOWRANK_KERNEL", "torch")
    check_against_recurrence(chunk_gated_delta_rule, 2, T, dtype, with_state, seed=T)


def test_torch_chunked_matches_transformers():
    """transformers' torch_chunk_gated_delta_rule (its fallback when fla is missing), fp32."""
    hf = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")
    q, k, v, g, beta, state = cast(make_inputs(2, 100, seed=5), torch.float32, grad=False)
    ours = chunk_gated_delta_rule(q, k, v, g, beta, state, output_final_state=True,
                                  use_qk_l2norm_in_kernel=True)
    theirs = hf.torch_chunk_gated_delta_rule(q, k, v, g, beta, initial_state=state, output_final_state=True,
                                             use_qk_l2norm_in_kernel=True)
    for a, b in zip(ours, theirs):
        assert_matches(a, b, torch.float32)


def test_chunk_size_does_not_change_the_answer():
    """The chunked form at C = 16, 32 and 64 (130 = 8 chunks + 2, 4 + 2, 2 + 2) and the recurrence."""
    q, k, v, g, beta, state = cast(make_inputs(1, 130, seed=6), torch.float64, grad=False)
    ref = gated_delta_rule_reference(q, k, v, g, beta, state, True)
    for chunk in (16, 32, 64):
        o, S = gdr.chunk_gated_delta_rule_torch(q, k, v, g, beta, state, K**-0.5, chunk=chunk)
        assert_matches(o, ref[0], torch.float64)
        assert_matches(S, ref[1], torch.float64)


@pytest.mark.parametrize("used", ["o", "final_state"])
def test_torch_chunked_gradients_of_one_output(monkeypatch, used):
    """A loss of o alone (the model's: the final state is not used, its gradient is None) or of
    the final state alone (o's gradient None): the written-out backward's two one-sided cases."""
    monkeypatch.setenv("LOWRANK_KERNEL", "torch")
    inputs = make_inputs(2, 70, seed=30)
    gen = torch.Generator().manual_seed(31)
    dy, ds = torch.randn(2, 70, H, V, generator=gen, dtype=torch.float64), torch.randn(2, H, K, V, generator=gen,
                                                                                        dtype=torch.float64)
    grads = []
    for fn, dtype in ((chunk_gated_delta_rule, torch.float32), (gated_delta_rule_reference, torch.float64)):
        leaves = cast(inputs, dtype)
        o, S = fn(*leaves[:5], initial_state=leaves[5], output_final_state=True)
        loss = (o * dy.to(o)).sum() if used == "o" else (S * ds.to(S)).sum()
        grads.append(torch.autograd.grad(loss, leaves, materialize_grads=True))  # q does not reach S
    for name, a, b in zip(NAMES, *grads):
        assert_matches(a, b, torch.float32, f"d{name}")


def repeated_heads(fn):
    """fn with q and k repeated to one head per value head first (value head j reads key head
    j // r, as transformers' repeat_interleave): the oracle for grouped key heads, by autograd
    through the repeat (the gradient of a key head sums its r value heads')."""

    def call(q, k, v, *args, **kwargs):
        r = v.shape[2] // q.shape[2]
        return fn(q.repeat_interleave(r, dim=2), k.repeat_interleave(r, dim=2), v, *args, **kwargs)

    return call


GROUPED = dict(heads=6, key_heads=3)  # value heads 2i, 2i + 1 read key head i (tiling would read i % 3)


def _check_grouped(monkeypatch, path, dtype, T, with_state, l2norm, cu_seqlens=None):
    """3 key heads for 6 value heads: as the float64 recurrence on repeated q, k, forward and the
    gradients of q and k (3 heads each), v, g, beta and the initial state."""
    device = on_path(monkeypatch, path)
    n = 1 if cu_seqlens is None else len(cu_seqlens) - 1
    inputs = make_inputs(1, T, seed=20 + T, with_state=with_state, normalised=not l2norm, n_states=n, **GROUPED)
    gen = torch.Generator().manual_seed(21 + T)
    Hv = GROUPED["heads"]
    dy, ds = torch.randn(1, T, Hv, V, generator=gen, dtype=torch.float64), torch.randn(n, Hv, K, V, generator=gen,
                                                                                        dtype=torch.float64)
    kw = dict(use_qk_l2norm_in_kernel=l2norm)
    ours = run_with_grads(chunk_gated_delta_rule, cast(inputs, dtype, device), dy.to(device), ds.to(device),
                          cu_seqlens=None if cu_seqlens is None else cu_seqlens.to(device), **kw)
    ref = run_with_grads(repeated_heads(gated_delta_rule_reference), cast(inputs, torch.float64), dy, ds,
                         cu_seqlens=cu_seqlens, **kw)
    assert ours[0].shape == (1, T, Hv, V) and ours[2][0].shape == (1, T, GROUPED["key_heads"], K)
    names = [n for n, t in zip(NAMES, inputs) if t is not None]
    for what, a, b in [("o", ours[0], ref[0]), ("final_state", ours[1], ref[1]),
                       *((f"d{n}", a, b) for n, a, b in zip(names, ours[2], ref[2]))]:
        assert_matches(a, b, dtype, what)


@pytest.mark.parametrize("dtype, T, with_state, l2norm", [
    (torch.float64, 1, True, False), (torch.float32, 37, False, True), (torch.float64, 130, True, True),
    (torch.float32, 130, True, False)], ids=["fp64-T1", "fp32-T37-nostate-l2norm", "fp64-T130-l2norm", "fp32-T130"])
def test_grouped_key_heads_match_recurrence_of_repeated_heads(monkeypatch, dtype, T, with_state, l2norm):
    _check_grouped(monkeypatch, "torch", dtype, T, with_state, l2norm)


def test_grouped_key_heads_packed(monkeypatch):
    _check_grouped(monkeypatch, "torch", torch.float32, 101, True, True, cu_seqlens=torch.tensor([0, 37, 101]))


def test_grouped_key_heads_decode_step():
    """gated_delta_rule_step on grouped key heads = the chunked call over the whole."""
    q, k, v, g, beta, state = cast(make_inputs(1, 42, seed=22, **GROUPED), torch.float32, grad=False)
    whole = chunk_gated_delta_rule(q, k, v, g, beta, state, True)
    o, S = chunk_gated_delta_rule(*(x[:, :40] for x in (q, k, v, g, beta)), state, True)
    o_steps = [o]
    for t in (40, 41):
        o_t, S = gated_delta_rule_step(*(x[:, t:t + 1] for x in (q, k, v, g, beta)), S)
        o_steps.append(o_t)
    assert_matches(torch.cat(o_steps, dim=1), whole[0], torch.float32)
    assert_matches(S, whole[1], torch.float32)


# --- the contract, checked on each path (the Triton twins are below) --------------------------


def on_path(monkeypatch, path):
    """LOWRANK_KERNEL for the path; the device its tensors go on."""
    monkeypatch.setenv("LOWRANK_KERNEL", path)
    return DEVICE if path == "triton" else "cpu"


def test_packed_sequences_equal_separate_calls(monkeypatch):
    _check_packed(monkeypatch, "torch")


def _check_packed(monkeypatch, path):
    """cu_seqlens: each packed sequence (lengths 37, 0, 64, 29; each with its own initial state)
    equals running it alone, and no state leaks across a boundary; gradients as the recurrence's."""
    device = on_path(monkeypatch, path)
    dtype = torch.float32
    cu = torch.tensor([0, 37, 37, 101, 130], device=device, dtype=torch.int32)
    inputs = make_inputs(1, 130, seed=7, n_states=4)
    gen = torch.Generator().manual_seed(8)
    dy, ds = torch.randn(1, 130, H, V, generator=gen, dtype=torch.float64), torch.randn(4, H, K, V, generator=gen,
                                                                                         dtype=torch.float64)
    packed = run_with_grads(chunk_gated_delta_rule, cast(inputs, dtype, device), dy.to(device), ds.to(device),
                            cu_seqlens=cu)
    ref = run_with_grads(gated_delta_rule_reference, cast(inputs, torch.float64), dy, ds, cu_seqlens=cu.cpu())
    assert packed[1].shape == (4, H, K, V)
    for a, b in zip([packed[0], packed[1], *packed[2]], [ref[0], ref[1], *ref[2]]):
        assert_matches(a, b, dtype)
    bounds = cu.tolist()
    leaves = cast(inputs, dtype, device, grad=False)
    for n, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        alone = chunk_gated_delta_rule(*(x[:, lo:hi] for x in leaves[:5]), leaves[5][n:n + 1], True)
        assert_matches(packed[0][:, lo:hi], alone[0], dtype)
        assert_matches(packed[1][n:n + 1], alone[1], dtype)
    # No leak: changing the first sequence changes nothing after it.
    changed = [x.clone() for x in leaves[:5]]
    changed[2][:, :37] += 1.0
    o2, S2 = chunk_gated_delta_rule(*changed, leaves[5], True, cu_seqlens=cu)
    torch.testing.assert_close(o2[:, 37:], packed[0][:, 37:].detach(), rtol=0, atol=0)
    torch.testing.assert_close(S2[1:], packed[1][1:].detach(), rtol=0, atol=0)
    assert not torch.equal(S2[0], packed[1][0].detach())


def test_state_carried_across_two_calls(monkeypatch):
    _check_two_calls(monkeypatch, "torch")


def _check_two_calls(monkeypatch, path):
    """130 tokens in one call = 70 tokens, then 60 more from the first call's final state."""
    device = on_path(monkeypatch, path)
    q, k, v, g, beta, state = cast(make_inputs(1, 130, seed=9), torch.float32, device, grad=False)
    whole = chunk_gated_delta_rule(q, k, v, g, beta, state, True)
    first = chunk_gated_delta_rule(*(x[:, :70] for x in (q, k, v, g, beta)), state, True)
    second = chunk_gated_delta_rule(*(x[:, 70:] for x in (q, k, v, g, beta)), first[1], True)
    assert_matches(torch.cat([first[0], second[0]], dim=1), whole[0], torch.float32)
    assert_matches(second[1], whole[1], torch.float32)


def test_l2norm_in_kernel(monkeypatch):
    _check_l2norm(monkeypatch, "torch")


def _check_l2norm(monkeypatch, path):
    """Unnormalised q, k with use_qk_l2norm_in_kernel: as the recurrence with the option (float64,
    gradients through the norm included), and as calling with q, k normalised beforehand."""
    device = on_path(monkeypatch, path)
    inputs = make_inputs(1, 37, seed=10, normalised=False)
    gen = torch.Generator().manual_seed(11)
    dy, ds = torch.randn(1, 37, H, V, generator=gen, dtype=torch.float64), torch.randn(1, H, K, V, generator=gen,
                                                                                        dtype=torch.float64)
    ours = run_with_grads(chunk_gated_delta_rule, cast(inputs, torch.float32, device), dy.to(device), ds.to(device),
                          use_qk_l2norm_in_kernel=True, scale=0.3)
    ref = run_with_grads(gated_delta_rule_reference, cast(inputs, torch.float64), dy, ds,
                         use_qk_l2norm_in_kernel=True, scale=0.3)
    for a, b in zip([ours[0], ours[1], *ours[2]], [ref[0], ref[1], *ref[2]]):
        assert_matches(a, b, torch.float32)
    q, k, v, g, beta, state = cast(inputs, torch.float32, device, grad=False)
    eps = 1e-6
    qn, kn = (x / torch.sqrt((x * x).sum(-1, keepdim=True) + eps) for x in (q, k))
    plain = chunk_gated_delta_rule(qn, kn, v, g, beta, state, True, scale=0.3)
    assert_matches(ours[0], plain[0], torch.float32)


def test_step_decodes_like_one_long_call():
    """A 40-token prefill, then 5 tokens one gated_delta_rule_step at a time = one call over 45."""
    q, k, v, g, beta, state = cast(make_inputs(2, 45, seed=12), torch.float32, grad=False)
    whole = chunk_gated_delta_rule(q, k, v, g, beta, state, True)
    o, S = chunk_gated_delta_rule(*(x[:, :40] for x in (q, k, v, g, beta)), state, True)
    outs = [o]
    for t in range(40, 45):
        o_t, S = gated_delta_rule_step(*(x[:, t:t + 1] for x in (q, k, v, g, beta)), S)
        assert o_t.shape == (2, 1, H, V) and S.dtype == torch.float32
        outs.append(o_t)
    assert_matches(torch.cat(outs, dim=1), whole[0], torch.float32)
    assert_matches(S, whole[1], torch.float32)


def test_bf16_inputs_keep_an_fp32_state():
    q, k, v, g, beta, state = cast(make_inputs(1, 37, seed=13), torch.bfloat16, grad=False)
    o, S = chunk_gated_delta_rule(q, k, v, g, beta, state, True)
    assert o.dtype == torch.bfloat16 and S.dtype == torch.float32
    ref = gated_delta_rule_reference(*cast(make_inputs(1, 37, seed=13), torch.float64, grad=False), True)
    assert_matches(o, ref[0], torch.bfloat16)
    assert_matches(S, ref[1], torch.bfloat16)
    assert chunk_gated_delta_rule(q, k, v, g, beta)[1] is None


def test_shapes_are_checked():
    q, k, v, g, beta, state = cast(make_inputs(2, 5, seed=14), torch.float32, grad=False)
    with pytest.raises(ValueError, match=r"v must be \[B, T, H, V\]"):
        chunk_gated_delta_rule(q, k, v[:, :4], g, beta)
    with pytest.raises(ValueError, match="H a multiple of q and k's 2 heads"):
        chunk_gated_delta_rule(q[:, :, :2], k[:, :, :2], v, g, beta)
    with pytest.raises(ValueError, match=r"beta must be \[B, T, H\] = \[2, 5, 3\]"):
        chunk_gated_delta_rule(q, k, v, g, beta[..., None])
    with pytest.raises(ValueError, match=r"initial_state must be \[2, 3, 24, 40\]"):
        chunk_gated_delta_rule(q, k, v, g, beta, state[:1])
    with pytest.raises(ValueError, match="B = 1"):
        chunk_gated_delta_rule(q, k, v, g, beta, cu_seqlens=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="rise from 0 to T=5"):
        chunk_gated_delta_rule(q[:1], k[:1], v[:1], g[:1], beta[:1], cu_seqlens=torch.tensor([0, 3, 4]))


def test_works_without_triton():
    """With triton made unimportable, the kernels import and the entry point takes the torch path."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from lowrank.kernels import chunk_gated_delta_rule, gated_delta_rule_reference\n"
        "q, k, v = torch.randn(1, 9, 2, 8), torch.randn(1, 9, 2, 8) / 3, torch.randn(1, 9, 2, 4)\n"
        "g, b = -torch.rand(1, 9, 2), torch.rand(1, 9, 2)\n"
        "torch.testing.assert_close(chunk_gated_delta_rule(q, k, v, g, b)[0], gated_delta_rule_reference(q, k, v, g, b)[0])\n"
    )
    env = {**os.environ, "LOWRANK_KERNEL": "auto"}
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_benchmark_quick_mode_runs(tmp_path):
    """The benchmark script itself, on the CPU at a tiny size (its numbers are not checked)."""
    spec = importlib.util.spec_from_file_location("gdr_bench", ROOT / "benchmarks" / "gated_delta_rule.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "quick.json"
    bench.main(["--quick", "--t", "20", "--reps", "1", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert {row["impl"] for row in rows} >= {"recurrence", "torch-chunked"}
    assert all(row["ms"] > 0 for row in rows)
    # the recurrence checks the chunked reference the benchmark compares every kernel with
    assert all(0 <= row["rel_err"] < 1e-5 for row in rows)


# --- the Triton path ------------------------------------------------------------------------


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer a kernel must write in full starts as NaN, so a skipped element fails."""
    monkeypatch.setattr(gdr_triton_fwd, "new_output",
                        lambda x, *shape, dtype=torch.float32: x.new_full(shape, float("nan"), dtype=dtype))


@needs_triton
@pytest.mark.parametrize(
    "dtype, T, with_state",
    [
        pytest.param(torch.float32, 1, True, id="fp32-T1"),
        pytest.param(torch.float32, 37, False, id="fp32-T37-nostate"),
        pytest.param(torch.float32, 130, True, id="fp32-T130"),
        pytest.param(torch.float16, 70, True, id="fp16-T70"),
    ]
    + [pytest.param(torch.bfloat16, 130, True, id="bf16-T130")] * (DEVICE == "cuda"),
)
def test_triton_matches_recurrence(monkeypatch, poisoned, dtype, T, with_state):
    monkeypatch.setenv("LOWRANK_KERNEL", "triton")
    check_against_recurrence(chunk_gated_delta_rule, 1, T, dtype, with_state, seed=T, device=DEVICE)


@needs_triton
def test_triton_backward_is_triton(monkeypatch, poisoned):
    """The gradients come from the Triton backward: with the torch chunked form and its
    triangular solve made to raise, fp32 T = 70 (a chunk and 6 rows) with an initial state, as
    float64 autograd of the recurrence, for a loss on the output alone (no final state asked
    for, so no gradient reaches it) and on the final state alone (none reaches the output)."""
    monkeypatch.setenv("LOWRANK_KERNEL", "triton")

    def refuse(*args, **kwargs):
        raise AssertionError("the Triton path ran torch's chunked form")

    for module in (gdr, gdr_triton, importlib.import_module("lowrank.kernels.gated_delta_rule_torch")):
        monkeypatch.setattr(module, "chunk_gated_delta_rule_torch", refuse, raising=False)
    monkeypatch.setattr(torch.linalg, "solve_triangular", refuse)
    inputs = make_inputs(1, 70, seed=16)
    gen = torch.Generator().manual_seed(17)
    dy, ds = torch.randn(1, 70, H, V, generator=gen, dtype=torch.float64), torch.randn(1, H, K, V, generator=gen,
                                                                                        dtype=torch.float64)
    for final_state in (False, True):
        ours = cast(inputs, torch.float32, DEVICE)
        o, S = chunk_gated_delta_rule(*ours[:5], initial_state=ours[5], output_final_state=final_state)
        ((S * ds.to(S)).sum() if final_state else (o * dy.to(o)).sum()).backward()
        leaves = cast(inputs, torch.float64)
        o_ref, S_ref = gated_delta_rule_reference(*leaves[:5], initial_state=leaves[5], output_final_state=True)
        ref_grads = torch.autograd.grad((S_ref * ds).sum() if final_state else (o_ref * dy).sum(), leaves,
                                        allow_unused=True)  # q does not reach the state
        ref_grads = [torch.zeros_like(t) if d is None else d for t, d in zip(leaves, ref_grads)]
        assert (S is not None) == final_state
        assert_matches(o, o_ref, torch.float32, "o")
        for name, t, ref_grad in zip(NAMES, ours, ref_grads):
            assert_matches(t.grad, ref_grad, torch.float32, f"d{name} (loss on {'S' if final_state else 'o'})")


@needs_triton
def test_triton_packed_sequences_equal_separate_calls(monkeypatch, poisoned):
    _check_packed(monkeypatch, "triton")


@needs_triton
def test_triton_state_carried_across_two_calls(monkeypatch, poisoned):
    _check_two_calls(monkeypatch, "triton")


@needs_triton
def test_triton_l2norm_in_kernel(monkeypatch, poisoned):
    _check_l2norm(monkeypatch, "triton")


@needs_triton
def test_triton_grouped_key_heads(monkeypatch, poisoned):
    _check_grouped(monkeypatch, "triton", torch.float32, 70, True, True)


@needs_triton
def test_triton_refuses_what_it_cannot_run(monkeypatch):
    """Forced to Triton, operands the kernels do not take raise and say why (auto falls back)."""
    monkeypatch.setenv("LOWRANK_KERNEL", "triton")
    q, k, v, g, beta, _ = cast(make_inputs(1, 5, seed=15), torch.float64, DEVICE, grad=False)
    with pytest.raises(ValueError, match="do not take dtype torch.float64"):
        chunk_gated_delta_rule(q, k, v, g, beta)
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="bf16 under Triton's interpreter"):
            chunk_gated_delta_rule(*(x.bfloat16() for x in (q, k, v)), g, beta)
    wide = torch.zeros(1, 5, H, 300, device=DEVICE)
    with pytest.raises(ValueError, match="head dims K = 300"):
        chunk_gated_delta_rule(wide, wide, v.float(), g.float(), beta.float())


def test_interpreter_subprocess():
    if TRITON_RUNS:
        pytest.skip("the Triton tests ran in this process")
    run_triton_tests_interpreted(__file__)
