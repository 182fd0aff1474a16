"""LoRA on quantised base weights (kernels/lora_quantized.py, kernels/lora_nf4.py), both paths,
against `lora_linear_reference` on the dequantised weight and the dense float64 formula

    y = x @ (deq(W) + scale * B @ A).T + bias

on odd shapes (M=37, K=100, N=70: no multiple of a tile or of the 64-value quantisation block).
The Triton tests run on a GPU, or in a subprocess with TRITON_INTERPRET=1; bf16 only on a GPU
(the interpreter's bf16 tl.dot returns garbage in triton 3.9).
"""

import importlib

import pytest
import torch

from lowrank.kernels import lora_linear, lora_linear_merged, lora_linear_reference
from lowrank.kernels.int8 import quantize_int8
from lowrank.kernels.lora_quantized import lora_linear_quantized, lora_linear_quantized_torch
from lowrank.kernels.nf4 import dequantize_nf4, quantize_nf4
from tests.conftest import TOL, run_triton_tests_interpreted, triton_status

lora_quantized = importlib.import_module("lowrank.kernels.lora_quantized")
frozen_linear = importlib.import_module("lowrank.kernels.frozen_linear")

M, K, N = 37, 100, 70
# The Triton path reads whole NF4 blocks per row (in_features a multiple of the block size): its
# tests use 192, three blocks of 64, which the interpreter's K tile of 128 ends in a partial tile.
K_TRITON = 192
P_DROP = 0.25

INTERPRETED, TRITON_RUNS = triton_status("lowrank.kernels.lora_nf4", "_fwd_nf4_kernel")
lora_nf4 = importlib.import_module("lowrank.kernels.lora_nf4") if TRITON_RUNS else None
DEVICE = "cuda" if TRITON_RUNS and not INTERPRETED else "cpu"
needs_triton = pytest.mark.skipif(
    not TRITON_RUNS, reason="no GPU: test_interpreter_subprocess runs these under TRITON_INTERPRET=1"
)
FORMATS = {
    "nf4": lambda w: quantize_nf4(w, double_quant=False),
    "nf4-double": lambda w: quantize_nf4(w, double_quant=True),
    "nf4-double-bs32": lambda w: quantize_nf4(w, blocksize=32, double_quant=True),
    "int8": quantize_int8,
}


def dtype_id(dtype):
    return str(dtype).removeprefix("torch.")


