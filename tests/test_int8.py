"""kernels/int8.py against bitsandbytes' Int8Params / Linear8bitLt, the oracle of the format."""

import pytest
import torch

from lowrank.kernels.int8 import Int8Weight, dequantize_int8, from_bnb_state_dict, quantize_int8, to_bnb_state_dict

bnb = pytest.importorskip("bitsandbytes")
F = bnb.functional


def dtype_id(dtype):
    return str(dtype).removeprefix("torch.")


def weight(shape, dtype, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def bnb_int8(w):
    """What bitsandbytes stores for w: Int8Params quantises when moved to a device."""
    p = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False).to("cpu")
    return p.data, p.SCB


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("shape", [(70, 100), (37, 200), (96, 136)], ids=str)
def test_quantize_equals_bitsandbytes(shape, dtype):
    w = weight(shape, dtype)
    qw = quantize_int8(w)
    codes, scb = bnb_int8(w)
    assert qw.weight.dtype == torch.int8 and qw.weight.shape == shape
    assert qw.scb.dtype == torch.float32 and qw.scb.shape == (shape[0],)
    assert torch.equal(qw.weight, codes)
    assert torch.equal(qw.scb, scb)
    codes, scb, _ = F.int8_vectorwise_quant(w.to(torch.float16))
    assert torch.equal(qw.weight, codes) and torch.equal(qw.scb, scb)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_id)
def test_dequantize_is_int8_times_scb_over_127(dtype):
    w = weight((70, 100), dtype, seed=1)
    qw = quantize_int8(w)
    ours = dequantize_int8(qw, torch.float32)
    assert torch.equal(ours, F.int8_vectorwise_dequant(qw.weight, qw.scb))  # bitsandbytes' and transformers' dequant
    exact = qw.weight.double() * qw.scb.double()[:, None] / 127
    # three roundings of at most 2^-24 each: W8 * SCB, fp32(1/127), their product
    torch.testing.assert_close(ours.double(), exact, rtol=3 * 2**-24, atol=0)
    assert torch.equal(dequantize_int8(qw), ours.to(dtype))
    # the round trip: within half a step (SCB / 254) of the fp16 weight
    assert ((ours - w.to(torch.float16).float()).abs() <= qw.scb[:, None] / 254 * (1 + 1e-5)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_row_blocks_give_the_same_codes(dtype, monkeypatch):
    """Weights are (de)quantised a block of rows at a time: with blocks of 3 rows (the last short)
    the codes, SCB and weight equal bitsandbytes' and the formula."""
    import lowrank.kernels.int8 as int8

    w = weight((37, 50), dtype, seed=4)
    monkeypatch.setattr(int8, "CHUNK", 150)
    qw = quantize_int8(w)
    codes, scb = bnb_int8(w)
    assert torch.equal(qw.weight, codes) and torch.equal(qw.scb, scb)
    assert torch.equal(dequantize_int8(qw, torch.float32), F.int8_vectorwise_dequant(qw.weight, qw.scb))
    assert torch.equal(dequantize_int8(qw), F.int8_vectorwise_dequant(qw.weight, qw.scb).to(dtype))


def test_zero_row():
    w = weight((4, 33), torch.float32)
    w[2] = 0.0
    qw = quantize_int8(w)
    assert qw.scb[2] == 0 and torch.equal(qw.weight[2], torch.zeros(33, dtype=torch.int8))
    assert torch.equal(dequantize_int8(qw)[2], torch.zeros(33))
    codes, scb = bnb_int8(w)
    assert torch.equal(qw.weight[[0, 1, 3]], codes[[0, 1, 3]]) and torch.equal(qw.scb, scb)


def test_state_dict_is_what_linear8bitlt_saves():
    w = weight((96, 136), torch.float16, seed=2)
    layer = bnb.nn.Linear8bitLt(136, 96, bias=False, has_fp16_weights=False)
    layer.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
    theirs = layer.to("cpu").state_dict(prefix="model.layers.1.self_attn.o_proj.")
    ours = to_bnb_state_dict(quantize_int8(w), "model.layers.1.self_attn.o_proj.")
    assert list(ours) == list(theirs)
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype and ours[key].shape == value.shape and torch.equal(ours[key], value), key
    back = from_bnb_state_dict(theirs, "model.layers.1.self_attn.o_proj.", dtype=torch.bfloat16)
    assert isinstance(back, Int8Weight) and back.dtype == torch.bfloat16
    assert torch.equal(back.weight, ours["model.layers.1.self_attn.o_proj.weight"])


def test_state_dict_errors_name_the_key():
    tensors = to_bnb_state_dict(quantize_int8(weight((8, 16), torch.float32)), "m.")
    with pytest.raises(KeyError, match="m.SCB: missing"):
        from_bnb_state_dict({"m.weight": tensors["m.weight"]}, "m.")
    with pytest.raises(ValueError, match="m.weight_format: 1"):
        from_bnb_state_dict({**tensors, "m.weight_format": torch.tensor(1, dtype=torch.uint8)}, "m.")
    with pytest.raises(ValueError, match=r"SCB \(7,\)"):
        from_bnb_state_dict({**tensors, "m.SCB": tensors["m.SCB"][:7]}, "m.")
