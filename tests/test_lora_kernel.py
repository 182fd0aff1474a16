"""lora_linear and lora_linear_merged, both paths, against the dense float64 formula

    y = x @ (W + scale * B @ A).T + bias      (with dropout: x @ W.T + bias + scale * (x*keep/(1-p)) @ A.T @ B.T)

on odd shapes (M=37, K=100, N=70: no multiple of any tile) with autograd's float64 gradients.
The Triton tests run where the kernels can: on a GPU, or in a subprocess with TRITON_INTERPRET=1
(Triton reads it once, when triton is first imported). Under the interpreter tl.dot on bf16
returns garbage (triton 3.9.0), so bf16 kernels are checked only on a GPU.
"""

import importlib
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from lowrank.kernels import lora_linear, lora_linear_merged
from tests.conftest import ROOT, TOL, run_triton_tests_interpreted, triton_status

lora = importlib.import_module("lowrank.kernels.lora")

M, K, N = 37, 100, 70
P_DROP = 0.25  # a multiple of 2^-16: the kernels' p_eff is exactly p

INTERPRETED, TRITON_RUNS = triton_status("lowrank.kernels.lora_merged", "_fwd_kernel")
lora_merged = importlib.import_module("lowrank.kernels.lora_merged") if TRITON_RUNS else None
DEVICE = "cuda" if TRITON_RUNS and not INTERPRETED else "cpu"
needs_triton = pytest.mark.skipif(
    not TRITON_RUNS, reason="no GPU: test_interpreter_subprocess runs these under TRITON_INTERPRET=1"
)


def dtype_id(dtype):
    return str(dtype).removeprefix("torch.")


def make_projection(n, r, dtype, bias=True, seed=0, k=K):
    """W, bias, A, B scaled so every output and gradient is O(1..10): tolerances stay meaningful."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g, dtype=torch.float64) / k**0.5
    b = torch.randn(n, generator=g, dtype=torch.float64) if bias else None
    a = torch.randn(r, k, generator=g, dtype=torch.float64) / k**0.5
    bb = torch.randn(n, r, generator=g, dtype=torch.float64) / r**0.5
    return [t.to(DEVICE, dtype) if t is not None else None for t in (w, b, a, bb)]


def dense_reference(x, w, b, a, bb, scale, keep=None, p=0.0):
    """Float64 output and gradients of one projection, on the CPU; `keep` is the dropout mask, if any."""
    x, w, a, bb = (t.detach().cpu().double().requires_grad_() for t in (x, w, a, bb))
    b = b.detach().cpu().double().requires_grad_() if b is not None else None
    if keep is None:
        y = x @ (w + scale * bb @ a).T
    else:
        y = x @ w.T + scale * ((x * keep.cpu().double() / (1 - p)) @ a.T) @ bb.T
    return (y + b if b is not None else y), (x, w, b, a, bb)


def assert_matches(ours, ref, dtype):
    """TOL at the reference's scale: a sum's rounding error follows the size of its terms (dA sums
    37 products of size ~5), not of the result, which may be near zero."""
    scale = ref.detach().abs().max().clamp_min(1.0).item()
    torch.testing.assert_close(ours.detach().cpu().double() / scale, ref.detach().cpu() / scale, **TOL[dtype])


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer a kernel must write in full starts as NaN, so a skipped element fails."""
    monkeypatch.setattr(lora_merged, "new_output", lambda x, *shape: x.new_full(shape, float("nan")))


