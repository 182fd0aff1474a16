"""kernels/nf4.py against bitsandbytes, the oracle of the format.

Weights of odd shapes (no dimension a multiple of 64, a short last block, an odd element count)
must give bitsandbytes' packed bytes and absmax exactly; bitsandbytes' own quantised state must
dequantise to its `dequantize_4bit` weight bit for bit; the state dict must be the tensors
transformers writes. Two things about bitsandbytes 0.50's CPU build are pinned down here
(docs/quantization.md): it rounds the double-quantised absmax through a lookup table, not to the
nearest code as its reference ops do; and its AVX-512 dequantisation is wrong for in_features a
multiple of 16 but not of 64, so there the oracle is the formula code[q] * absmax.
"""

import json

import pytest
import torch

from lowrank.kernels.nf4 import (NF4Weight, block_absmax, dequantize_nf4, dynamic_code, from_bnb_state_dict,
                                 nf4_code, nf4_indices, quantize_nf4, to_bnb_state_dict)

bnb = pytest.importorskip("bitsandbytes")
F = bnb.functional

SHAPES = [(70, 100), (37, 200), (96, 136), (32, 144), (3, 7)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
AVX512 = torch.backends.cpu.get_cpu_capability() == "AVX512"


def dtype_id(dtype):
    return str(dtype).removeprefix("torch.")


def weight(shape, dtype, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def bnb_reference_nested(w):
    """bitsandbytes' double quantisation through its reference ops (backends/default/ops.py),
    which round to the nearest code as its GPU kernels do; its CPU build would take a table."""
    reference = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    _, absmax = torch.ops.bitsandbytes.quantize_4bit.default.redispatch(reference, w, 64, "nf4", torch.uint8)
    offset = absmax.mean()
    codes, nested = torch.ops.bitsandbytes.quantize_blockwise.default.redispatch(
        reference, absmax - offset, F.create_dynamic_map(signed=True), 256)
    return codes, nested, offset


def test_code_tables_are_bitsandbytes():
    assert torch.equal(nf4_code(), F.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(nf4_code(), bnb.backends.utils._get_4bit_code("nf4", torch.device("cpu")))  # its ops' table
    assert torch.equal(dynamic_code(), F.create_dynamic_map(signed=True))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_quantize_equals_bitsandbytes(shape, dtype):
    w = weight(shape, dtype)
    ours = quantize_nf4(w, double_quant=False)
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    assert ours.packed.dtype == torch.uint8 and ours.packed.shape == packed.shape == ((w.numel() + 1) // 2, 1)
    assert torch.equal(ours.packed, packed)
    assert torch.equal(ours.absmax, state.absmax)
    assert (ours.shape, ours.dtype, ours.blocksize) == (state.shape, state.dtype, state.blocksize)


@pytest.mark.parametrize("shape", SHAPES[:4] + [(512, 1024)], ids=str)
def test_double_quant_equals_bitsandbytes_nearest_rounding(shape):
    """lowrank's nested absmax: bitsandbytes' reference rounding exactly, its CPU table's within
    the table's resolution (the [512, 1024] weight has 8192 absmax, 32 nested blocks)."""
    w = weight(shape, torch.float32, seed=1)
    ours = quantize_nf4(w, double_quant=True)
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(ours.packed, packed)  # the 4-bit codes do not depend on the nested rounding
    codes, nested, offset = bnb_reference_nested(w)
    assert torch.equal(ours.absmax, codes)
    assert torch.equal(ours.nested_absmax, nested) and torch.equal(ours.nested_absmax, state.state2.absmax)
    assert ours.nested_offset == offset.item() == state.offset.item()

    # bitsandbytes' CPU table: where it picks another code, that code is at most 2^-15 (the table's
    # step over [-1, 1]) worse than the nearest. No difference at all would mean the table is gone.
    code = dynamic_code()
    _, absmax = torch.ops.bitsandbytes.quantize_4bit.default(w, 64, "nf4", torch.uint8)
    scaled = (absmax - offset) / nested.repeat_interleave(256)[: absmax.numel()]
    nearest_err = (code[ours.absmax.long()] - scaled).abs()
    table_err = (code[state.absmax.long()] - scaled).abs()
    assert (table_err - nearest_err).max() <= 2**-15
    assert (table_err >= nearest_err).all()
    if shape == (512, 1024):
        differ = (state.absmax != ours.absmax).float().mean().item()
        assert 0 < differ < 0.01, differ


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_dequantize_bitsandbytes_state(shape, dtype, double_quant):
    """bitsandbytes quantises, lowrank reads its state dict and dequantises: bit for bit its
    dequantize_4bit, except where its AVX-512 kernel is wrong; always the formula."""
    w = weight(shape, dtype, seed=2)
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    tensors = {"p.weight": packed, **{"p.weight." + k: v for k, v in state.as_dict(packed=True).items()}}
    qw = from_bnb_state_dict(tensors, "p.")
    ours = dequantize_nf4(qw)
    assert ours.dtype == dtype and ours.shape == shape
    absmax = state.absmax.float() if not double_quant else (
        F.dequantize_blockwise(state.absmax, state.state2) + state.offset)
    formula = (nf4_code()[nf4_indices(qw)] * absmax.repeat_interleave(64)[: w.numel()]).view(shape).to(dtype)
    assert torch.equal(ours, formula)
    avx512_bug = AVX512 and shape[1] % 16 == 0 and shape[1] % 64 != 0
    if not avx512_bug:
        assert torch.equal(ours, F.dequantize_4bit(packed, state, quant_type="nf4"))


@pytest.mark.parametrize("shape", [(37, 200), (3, 7), (70, 100)], ids=str)
def test_chunks_give_the_same_bytes(shape, monkeypatch):
    """Weights are (de)quantised CHUNK elements at a time; with a chunk of two blocks every chunk
    boundary, the short last block and the odd element count fall inside these small weights."""
    import lowrank.kernels.nf4 as nf4

    w = weight(shape, torch.bfloat16, seed=3)
    monkeypatch.setattr(nf4, "CHUNK", 128)
    for double_quant in (False, True):
        ours = quantize_nf4(w, double_quant=double_quant)
        packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
        assert torch.equal(ours.packed, packed)
        if not double_quant:
            assert torch.equal(ours.absmax, state.absmax)
        else:
            codes, nested, offset = bnb_reference_nested(w)
            assert torch.equal(ours.absmax, codes) and torch.equal(ours.nested_absmax, nested)
        absmax = block_absmax(ours)
        formula = nf4_code()[nf4_indices(ours)] * absmax.repeat_interleave(64)[: w.numel()]
        for dtype in (torch.float32, torch.bfloat16):
            assert torch.equal(dequantize_nf4(ours, dtype), formula.view(shape).to(dtype))


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double"])
def test_dequantize_rows_equals_those_rows_of_bitsandbytes_weight(double_quant, monkeypatch):
    """Rows of a weight (what frozen_linear dequantises at a time in fp32): 300 x 100 has 469
    blocks, so the rows cross nested blocks of 256, chunks (of two blocks here), and end on the
    short last block. Rows start on a block: every 16 rows of 100 values."""
    import lowrank.kernels.nf4 as nf4

    w = weight((300, 100), torch.bfloat16, seed=5)
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    tensors = {"p.weight": packed, **{"p.weight." + k: v for k, v in state.as_dict(packed=True).items()}}
    qw = from_bnb_state_dict(tensors, "p.")
    whole = F.dequantize_4bit(packed, state, quant_type="nf4")  # bf16, the weight's dtype
    whole32 = dequantize_nf4(qw, torch.float32)
    monkeypatch.setattr(nf4, "CHUNK", 128)
    for rows in (slice(0, 16), slice(16, 176), slice(160, 288), slice(288, 300), slice(0, 300)):
        assert torch.equal(dequantize_nf4(qw, torch.bfloat16, rows), whole[rows])
        assert torch.equal(dequantize_nf4(qw, torch.float32, rows), whole32[rows])
        # into a caller's buffer (frozen_linear reuses one for every block): every value written
        for dtype, expected in ((torch.float32, whole32[rows]), (torch.bfloat16, whole[rows])):
            buf = torch.full(expected.shape, float("nan"), dtype=dtype)
            assert dequantize_nf4(qw, rows=rows, out=buf) is buf and torch.equal(buf, expected)
    with pytest.raises(ValueError, match=r"out has shape \(16, 99\), expected a contiguous \(16, 100\)"):
        dequantize_nf4(qw, rows=slice(0, 16), out=torch.empty(16, 99))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_dequantize_own_weight_is_close(dtype):
    """The round trip: each value within half a level gap of the original (the widest gap is 0.30
    of absmax, between -1 and -0.70), and exact where the weight is a block's absmax."""
    w = weight((70, 100), dtype, seed=3)
    qw = quantize_nf4(w)
    back = dequantize_nf4(qw, torch.float32)
    scale = block_absmax(qw).repeat_interleave(64)[: w.numel()].view(w.shape)
    assert ((back - w.float()).abs() <= 0.155 * scale + 1e-2 * scale).all()
    assert dequantize_nf4(qw).dtype == dtype


def test_zero_block_and_all_zero_weight():
    w = weight((4, 64), torch.float32)
    w[1] = 0.0
    qw = quantize_nf4(w, double_quant=False)
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    assert torch.equal(qw.packed, packed) and torch.equal(qw.absmax, state.absmax)
    assert torch.equal(dequantize_nf4(qw)[1], torch.zeros(64))
    assert torch.equal(dequantize_nf4(quantize_nf4(torch.zeros(5, 9))), torch.zeros(5, 9))


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double"])
def test_state_dict_is_what_bitsandbytes_saves(double_quant):
    """Keys, dtypes, shapes and bytes (the JSON too) of a bitsandbytes Linear4bit's state dict."""
    w = weight((96, 136), torch.bfloat16, seed=4)
    layer = bnb.nn.Linear4bit(136, 96, bias=False, compute_dtype=torch.bfloat16, compress_statistics=double_quant,
                              quant_type="nf4", quant_storage=torch.uint8)
    layer.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, compress_statistics=double_quant,
                                     quant_type="nf4")
    layer = layer.to("cpu")  # quantises
    theirs = layer.state_dict(prefix="model.layers.0.mlp.up_proj.")
    ours = to_bnb_state_dict(quantize_nf4(w, double_quant=double_quant), "model.layers.0.mlp.up_proj.")
    assert list(ours) == list(theirs)
    for key, value in theirs.items():
        if double_quant and key.endswith("weight.absmax"):
            continue  # bitsandbytes' CPU table (test_double_quant_equals_bitsandbytes_nearest_rounding)
        assert ours[key].dtype == value.dtype and ours[key].shape == value.shape, key
        assert torch.equal(ours[key], value), key
    meta = json.loads(bytes(ours["model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__nf4"].tolist()))
    assert meta["shape"] == [96, 136] and meta["dtype"] == "bfloat16" and meta["blocksize"] == 64


def test_state_dict_round_trips_and_loads_into_bitsandbytes():
    w = weight((37, 200), torch.float16, seed=5)
    qw = quantize_nf4(w)
    tensors = to_bnb_state_dict(qw, "q.")
    back = from_bnb_state_dict(tensors, "q.")
    for field in ("packed", "absmax", "nested_absmax"):
        assert torch.equal(getattr(back, field), getattr(qw, field)), field
    assert (back.shape, back.dtype, back.blocksize, back.nested_offset) == (qw.shape, qw.dtype, 64, qw.nested_offset)
    state = F.QuantState.from_dict({k.removeprefix("q.weight."): v for k, v in tensors.items() if k != "q.weight"},
                                   device=torch.device("cpu"))
    assert torch.equal(F.dequantize_4bit(tensors["q.weight"], state, quant_type="nf4"), dequantize_nf4(qw))


def test_state_dict_errors_name_the_key():
    tensors = to_bnb_state_dict(quantize_nf4(weight((8, 64), torch.float32)), "m.")
    with pytest.raises(KeyError, match="m.weight.absmax: missing"):
        from_bnb_state_dict({k: v for k, v in tensors.items() if k != "m.weight.absmax"}, "m.")
    with pytest.raises(ValueError, match="m.weight.quant_map: not the NF4 levels"):
        from_bnb_state_dict({**tensors, "m.weight.quant_map": F.get_4bit_type("fp4", device="cpu")}, "m.")
    with pytest.raises(ValueError, match=r"m.weight: torch.uint8 \(100, 1\), expected uint8 \[256, 1\]"):
        from_bnb_state_dict({**tensors, "m.weight": torch.zeros(100, 1, dtype=torch.uint8)}, "m.")
    with pytest.raises(ValueError, match="blocksize 48"):
        quantize_nf4(torch.randn(4, 4), blocksize=48)


def test_nf4weight_fields():
    qw = quantize_nf4(weight((70, 100), torch.bfloat16))
    assert isinstance(qw, NF4Weight) and qw.double_quant
    assert qw.absmax.dtype == torch.uint8 and qw.absmax.shape == (110,)  # ceil(7000 / 64)
    assert qw.nested_absmax.dtype == torch.float32 and qw.nested_absmax.shape == (1,)
    plain = quantize_nf4(weight((70, 100), torch.bfloat16), double_quant=False)
    assert not plain.double_quant and plain.absmax.dtype == torch.float32
