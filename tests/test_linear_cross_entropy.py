"""linear_cross_entropy: the chunked loss and its gradients equal F.cross_entropy on full logits.

The reference is built in float64 from the same inputs. Ignored rows are dropped before
chunking, so the 23 counted rows of 37 fall into ragged chunks of 8.
The Triton tests run where the kernel can: on a GPU, or in a subprocess with TRITON_INTERPRET=1.
"""

import importlib
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import ROOT, TOL, run_triton_tests_interpreted, triton_status

# The module, not the function of the same name that lowrank.kernels exports.
lce = importlib.import_module("lowrank.kernels.linear_cross_entropy")

N, H, V = 37, 24, 101
IGNORE = -100

INTERPRETED, TRITON_RUNS = triton_status("lowrank.kernels.linear_cross_entropy", "_cross_entropy_grad_kernel")
DEVICE = "cuda" if TRITON_RUNS and not INTERPRETED else "cpu"
needs_triton = pytest.mark.skipif(
    not TRITON_RUNS, reason="no GPU: test_interpreter_subprocess runs these under TRITON_INTERPRET=1"
)


def dtype_id(dtype):
    return str(dtype).removeprefix("torch.")


def make_labels():
    """Random labels with scattered ignored rows and a run of 8, which would fill a whole chunk
    if ignored rows were not dropped first: it must leave no trace (no NaN, no stray gradient)."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, V, (N,), generator=g)
    y[::5] = IGNORE
    y[8:16] = IGNORE
    return y


def make_inputs(dtype, train_weight, with_bias, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5
    b = torch.randn(V, generator=g, dtype=torch.float64) if with_bias else None
    ours = [None if t is None else t.to(device, dtype) for t in (h, w, b)]
    ours[0].requires_grad_()
    ours[1].requires_grad_(train_weight)
    if b is not None:
        ours[2].requires_grad_()
    return ours


def reference(h, w, b, y, scale):
    """F.cross_entropy on full float64 logits, from the same (possibly rounded) input values."""
    h64, w64 = (t.detach().cpu().double().requires_grad_() for t in (h, w))
    b64 = None if b is None else b.detach().cpu().double().requires_grad_()
    logits = F.linear(h64, w64, b64)
    loss = F.cross_entropy(logits, y.cpu(), ignore_index=IGNORE, reduction="sum")
    (loss * scale).backward()
    return loss.detach(), h64.grad, w64.grad, None if b is None else b64.grad


def check_against_reference(dtype, train_weight, with_bias, chunk_size, device="cpu"):
    h, w, b = make_inputs(dtype, train_weight, with_bias, device)
    y = make_labels().to(device)
    scale = 0.37  # a grad_output other than 1 checks that the backward scales
    loss, count = lce.linear_cross_entropy(h, w, y, b, chunk_size=chunk_size)
    (loss * scale).backward()

    ref_loss, ref_dh, ref_dw, ref_db = reference(h, w, b, y, scale)
    tol = TOL[dtype]
    assert loss.dtype == torch.promote_types(dtype, torch.float32)
    torch.testing.assert_close(loss.detach().cpu().double(), ref_loss, **tol)
    assert count.item() == (y != IGNORE).sum().item() and not count.requires_grad
    assert h.grad.dtype == dtype
    torch.testing.assert_close(h.grad.cpu().double(), ref_dh, **tol)
    if train_weight:
        torch.testing.assert_close(w.grad.cpu().double(), ref_dw, **tol)
    else:
        assert w.grad is None
    if with_bias:
        torch.testing.assert_close(b.grad.cpu().double(), ref_db, **tol)


# --- torch path ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("train_weight", [True, False], ids=["trained_head", "frozen_head"])
@pytest.mark.parametrize("chunk_size", [8, 1, None])
def test_matches_full_logits(monkeypatch, dtype, train_weight, chunk_size):
    monkeypatch.setenv("LOWRANK_KERNEL", "torch")
    check_against_reference(dtype, train_weight, with_bias=False, chunk_size=chunk_size)


@pytest.mark.parametrize("train_weight", [True, False], ids=["trained_head", "frozen_head"])
def test_half_head_upcast_block_by_block(monkeypatch, train_weight):
    # 24 * 4 * 10 bytes: blocks of 10 vocabulary rows (the last one short) instead of an fp32 copy of W.
    monkeypatch.setenv("LOWRANK_KERNEL", "torch")
    monkeypatch.setattr(lce, "_HEAD_BLOCK_BYTES", H * 4 * 10)
    check_against_reference(torch.bfloat16, train_weight, with_bias=True, chunk_size=8)


def test_bias(monkeypatch):
    monkeypatch.setenv("LOWRANK_KERNEL", "torch")
    check_against_reference(torch.float64, True, with_bias=True, chunk_size=8)


def test_all_masked_is_zero_not_nan(monkeypatch):
    monkeypatch.setenv("LOWRANK_KERNEL", "torch")
    h, w, _ = make_inputs(torch.float32, True, False)
    y = torch.full((N,), IGNORE)
    loss, count = lce.linear_cross_entropy(h, w, y, chunk_size=8)
    loss.backward()
    assert loss.item() == 0.0 and count.item() == 0
    assert torch.equal(h.grad, torch.zeros_like(h)) and torch.equal(w.grad, torch.zeros_like(w))


def test_tied_embedding_gradient_accumulates(monkeypatch):
    """The head weight is the embedding matrix: both uses add into the one parameter's grad."""
    monkeypatch.setenv("LOWRANK_KERNEL", "torch")
    torch.manual_seed(0)
    emb = torch.nn.Embedding(V, H, dtype=torch.float64)
    proj = torch.nn.Linear(H, H, dtype=torch.float64)
    ids, y = torch.randint(0, V, (N,)), make_labels()

    def grads(loss_fn):
        emb.zero_grad(), proj.zero_grad()
        hidden = torch.tanh(proj(emb(ids)))
        loss_fn(hidden, emb.weight, y)[0].backward()
        return emb.weight.grad.clone(), proj.weight.grad.clone()

    ours = grads(lambda h, w, y: lce.linear_cross_entropy(h, w, y, chunk_size=8))
    ref = grads(lambda h, w, y: (F.cross_entropy(h @ w.T, y, reduction="sum"),))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, **TOL[torch.float64])


