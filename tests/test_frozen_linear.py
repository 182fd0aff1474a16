"""kernels/frozen_linear.py: the frozen base matmul of the torch LoRA / QLoRA paths.

Against the float64 formula y = x @ W.T + bias (W the dense weight, or the quantised one
dequantised), forward and dx / dbias:
  - made a block of rows at a time (CHUNK shrunk so odd-shaped weights take several blocks,
    NF4 blocks starting inside a 64-value quantisation block are impossible by construction),
  - and the compute-dtype rule: on a CPU without bf16 units a bf16 call is done in fp32 and
    rounded once, so it is within one bf16 rounding of the formula (tighter than a bf16 GEMM's
    several roundings); elsewhere it is the bf16 computation.
"""

import importlib

import pytest
import torch

from lowrank.kernels.int8 import quantize_int8
from lowrank.kernels.lora_torch import lora_linear_torch
from lowrank.kernels.nf4 import quantize_nf4

frozen_linear = importlib.import_module("lowrank.kernels.frozen_linear")

M, K, N, R = 23, 100, 77, 5
FORMATS = {
    "dense": lambda w: w,
    "nf4": lambda w: quantize_nf4(w, double_quant=False),
    "nf4-double": quantize_nf4,
    "int8": quantize_int8,
}


def make(dtype, fmt, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(N, K, generator=g) / K**0.5).to(dtype)
    weight = FORMATS[fmt](w)
    dense = w if fmt == "dense" else frozen_linear.dequantize(weight, torch.float64)
    x = torch.randn(3, M, K, generator=g).to(dtype)
    bias = torch.randn(N, generator=g).to(dtype)
    dy = torch.randn(3, M, N, generator=g).to(dtype)
    return weight, dense.double(), x, bias, dy


def formula(x, dense, bias, dy):
    x64, b64 = x.double().requires_grad_(), bias.double().requires_grad_()
    y = x64 @ dense.T + b64
    y.backward(dy.double())
    return y, x64.grad, b64.grad


def assert_rounded_once(ours, exact):
    """One rounding to bf16 of an fp32 result: within half a bf16 ulp (2^-8 relative) of the
    float64 formula, plus fp32's error. A bf16 GEMM rounding its product, then again after the
    bias or the low-rank sum, misses this on some elements."""
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.double(), exact.detach().double(), atol=1e-6, rtol=2**-8 * 1.001)