def make_projection(n, r, dtype, fmt="nf4-double", bias=True, seed=0, k=K):
    """Quantised W, and bias, A, B scaled so every output and gradient is O(1..10)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / k**0.5
    b = torch.randn(n, generator=g) if bias else None
    a = torch.randn(r, k, generator=g) / k**0.5
    bb = torch.randn(n, r, generator=g) / r**0.5
    qw = (FORMATS[fmt] if isinstance(fmt, str) else fmt)(w.to(dtype)).to(DEVICE)
    return [qw] + [t.to(DEVICE, dtype).requires_grad_() if t is not None else None for t in (b, a, bb)]


def dense_reference(x, w, b, a, bb, scale, keep=None, p=0.0):
    """Float64 output and gradients of one projection with weight w (a dense tensor), on the CPU."""
    x, a, bb = (t.detach().cpu().double().requires_grad_() for t in (x, a, bb))
    w = w.detach().cpu().double()
    b = b.detach().cpu().double().requires_grad_() if b is not None else None
    if keep is None:
        y = x @ (w + scale * bb @ a).T
    else:
        y = x @ w.T + scale * ((x * keep.cpu().double() / (1 - p)) @ a.T) @ bb.T
    return (y + b if b is not None else y), (x, b, a, bb)


def assert_matches(ours, ref, dtype):
    """TOL at the reference's scale (a sum's rounding follows the size of its terms)."""
    scale = ref.detach().abs().max().clamp_min(1.0).item()
    torch.testing.assert_close(ours.detach().cpu().double() / scale, ref.detach().cpu().double() / scale, **TOL[dtype])


def grads_of(fn, x, qw, b, a, bb, scale, dy, *args):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, b, a, bb)]
    y = fn(leaves[0], qw, leaves[1], leaves[2], leaves[3], scale, *args)
    y.backward(dy)
    return [y] + [t.grad if t is not None else None for t in leaves]


# --- the torch path -------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_torch_path_matches_reference_on_dequantised_weight(monkeypatch, fmt, dtype):
    monkeypatch.setenv("LOWRANK_KERNEL", "torch")
    qw, b, a, bb = make_projection(N, 8, dtype, fmt, seed=1)
    x = torch.randn(3, M, K, generator=torch.Generator().manual_seed(1)).to(dtype)
    dy = torch.randn(3, M, N, generator=torch.Generator().manual_seed(2)).to(dtype)
    w = lora_quantized.dequantize(qw, dtype)
    ours = grads_of(lora_linear, x, qw, b, a, bb, 2.0, dy)
    ref = grads_of(lora_linear_reference, x, w, b, a, bb, 2.0, dy)
    for o, r in zip(ours, ref):
        assert_matches(o, r, dtype)
    dense, leaves = dense_reference(x, w, b, a, bb, 2.0)  # and the float64 formula
    dense.backward(dy.double())
    for o, r in zip(ours, [dense, *(t.grad for t in leaves)]):
        assert_matches(o, r, dtype)


def test_torch_path_with_dropout_equals_reference_with_the_same_mask():
    """Same seed, same mask: the torch path reorders the reference's arithmetic, in float64."""
    qw, b, a, bb = make_projection(N, 5, torch.float32, "nf4-double", seed=3)
    b, a, bb = (t.detach().double() for t in (b, a, bb))
    x = torch.randn(2, 13, K, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    dy = torch.randn(2, 13, N, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    torch.manual_seed(5)
    ours = grads_of(lora_linear_quantized_torch, x, qw, b, a, bb, 1.7, dy, P_DROP, True)
    torch.manual_seed(5)
    ref = grads_of(lora_linear_reference, x, dequantize_nf4(qw, torch.float64), b, a, bb, 1.7, dy, P_DROP, True)
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o, r, **TOL[torch.float64])


def saved_bytes(fn):
    """(bytes of every tensor autograd saves while fn runs, the largest saved numel)."""
    sizes = []

    def pack(t):
        sizes.append((t.numel() * t.element_size(), t.numel()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(s for s, _ in sizes), max(n for _, n in sizes)


@pytest.mark.parametrize("fmt", ["nf4-double", "int8"])
def test_no_weight_sized_tensor_is_saved_for_backward(fmt):
    qw, b, a, bb = make_projection(N, 8, torch.bfloat16, fmt, seed=6)
    x = torch.randn(M, K, dtype=torch.bfloat16, requires_grad=True)
    ours, ours_max = saved_bytes(lambda: lora_linear_quantized_torch(x, qw, b, a, bb, 2.0))
    w = lora_quantized.dequantize(qw, torch.bfloat16).requires_grad_(False)
    ref, ref_max = saved_bytes(lambda: lora_linear_reference(x, w, b, a, bb, 2.0))
    assert ours_max < N * K <= ref_max  # the reference keeps the dense weight (the check can fail)
    # x, A, x @ A.T and B are all that is kept, in the compute dtype (fp32 on a CPU without bf16 units)
    assert ours == (M * K + 8 * K + M * 8 + N * 8) * frozen_linear.compute_dtype(x).itemsize


def test_weight_is_dequantised_again_in_backward(monkeypatch):
    calls = []
    dequantize = frozen_linear.dequantize
    monkeypatch.setattr(frozen_linear, "dequantize",
                        lambda qw, dtype, rows=None, out=None: calls.append(dtype) or dequantize(qw, dtype, rows, out))
    qw, b, a, bb = make_projection(N, 4, torch.float32, seed=7)
    x = torch.randn(M, K, requires_grad=True)
    y = lora_linear_quantized_torch(x, qw, b, a, bb, 2.0)
    assert len(calls) == 1
    y.sum().backward()
    assert len(calls) == 2
    assert x.grad is not None and a.grad is not None and bb.grad is not None and b.grad is not None


def test_lora_linear_dispatches_quantised_weights(monkeypatch):
    monkeypatch.setenv("LOWRANK_KERNEL", "torch")
    projs = [make_projection(n, r, torch.float32, fmt, seed=i)
             for i, (n, r, fmt) in enumerate([(N, 8, "nf4-double"), (18, 4, "nf4"), (18, 1, "int8")])]
    x = torch.randn(2, 5, K)
    merged = lora_linear_merged(x, *(list(t) for t in zip(*projs)), [2.0, 0.5, 1.0])
    for y, (qw, b, a, bb), s in zip(merged, projs, [2.0, 0.5, 1.0]):
        torch.testing.assert_close(y, lora_linear(x, qw, b, a, bb, s), **TOL[torch.float32])
        torch.testing.assert_close(y, lora_linear_quantized(x, qw, b, a, bb, s), **TOL[torch.float32])
    with pytest.raises(ValueError, match=r"projection 0: lora_a has shape \(8, 99\), expected \(8, 100\)"):
        qw, b, a, bb = projs[0]
        lora_linear(x, qw, b, a[:, :99], bb, 2.0)


# --- the Triton path ------------------------------------------------------------------------


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer a kernel must write in full starts as NaN, so a skipped element fails."""
    lora_merged = importlib.import_module("lowrank.kernels.lora_merged")
    monkeypatch.setattr(lora_merged, "new_output", lambda x, *shape: x.new_full(shape, float("nan")))


@needs_triton
@pytest.mark.parametrize(
    "dtype, fmt, r, bias",
    [
        pytest.param(torch.float32, "nf4-double", 8, True, id="fp32-double-r8"),
        pytest.param(torch.float32, "nf4", 1, False, id="fp32-plain-r1-nobias"),
        pytest.param(torch.float32, "nf4-double-bs32", 4, True, id="fp32-double-blocks32-r4"),
        pytest.param(torch.float16, "nf4-double", 16, True, id="fp16-double-r16"),
    ]
    + [pytest.param(torch.bfloat16, "nf4-double", 16, True, id="bf16-double-r16")] * (DEVICE == "cuda"),
)
def test_triton_matches_torch_path(monkeypatch, poisoned, dtype, fmt, r, bias):
    qw, b, a, bb = make_projection(N, r, dtype, fmt, bias=bias, seed=r, k=K_TRITON)
    x = torch.randn(M, K_TRITON, generator=torch.Generator().manual_seed(r)).to(DEVICE, dtype)
    dy = torch.randn(M, N, generator=torch.Generator().manual_seed(r + 1)).to(DEVICE, dtype)
    monkeypatch.setenv("LOWRANK_KERNEL", "triton")
    ours = grads_of(lora_linear, x, qw, b, a, bb, 2.0, dy)
    monkeypatch.setenv("LOWRANK_KERNEL", "torch")
    ref = grads_of(lora_linear, x, qw, b, a, bb, 2.0, dy)
    for o, rr in zip(ours, ref):
        if rr is not None:
            assert_matches(o, rr, dtype)
    dense, leaves = dense_reference(x, lora_quantized.dequantize(qw, dtype), b, a, bb, 2.0)
    dense.backward(dy.cpu().double())
    for o, rr in zip(ours, [dense, *(t.grad if t is not None else None for t in leaves)]):
        if rr is not None:
            assert_matches(o, rr, dtype)


@needs_triton
def test_triton_merged_with_dropout_equals_dense_kernels(monkeypatch, poisoned):
    """Two double-quantised projections of one x in one launch, with dropout, equal the dense
    kernels on the dequantised weights: same seed, same masks, so outputs and all gradients agree."""
    monkeypatch.setenv("LOWRANK_KERNEL", "triton")
    widths, ranks, scales = (40, 18), (8, 1), (2.0, 0.5)
    projs = [make_projection(n, r, torch.float32, "nf4-double", bias=i != 1, seed=i, k=K_TRITON)
             for i, (n, r) in enumerate(zip(widths, ranks))]
    x = torch.randn(19, K_TRITON, generator=torch.Generator().manual_seed(3)).to(DEVICE).requires_grad_()
    leaves = [x] + [t for p in projs for t in p[2:]]
    torch.manual_seed(9)
    merged = lora_linear_merged(x, *(list(t) for t in zip(*projs)), list(scales), P_DROP)
    dys = [torch.randn(y.shape, generator=torch.Generator().manual_seed(i)).to(DEVICE) for i, y in enumerate(merged)]
    merged_grads = torch.autograd.grad(merged, leaves, dys)
    # the dense kernels with the dequantised weights draw the same masks from the same seed
    dense = [[lora_quantized.dequantize(p[0], torch.float32)] + p[1:] for p in projs]
    torch.manual_seed(9)
    expected = lora_linear_merged(x, *(list(t) for t in zip(*dense)), list(scales), P_DROP)
    expected_grads = torch.autograd.grad(expected, leaves, dys)
    for ours, theirs in zip([*merged, *merged_grads], [*expected, *expected_grads]):
        torch.testing.assert_close(ours, theirs, **TOL[torch.float32])


@needs_triton
def test_triton_refuses_what_it_cannot_run(monkeypatch):
    monkeypatch.setenv("LOWRANK_KERNEL", "triton")
    qw, b, a, bb = make_projection(N, 4, torch.float32, "int8")
    with pytest.raises(ValueError, match="an int8 weight"):
        lora_linear(torch.randn(M, K, device=DEVICE), qw, b, a, bb, 2.0)
    qw, b, a, bb = make_projection(N, 129, torch.float32, "nf4", k=K_TRITON)
    with pytest.raises(ValueError, match="rank 129 > 128"):
        lora_linear(torch.randn(M, K_TRITON, device=DEVICE), qw, b, a, bb, 2.0)
    qw, b, a, bb = make_projection(N, 4, torch.float32, "nf4")  # K = 100: rows end inside a block
    with pytest.raises(ValueError, match="in_features 100, not a multiple of the NF4 block size 64"):
        lora_linear(torch.randn(M, K, device=DEVICE), qw, b, a, bb, 2.0)
    qw, b, a, bb = make_projection(N, 4, torch.float32, lambda w: quantize_nf4(w, blocksize=128), k=256)
    with pytest.raises(ValueError, match="NF4 blocks of 128 values"):
        lora_linear(torch.randn(M, 256, device=DEVICE), qw, b, a, bb, 2.0)
    monkeypatch.delenv("LOWRANK_KERNEL")  # auto: such a weight takes the torch path, no error
    qw, b, a, bb = make_projection(N, 4, torch.float32, "nf4")
    x = torch.randn(M, K, device=DEVICE)
    torch.testing.assert_close(lora_linear(x, qw, b, a, bb, 2.0), lora_linear_quantized_torch(x, qw, b, a, bb, 2.0))


def test_every_gpu_config_reads_whole_nf4_blocks():
    """The W tile's K extent (BLOCK_K in both GEMMs) of every autotune config is a multiple of
    MIN_BLOCK_K, the largest block size check_supported_nf4 lets in: a config with a narrower
    tile would read a block's scale for values of the next block."""
    pytest.importorskip("triton")
    nf4_kernels = importlib.import_module("lowrank.kernels.lora_nf4")
    for tuned in (nf4_kernels._fwd_tuned, nf4_kernels._dx_tuned):
        for config in tuned.configs:
            assert config.kwargs["BLOCK_K"] % nf4_kernels.MIN_BLOCK_K == 0, config
    assert nf4_kernels.INTERPRETER_BLOCKS["BLOCK_K"] % nf4_kernels.MIN_BLOCK_K == 0
    assert K_TRITON % nf4_kernels.MIN_BLOCK_K == 0 and K_TRITON % nf4_kernels.INTERPRETER_BLOCKS["BLOCK_K"]


def test_interpreter_subprocess():
    if TRITON_RUNS:
        pytest.skip("the Triton tests ran in this process")
    run_triton_tests_interpreted(__file__)