# --- the torch path -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=dtype_id)
def test_torch_path_matches_dense_formula(monkeypatch, dtype):
    monkeypatch.setenv("LOWRANK_KERNEL", "torch")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, M, K, generator=g).to(dtype).requires_grad_()
    w, b, a, bb = (t.cpu() for t in make_projection(N, 8, dtype, seed=1))
    a.requires_grad_(), bb.requires_grad_()
    y = lora_linear(x, w, b, a, bb, 2.0)
    ref, (x64, _, _, a64, bb64) = dense_reference(x, w, b, a, bb, 2.0)
    dy = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    y.backward(dy.to(dtype))
    ref.backward(dy)
    for ours, expected in [(y, ref), (x.grad, x64.grad), (a.grad, a64.grad), (bb.grad, bb64.grad)]:
        assert_matches(ours, expected, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_torch_merged_matches_formula(monkeypatch, dtype):
    """lora_linear_merged on the torch path (one GEMM for all the x @ A^T products): every
    projection's output, and the gradients of x (summed over the projections), A and B, as the
    float64 formula; ranks and scales differ, the middle projection has no bias."""
    monkeypatch.setenv("LOWRANK_KERNEL", "torch")
    widths, ranks, scales = (70, 18, 5), (8, 4, 1), (2.0, 0.5, 1.5)
    projs = [[t.cpu() if t is not None else None for t in make_projection(n, r, dtype, bias=i != 1, seed=20 + i)]
             for i, (n, r) in enumerate(zip(widths, ranks))]
    for _, _, a, bb in projs:
        a.requires_grad_(), bb.requires_grad_()
    g = torch.Generator().manual_seed(21)
    x = torch.randn(2, 19, K, generator=g).to(dtype).requires_grad_()
    ys = lora_linear_merged(x, *(list(t) for t in zip(*projs)), list(scales))
    refs = [dense_reference(x, *p, s) for p, s in zip(projs, scales)]
    dys = [torch.randn(r.shape, generator=g, dtype=torch.float64) for r, _ in refs]
    torch.autograd.backward(ys, [dy.to(dtype) for dy in dys])
    torch.autograd.backward([r for r, _ in refs], dys)
    assert_matches(x.grad, sum(leaves[0].grad for _, leaves in refs), dtype)
    for y, (ref, leaves), (_, _, a, bb) in zip(ys, refs, projs):
        assert y.dtype == dtype
        for ours, expected in [(y, ref), (a.grad, leaves[3].grad), (bb.grad, leaves[4].grad)]:
            assert_matches(ours, expected, dtype)


def test_eval_mode_and_zero_p_have_no_dropout(monkeypatch):
    monkeypatch.setenv("LOWRANK_KERNEL", "torch")
    x = torch.randn(M, K)
    w, b, a, bb = (t.cpu() for t in make_projection(N, 4, torch.float32))
    plain = lora_linear(x, w, b, a, bb, 2.0, dropout_p=0.0)
    torch.testing.assert_close(lora_linear(x, w, b, a, bb, 2.0, 0.5, training=False), plain, rtol=0, atol=0)
    assert not torch.equal(lora_linear(x, w, b, a, bb, 2.0, 0.5, training=True), plain)


# --- dispatch -------------------------------------------------------------------------------


def test_dispatch_follows_lowrank_kernel(monkeypatch):
    x = torch.randn(M, K)
    w, b, a, bb = (t.cpu() for t in make_projection(N, 4, torch.float32))
    calls = []
    torch_path = lora.lora_linear_torch
    monkeypatch.setattr(lora, "lora_linear_torch", lambda *args: calls.append(1) or torch_path(*args))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for choice in ("auto", "torch"):  # CPU tensors: the torch path either way
        monkeypatch.setenv("LOWRANK_KERNEL", choice)
        lora_linear(x, w, b, a, bb, 2.0)
    assert len(calls) == 2
    monkeypatch.setenv("LOWRANK_KERNEL", "triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        lora_linear(x, w, b, a, bb, 2.0)
    monkeypatch.setenv("LOWRANK_KERNEL", "cuda")
    with pytest.raises(ValueError, match="expected one of"):
        lora_linear(x, w, b, a, bb, 2.0)


@pytest.mark.skipif(not (TRITON_RUNS and DEVICE == "cuda"), reason="auto picks Triton only for CUDA tensors")
def test_auto_takes_triton_for_cuda_tensors(monkeypatch):
    monkeypatch.setenv("LOWRANK_KERNEL", "auto")
    calls = []
    fused = lora_merged.lora_projections
    monkeypatch.setattr(lora_merged, "lora_projections", lambda *args: calls.append(1) or fused(*args))
    w, b, a, bb = make_projection(N, 4, torch.float32)
    lora_linear(torch.randn(M, K, device=DEVICE), w, b, a, bb, 2.0)
    assert calls == [1]


def test_shapes_are_checked():
    x = torch.randn(M, K)
    w, b, a, bb = (t.cpu() for t in make_projection(N, 4, torch.float32))
    with pytest.raises(ValueError, match=r"projection 0: lora_b has shape \(70, 3\), expected \(70, 4\)"):
        lora_linear(x, w, b, a, bb[:, :3], 2.0)
    with pytest.raises(ValueError, match="projection 1: bias"):
        lora_linear_merged(x, [w, w], [b, b[:-1]], [a, a], [bb, bb], [1.0, 1.0])


def test_works_without_triton():
    """With triton made unimportable, lowrank imports and both entry points take the reference."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from lowrank.kernels import lora_linear, lora_linear_merged, lora_linear_reference\n"
        "x, w, a, b = torch.randn(5, 8), torch.randn(6, 8), torch.randn(2, 8), torch.randn(6, 2)\n"
        "torch.testing.assert_close(lora_linear(x, w, None, a, b, 0.5), lora_linear_reference(x, w, None, a, b, 0.5))\n"
        "q, k = lora_linear_merged(x, [w, w[:3]], [None, None], [a, a], [b, b[:3]], [0.5, 0.5])\n"
        "assert q.shape == (5, 6) and k.shape == (5, 3)\n"
    )
    env = {**os.environ, "LOWRANK_KERNEL": "auto"}
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


# --- the Triton path ------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize(
    "dtype, r, bias, lead, train_w",
    [
        pytest.param(torch.float32, 8, True, (M,), False, id="fp32-r8"),
        pytest.param(torch.float32, 1, False, (2, 3, 7), True, id="fp32-r1-nobias-batchdims-trainedW"),
        pytest.param(torch.float16, 16, True, (M,), False, id="fp16-r16"),
    ]
    + [pytest.param(torch.bfloat16, 16, True, (M,), False, id="bf16-r16")] * (DEVICE == "cuda"),
)
def test_triton_matches_dense_formula(monkeypatch, poisoned, dtype, r, bias, lead, train_w):
    monkeypatch.setenv("LOWRANK_KERNEL", "triton")
    g = torch.Generator().manual_seed(r)
    x = torch.randn(*lead, K, generator=g).to(DEVICE, dtype).requires_grad_()
    w, b, a, bb = make_projection(N, r, dtype, bias=bias, seed=r)
    for t in (w if train_w else None, b, a, bb):
        if t is not None:
            t.requires_grad_()
    y = lora_linear(x, w, b, a, bb, 2.0)
    ref, leaves = dense_reference(x, w, b, a, bb, 2.0)
    dy = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    y.backward(dy.to(DEVICE, dtype))
    ref.backward(dy)
    assert y.shape == (*lead, N)
    assert_matches(y, ref, dtype)
    for ours, ref_leaf in zip((x, w, b, a, bb), leaves):
        if ours is not None and ours.requires_grad:
            assert_matches(ours.grad, ref_leaf.grad, dtype)
    if not train_w:
        assert w.grad is None


@needs_triton
def test_triton_merged_equals_separate_calls(monkeypatch, poisoned):
    """q/k/v-like: one wide N, two narrow ones of odd width and different ranks; k without bias."""
    monkeypatch.setenv("LOWRANK_KERNEL", "triton")
    dtype, widths, ranks, scales = torch.float32, (70, 18, 18), (8, 4, 1), (2.0, 0.5, 1.0)
    projs = [make_projection(n, r, dtype, bias=i != 1, seed=i) for i, (n, r) in enumerate(zip(widths, ranks))]
    for _, _, a, bb in projs:
        a.requires_grad_(), bb.requires_grad_()
    x = torch.randn(2, 19, K, generator=torch.Generator().manual_seed(3)).to(DEVICE).requires_grad_()
    merged = lora_linear_merged(x, *(list(t) for t in zip(*projs)), list(scales))
    dys = [torch.randn(y.shape, generator=torch.Generator().manual_seed(i)).to(DEVICE) for i, y in enumerate(merged)]
    merged_grads = torch.autograd.grad(merged, [x] + [t for p in projs for t in p[2:]], dys)
    separate = [lora_linear(x, *p, s) for p, s in zip(projs, scales)]
    separate_grads = torch.autograd.grad(separate, [x] + [t for p in projs for t in p[2:]], dys)
    for ours, theirs in zip([*merged, *merged_grads], [*separate, *separate_grads]):
        torch.testing.assert_close(ours, theirs, **TOL[dtype])
    for y, p, s in zip(merged, projs, scales):  # and both equal the formula
        assert_matches(y, dense_reference(x, *p, s)[0], dtype)


def recover_masks(x, n_projections, seed):
    """Dropout masks the kernels draw after torch.manual_seed(seed), one per projection: with W = 0
    and A = B = I the output is x * keep / (1 - p), so keep = (output != 0)."""
    eye, zero = torch.eye(K, device=DEVICE), torch.zeros(K, K, device=DEVICE)
    torch.manual_seed(seed)
    outs = lora_linear_merged(x, [zero] * n_projections, [None] * n_projections, [eye] * n_projections,
                              [eye] * n_projections, [1.0] * n_projections, P_DROP)
    keeps = [y != 0 for y in outs]
    for y, keep in zip(outs, keeps):  # kept elements are scaled by exactly 1/(1-p)
        torch.testing.assert_close(y[keep], x[keep] / (1 - P_DROP), **TOL[torch.float32])
    return keeps


@needs_triton
def test_triton_dropout_mask_is_regenerated_in_backward(monkeypatch, poisoned):
    """Forward and backward must use one mask per projection, drawn from the seed: recover the masks,
    then check output and all gradients against the float64 formula with those masks."""
    monkeypatch.setenv("LOWRANK_KERNEL", "triton")
    dtype = torch.float32
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    keep_q, keep_v = recover_masks(x, 2, seed=11)
    for keep in (keep_q, keep_v):
        assert abs(keep.float().mean().item() - (1 - P_DROP)) < 0.03  # 3700 draws: 4 sigma
    # Independent masks per projection: they agree with probability p^2 + (1-p)^2, not 1.
    assert abs((keep_q == keep_v).float().mean().item() - (P_DROP**2 + (1 - P_DROP) ** 2)) < 0.04
    torch.manual_seed(11)  # a single call draws the same mask as the first projection
    single = lora_linear(x, torch.zeros(K, K, device=DEVICE), None, torch.eye(K, device=DEVICE),
                         torch.eye(K, device=DEVICE), 1.0, P_DROP)
    assert torch.equal(single != 0, keep_q)

    projs = [make_projection(N, 8, dtype, seed=5), make_projection(18, 4, dtype, seed=6)]
    for _, _, a, bb in projs:
        a.requires_grad_(), bb.requires_grad_()
    x.requires_grad_()
    torch.manual_seed(11)
    ys = lora_linear_merged(x, *(list(t) for t in zip(*projs)), [2.0, 0.5], P_DROP)
    dys = [torch.randn(y.shape, generator=torch.Generator().manual_seed(7 + i)).to(DEVICE) for i, y in enumerate(ys)]
    torch.autograd.backward(ys, dys)
    refs = [dense_reference(x, *p, s, keep, P_DROP) for p, s, keep in zip(projs, (2.0, 0.5), (keep_q, keep_v))]
    torch.autograd.backward([r for r, _ in refs], [dy.cpu().double() for dy in dys])
    x_grad = sum(leaves[0].grad for _, leaves in refs)  # x feeds both projections
    assert_matches(x.grad, x_grad, dtype)
    for y, (ref, leaves), (_, _, a, bb) in zip(ys, refs, projs):
        assert_matches(y, ref, dtype)
        assert_matches(a.grad, leaves[3].grad, dtype)
        assert_matches(bb.grad, leaves[4].grad, dtype)


@needs_triton
def test_triton_eval_mode_has_no_dropout(monkeypatch, poisoned):
    monkeypatch.setenv("LOWRANK_KERNEL", "triton")
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    w, b, a, bb = make_projection(N, 8, torch.float32, seed=8)
    y = lora_linear(x, w, b, a, bb, 2.0, dropout_p=0.5, training=False)
    assert_matches(y, dense_reference(x, w, b, a, bb, 2.0)[0], torch.float32)


@needs_triton
def test_triton_refuses_what_it_cannot_run(monkeypatch):
    """Forced to Triton, operands the kernels do not take raise and say why (auto would fall back)."""
    monkeypatch.setenv("LOWRANK_KERNEL", "triton")
    w, b, a, bb = make_projection(N, 4, torch.float64)
    with pytest.raises(ValueError, match="do not take dtype torch.float64"):
        lora_linear(torch.randn(M, K, dtype=torch.float64, device=DEVICE), w, b, a, bb, 2.0)
    if DEVICE == "cpu":
        w, b, a, bb = make_projection(N, 4, torch.bfloat16)
        with pytest.raises(ValueError, match="bf16 under Triton's interpreter"):
            lora_linear(torch.randn(M, K, dtype=torch.bfloat16), w, b, a, bb, 2.0)
    w, b, a, bb = make_projection(N, 129, torch.float32)
    with pytest.raises(ValueError, match="rank 129 > 128"):
        lora_linear(torch.randn(M, K, device=DEVICE), w, b, a, bb, 2.0)


def test_interpreter_subprocess():
    if TRITON_RUNS:
        pytest.skip("the Triton tests ran in this process")
    run_triton_tests_interpreted(__file__)


def test_benchmark_quick_mode_runs(tmp_path):
    """The benchmark script itself, in its CPU mode on tiny shapes (its numbers are not checked)."""
    # By path: the repository root is not on sys.path under plain `pytest` (importlib mode).
    spec = importlib.util.spec_from_file_location("lora_matmul", ROOT / "benchmarks" / "lora_matmul.py")
    lora_matmul = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lora_matmul)

    out = tmp_path / "quick.json"
    lora_matmul.main(["--quick", "--m", "32", "--reps", "1", "--proj", "k", "down", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    # per (dropout, backward): k, down and merged qkv
    assert [row["proj"] for row in rows] == ["k", "down", "qkv"] * 4
    assert {(row["dropout"], row["backward"]) for row in rows} == {(0.0, False), (0.0, True), (0.1, False), (0.1, True)}
    for row in rows:
        assert set(row["ms"]) >= {"base", "peft", "lowrank"} and all(ms > 0 for ms in row["ms"].values())
        assert row["flops"] > row["base_flops"] > 0
    tiny = lora_matmul.MODELS["tiny"]
    assert rows[2]["N"] == (tiny["heads"] + 2 * tiny["kv_heads"]) * tiny["head_dim"]

    # --nf4: the QLoRA table, one row per projection and per merged group, forward and f+b
    out = tmp_path / "nf4.json"
    lora_matmul.main(["--nf4", "--quick", "--m", "33", "--reps", "1", "--proj", "v", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(row["proj"], row["backward"]) for row in rows] == [
        (proj, bwd) for bwd in (False, True) for proj in ("v", "q_k_v", "gate_up")]
    for row in rows:
        assert set(row["ms"]) == {"base", "dequant", "dequant_gemm", "lowrank"}
        assert all(ms > 0 for ms in row["ms"].values())
    assert rows[2]["N"] == 2 * tiny["intermediate"] and rows[2]["K"] == tiny["hidden"]


def test_torch_path_equals_the_reference_with_the_same_dropout_mask():
    """lora_linear_torch reorders the reference's arithmetic; the same seed draws the same mask,
    so outputs and all three gradients agree to rounding (float64, so rounding is ~1e-15; the
    fp32 torch path is checked against the dense formula with the other paths)."""
    dtype = torch.float64
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 13, K, dtype=dtype, generator=g)
    w, b = torch.randn(N, K, dtype=dtype, generator=g) / K**0.5, torch.randn(N, dtype=dtype, generator=g)
    a, bb = torch.randn(5, K, dtype=dtype, generator=g) / K**0.5, torch.randn(N, 5, dtype=dtype, generator=g) / 5**0.5
    grads = []
    for fn in (lora.lora_linear_torch, lora.lora_linear_reference):
        xs, As, Bs = (t.clone().requires_grad_() for t in (x, a, bb))
        torch.manual_seed(3)
        y = fn(xs, w, b, As, Bs, 1.7, 0.3, True)
        y.backward(torch.cos(y.detach()))
        grads.append((y, xs.grad, As.grad, Bs.grad))
    for ours, ref in zip(*grads):
        torch.testing.assert_close(ours, ref, **TOL[dtype])