def test_leading_dims_and_no_grad(monkeypatch):
    monkeypatch.setenv("LOWRANK_KERNEL", "torch")
    h, w, _ = make_inputs(torch.float64, True, False)
    y = make_labels()
    flat, _ = lce.linear_cross_entropy(h, w, y)
    flat.backward()
    grad_flat = h.grad.clone()
    h.grad = None
    batched, _ = lce.linear_cross_entropy(h[:36].reshape(4, 9, H), w, y[:36].reshape(4, 9))
    batched.backward()
    ref_loss, ref_dh, _, _ = reference(h[:36], w, None, y[:36], 1.0)
    torch.testing.assert_close(batched.detach(), ref_loss, **TOL[torch.float64])
    torch.testing.assert_close(h.grad[:36], ref_dh, **TOL[torch.float64])
    assert torch.equal(h.grad[36], torch.zeros(H, dtype=h.dtype)) and grad_flat[36].abs().sum() > 0
    with torch.no_grad():
        evaluated, _ = lce.linear_cross_entropy(h, w, y)
    assert not evaluated.requires_grad
    torch.testing.assert_close(evaluated, flat.detach(), **TOL[torch.float64])


def check_rows_against_reference(dtype, train_weight, with_bias, chunk_size, device="cpu"):
    """reduction="none": per-row losses, and gradients of sum_i g_i * loss_i with a different
    upstream g_i for every row (as a per-sequence DPO weight gives them)."""
    h, w, b = make_inputs(dtype, train_weight, with_bias, device)
    y = make_labels().to(device)
    g = torch.Generator().manual_seed(1)
    upstream = torch.rand(N, generator=g, dtype=torch.float64) * 2 - 0.5
    rows, count = lce.linear_cross_entropy(h, w, y, b, chunk_size=chunk_size, reduction="none")
    (rows * upstream.to(device, rows.dtype)).sum().backward()

    h64, w64 = (t.detach().cpu().double().requires_grad_() for t in (h, w))
    b64 = None if b is None else b.detach().cpu().double().requires_grad_()
    ref = F.cross_entropy(F.linear(h64, w64, b64), y.cpu(), ignore_index=IGNORE, reduction="none")
    (ref * upstream).sum().backward()
    tol = TOL[dtype]
    assert rows.shape == y.shape and count.item() == (y != IGNORE).sum().item()
    assert torch.equal(rows[y == IGNORE].detach().cpu(), torch.zeros(int((y == IGNORE).sum()), dtype=rows.dtype))
    torch.testing.assert_close(rows.detach().cpu().double(), ref.detach(), **tol)
    torch.testing.assert_close(h.grad.cpu().double(), h64.grad, **tol)
    if train_weight:
        torch.testing.assert_close(w.grad.cpu().double(), w64.grad, **tol)
    else:
        assert w.grad is None
    if with_bias:
        torch.testing.assert_close(b.grad.cpu().double(), b64.grad, **tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("train_weight", [True, False], ids=["trained_head", "frozen_head"])
def test_per_row_losses_match_full_logits(monkeypatch, dtype, train_weight):
    monkeypatch.setenv("LOWRANK_KERNEL", "torch")
    check_rows_against_reference(dtype, train_weight, with_bias=train_weight, chunk_size=8)


def test_per_row_losses_keep_leading_dims_and_no_grad(monkeypatch):
    monkeypatch.setenv("LOWRANK_KERNEL", "torch")
    h, w, _ = make_inputs(torch.float64, False, False)
    y = make_labels()[:36].reshape(4, 9)
    with torch.no_grad():
        rows, _ = lce.linear_cross_entropy(h[:36].reshape(4, 9, H), w, y, reduction="none")
    ref = F.cross_entropy(F.linear(h[:36].detach(), w), y.reshape(-1), ignore_index=IGNORE, reduction="none")
    assert rows.shape == (4, 9) and not rows.requires_grad
    torch.testing.assert_close(rows.reshape(-1), ref, **TOL[torch.float64])
    with pytest.raises(ValueError, match="reduction"):
        lce.linear_cross_entropy(h, w, make_labels(), reduction="mean")


def test_rejects_bad_inputs():
    h, w, _ = make_inputs(torch.float32, False, False)
    y = make_labels()
    with pytest.raises(ValueError, match=f"label {V} at position 3 is outside"):
        lce.linear_cross_entropy(h, w, torch.cat([y[:3], torch.tensor([V]), y[4:]]))
    with pytest.raises(ValueError, match="label -1 at position 0"):
        lce.linear_cross_entropy(h, w, torch.cat([torch.tensor([-1]), y[1:]]))
    with pytest.raises(ValueError, match="must match hidden"):
        lce.linear_cross_entropy(h, w, y[:-1])
    with pytest.raises(ValueError, match="weight must be"):
        lce.linear_cross_entropy(h, w[:, :-1], y)
    with pytest.raises(ValueError, match="but weight is"):
        lce.linear_cross_entropy(h, w.double(), y)


def test_works_without_triton():
    """Machines without triton (macOS, CPU-only installs) take the torch path; a fresh
    interpreter with triton made unimportable imports lowrank and runs the loss."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, lowrank\n"
        "from lowrank.kernels import linear_cross_entropy\n"
        "h = torch.randn(5, 4, requires_grad=True)\n"
        "loss, count = linear_cross_entropy(h, torch.randn(7, 4), torch.tensor([1, -100, 3, 6, 0]))\n"
        "loss.backward()\n"
        "assert count.item() == 4 and torch.isfinite(h.grad).all() and h.grad[1].eq(0).all()\n"
    )
    env = {**os.environ, "LOWRANK_KERNEL": "auto"}
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


# --- the fused step (torch twin and Triton kernel) against the math --------------------------


def check_step(step, device, ignored=True, **kw):
    g = torch.Generator().manual_seed(1)
    C = 9
    logits = 4 * torch.randn(C, V, generator=g)
    # Row 0 peaks in its first 16 columns: exp(z) overflows fp32 unless shifted by the running max.
    logits[0, :16] += 100
    y = torch.randint(0, V, (C,), generator=g)
    if ignored:
        y[[2, 5]] = IGNORE
    z64 = logits.double().requires_grad_()
    ref_loss = F.cross_entropy(z64, y, ignore_index=IGNORE, reduction="none")
    ref_loss.sum().backward()

    z = logits.to(device)
    loss_out = torch.full((C,), float("nan"), device=device)  # an unwritten row stays NaN
    step(z, y.to(device), loss_out, **kw)
    torch.testing.assert_close(loss_out.cpu().double(), ref_loss.detach(), **TOL[torch.float32])
    torch.testing.assert_close(z.cpu().double(), z64.grad, **TOL[torch.float32])


def test_torch_step_matches_cross_entropy():
    check_step(lce.cross_entropy_grad_torch_, "cpu")


def test_torch_step_of_rows_all_trained_matches_cross_entropy():
    """all_valid, as the chunked loss calls it once the ignored rows are dropped."""
    check_step(lce.cross_entropy_grad_torch_, "cpu", ignored=False, all_valid=True)


@needs_triton
@pytest.mark.parametrize("block_v", [None, 32], ids=["one_block", "ragged_blocks"])
def test_triton_step_matches_cross_entropy(block_v):
    check_step(lce.cross_entropy_grad_triton_, DEVICE, block_v=block_v)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("train_weight", [True, False], ids=["trained_head", "frozen_head"])
def test_triton_matches_full_logits(monkeypatch, dtype, train_weight):
    monkeypatch.setenv("LOWRANK_KERNEL", "triton")
    calls = []
    kernel_step = lce.cross_entropy_grad_triton_
    monkeypatch.setattr(
        lce, "cross_entropy_grad_triton_", lambda *a: calls.append(1) or kernel_step(*a)
    )
    check_against_reference(dtype, train_weight, with_bias=True, chunk_size=8, device=DEVICE)
    if dtype == torch.float32:
        check_rows_against_reference(dtype, train_weight, with_bias=True, chunk_size=8, device=DEVICE)
        calls.clear()
        check_against_reference(dtype, train_weight, with_bias=True, chunk_size=8, device=DEVICE)
    counted = (make_labels() != IGNORE).sum().item()
    assert len(calls) == -(-counted // 8)  # the kernel ran on every chunk of counted rows


def test_interpreter_subprocess():
    if TRITON_RUNS:
        pytest.skip("the Triton tests ran in this process")
    run_triton_tests_interpreted(__file__)