def run(x, weight, bias, dy, dtype=None):
    x, bias = x.clone().requires_grad_(), bias.clone().requires_grad_()
    y = frozen_linear.frozen_linear(x, weight, bias, dtype)
    y.backward(dy.to(y.dtype))
    return y, x.grad, bias.grad


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_blocks_of_rows_equal_the_formula(fmt, weight_dtype, monkeypatch):
    """fp32 compute (an fp32 model, or bf16 upcast on the CPU) a block of rows at a time."""
    weight, dense, x, bias, dy = make(weight_dtype, fmt, seed=1)
    monkeypatch.setattr(frozen_linear, "CHUNK", 1500)  # 15 rows of 100, rounded to 16 for NF4
    blocks = frozen_linear.row_blocks(weight)
    assert len(blocks) >= 4 and blocks[-1].stop == N
    calls, buffers = [], set()
    rows_of = frozen_linear.weight_rows

    def weight_rows(w, d, rows=None, out=None):
        calls.append(rows)
        buffers.add(out.data_ptr())  # every block is made into a buffer the call passes
        return rows_of(w, d, rows, out)

    monkeypatch.setattr(frozen_linear, "weight_rows", weight_rows)
    x32, bias32, dy32 = x.float(), bias.float(), dy.float()
    ours = run(x32, weight, bias32, dy32, torch.float32)
    expected_calls = len(blocks) * 2 if not (fmt == "dense" and weight_dtype == torch.float32) else 0
    assert len(calls) == expected_calls  # a dense fp32 W goes through F.linear whole
    assert len(buffers) <= 2  # one buffer for all the forward's blocks, one for the backward's
    for o, r in zip(ours, formula(x32, dense, bias32, dy32)):
        assert o.dtype == torch.float32
        torch.testing.assert_close(o.double(), r, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("fmt", ["dense", "nf4-double", "int8"])
def test_bf16_on_a_cpu_without_bf16_units_is_computed_in_fp32(fmt, monkeypatch):
    weight, dense, x, bias, dy = make(torch.bfloat16, fmt, seed=2)
    monkeypatch.setattr(frozen_linear, "half_gemm_is_slow", lambda x: True)
    ours = [t.to(torch.bfloat16) for t in run(x, weight, bias, dy)]  # frozen_linear returns fp32
    y, dx, dbias = formula(x, dense, bias, dy)
    for o, r in zip(ours, (y, dx, dbias)):
        assert_rounded_once(o, r)


def test_the_frozen_backward_keeps_fp32_under_autocast(monkeypatch):
    """Its dx is fp32 even when backward is called inside autocast (which would recast its matmul;
    lowrank's loop calls backward outside it, as PyTorch advises)."""
    weight, dense, x, bias, dy = make(torch.bfloat16, "int8", seed=7)
    monkeypatch.setattr(frozen_linear, "_has", lambda cpu, probe: False)
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = frozen_linear.frozen_linear(x, weight, None)
        y.backward(dy.float())
    assert_rounded_once(x.grad, dy.double() @ dense)


@pytest.mark.parametrize("autocast", ["none", "bf16-x", "fp32-x"])
def test_bf16_lora_on_a_cpu_without_bf16_units_rounds_once(autocast, monkeypatch):
    """The whole torch LoRA linear: fp32 inside, bf16 out; also under the training step's bf16
    autocast (which must not cast the fp32 matmuls back), for bf16 and fp32 activations."""
    weight, dense, x, bias, dy = make(torch.bfloat16, "nf4-double", seed=3)
    g = torch.Generator().manual_seed(4)
    a = (torch.randn(R, K, generator=g) / K**0.5).to(torch.bfloat16)
    b = torch.randn(N, R, generator=g).to(torch.bfloat16)
    monkeypatch.setattr(frozen_linear, "_has", lambda cpu, probe: False)  # a CPU without bf16 units
    leaves = [t.clone().requires_grad_() for t in (x.float() if autocast == "fp32-x" else x, a, b)]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast != "none"):
        y = lora_linear_torch(leaves[0], weight, bias, leaves[1], leaves[2], 1.5)
    assert y.dtype == torch.bfloat16
    y.backward(dy)
    ref = [t.double().requires_grad_() for t in (x, a, b)]
    y64 = ref[0] @ (dense + 1.5 * ref[2] @ ref[1]).T + bias.double()
    y64.backward(dy.double())
    assert_rounded_once(y, y64)
    for o, r in zip(leaves, ref):
        assert_rounded_once(o.grad.to(torch.bfloat16), r.grad)  # an fp32 x's dx is fp32: rounded here


def test_bf16_elsewhere_is_computed_in_bf16(monkeypatch):
    weight, dense, x, bias, dy = make(torch.bfloat16, "nf4", seed=5)
    monkeypatch.setattr(frozen_linear, "half_gemm_is_slow", lambda x: False)
    assert frozen_linear.compute_dtype(x) == torch.bfloat16
    y, dx, dbias = run(x, weight, bias, dy)
    assert y.dtype == torch.bfloat16
    expected = torch.nn.functional.linear(x, frozen_linear.dequantize(weight, torch.bfloat16), bias)
    assert torch.equal(y, expected)


def test_the_rule_itself():
    cpu_bf16 = torch.ones(2, dtype=torch.bfloat16)
    assert not frozen_linear.half_gemm_is_slow(torch.ones(2))  # fp32 is never upcast
    assert not frozen_linear.half_gemm_is_slow(torch.ones(2, dtype=torch.float64))
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or \
        getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    assert frozen_linear.half_gemm_is_slow(cpu_bf16) == (not probe)


def test_a_weight_that_wants_its_gradient_gets_it():
    """A dense W with requires_grad (not a LoRA base, but frozen_linear is public): autograd's dW."""
    g = torch.Generator().manual_seed(6)
    w = torch.randn(N, K, generator=g, dtype=torch.bfloat16).requires_grad_()
    x = torch.randn(M, K, generator=g, dtype=torch.bfloat16)
    frozen_linear.frozen_linear(x, w, None, torch.float32).sum().backward()
    torch.testing.assert_close(w.grad.double(), x.double().sum(0).expand(N, K), atol=1e-6, rtol=2**-8)


def test_nf4_rows_must_start_on_a_block():
    weight = quantize_nf4(torch.randn(N, K))
    with pytest.raises(ValueError, match="inside a block"):
        frozen_linear.dequantize(weight, torch.float32, slice(1, 5))  # 100 values into a 64-value block
