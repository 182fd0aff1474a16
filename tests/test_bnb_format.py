"""Folders of transformers + bitsandbytes (models/bnb_format.py and the quantised half of
checkpoint.py), against transformers + bitsandbytes 0.50 on the CPU as the oracle.

The quantised folders are made the way users make them: transformers' from_pretrained with a
BitsAndBytesConfig quantises a full-precision folder (on the CPU here), save_pretrained writes it.
Sizes: Qwen2.5-7B's structure (q/k/v biases, untied head) shrunk to 448 wide, 192 intermediate:
every in_features a multiple of 64 (bitsandbytes' AVX-512 dequantisation mis-indexes other
multiples of 16, see docs/quantization.md).

Tolerances: 4-bit logits against transformers + bitsandbytes within the fp32 row of TOL (both
dequantise to the same fp32 weight and run the same matmuls; equal to the bit on this machine).
8-bit: bitsandbytes' matmul splits outlier columns and runs the rest in int8 by design, so the
weights are compared exactly and the logits against a full-precision model holding them.
"""

import json

import pytest
import torch

from lowrank.errors import CheckpointError
from lowrank.kernels.nf4 import NESTED_BLOCKSIZE, dynamic_code
from lowrank.models import read_config
from lowrank.models.checkpoint import load_model, save_model
from lowrank.models.quantized import QuantizedLinear, quantized_modules
from tests.conftest import TOL, make_bnb_checkpoint, make_hf_checkpoint, real_config, shrink

F32 = TOL[torch.float32]


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dense")
    make_hf_checkpoint(folder, shrink(real_config("Qwen2.5-7B-Instruct"), intermediate=192), seed=5)
    return folder


@pytest.fixture(scope="module")
def nf4_dq(dense, tmp_path_factory):
    folder = tmp_path_factory.mktemp("nf4-dq")
    return folder, make_bnb_checkpoint(dense, folder, load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True)


@pytest.fixture(scope="module")
def nf4_plain(dense, tmp_path_factory):
    folder = tmp_path_factory.mktemp("nf4")
    return folder, make_bnb_checkpoint(dense, folder, load_in_4bit=True, bnb_4bit_quant_type="nf4")


@pytest.fixture(scope="module")
def int8_folder(dense, tmp_path_factory):
    folder = tmp_path_factory.mktemp("int8")
    return folder, make_bnb_checkpoint(dense, folder, load_in_8bit=True)


def tokens(seed=0, shape=(3, 11)):
    return torch.randint(0, 257, shape, generator=torch.Generator().manual_seed(seed))


PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@pytest.mark.parametrize("which", ["nf4_dq", "nf4_plain"])
def test_nf4_folder_gives_the_logits_of_transformers_bitsandbytes(which, request):
    folder, hf = request.getfixturevalue(which)
    model = load_model(folder).eval()
    paths = {p for p, _ in quantized_modules(model)}
    assert paths == {f"model.layers.{i}.{p}" for i in range(2) for p in PROJECTIONS}
    assert model.model.layers[0].self_attn.q_proj.qweight.double_quant == (which == "nf4_dq")
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, **F32)


def test_int8_folder_dequantises_to_scb_scaled_int8_and_computes_with_those_weights(int8_folder, dense):
    import bitsandbytes.functional as bnbf
    from transformers import AutoModelForCausalLM

    folder, hf = int8_folder
    model = load_model(folder).eval()
    reference = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32).eval()
    with torch.no_grad():
        for path, m in quantized_modules(model):
            layer = hf.get_submodule(path)
            assert torch.equal(m.codes, layer.weight.data) and torch.equal(m.scb, layer.weight.SCB)
            w = bnbf.int8_vectorwise_dequant(layer.weight.data, layer.weight.SCB)
            assert torch.equal(m.dequantize(torch.float32), w)
            reference.get_submodule(path).weight.copy_(w)
        ids = tokens(1)
        torch.testing.assert_close(model(ids), reference(ids).logits, **F32)


def test_skip_modules_stay_full_precision(dense, tmp_path):
    hf = make_bnb_checkpoint(dense, tmp_path / "q", load_in_4bit=True, bnb_4bit_quant_type="nf4",
                    llm_int8_skip_modules=["lm_head", "o_proj"])
    model = load_model(tmp_path / "q").eval()
    o_proj = model.model.layers[1].self_attn.o_proj
    assert type(o_proj) is torch.nn.Linear and isinstance(model.model.layers[1].self_attn.q_proj, QuantizedLinear)
    with torch.no_grad():
        torch.testing.assert_close(o_proj.weight, hf.model.layers[1].self_attn.o_proj.weight, atol=0, rtol=0)
        ids = tokens(2)
        torch.testing.assert_close(model(ids), hf(ids).logits, **F32)


def test_quantise_on_load_equals_the_prequantised_folder(dense, nf4_dq, int8_folder):
    ours, theirs = load_model(dense, quantize="int8"), load_model(int8_folder[0])
    for (path, a), (_, b) in zip(quantized_modules(ours), quantized_modules(theirs), strict=True):
        for name, t in a.named_buffers():
            assert torch.equal(t, getattr(b, name)), f"{path}.{name}"
    # Double quantised: the 4-bit codes are bitsandbytes' byte for byte; the 8-bit codes of the
    # absmax are the nearest codes, where bitsandbytes' CPU build looks a few up in a table
    # instead (docs/quantization.md): never nearer than ours, and rare.
    ours, theirs = load_model(dense, quantize="nf4"), load_model(nf4_dq[0])
    full = load_model(dense)
    differ = total = 0
    for (path, a), (_, b) in zip(quantized_modules(ours), quantized_modules(theirs), strict=True):
        assert torch.equal(a.packed, b.packed) and torch.equal(a.nested_absmax, b.nested_absmax)
        assert a.nested_offset == b.nested_offset
        w = full.get_submodule(path).weight.detach().reshape(-1, 64)
        target = w.abs().amax(dim=1) - a.nested_offset
        scale = a.nested_absmax.repeat_interleave(NESTED_BLOCKSIZE)[: target.numel()]
        code = dynamic_code()
        err_ours = (code[a.absmax.long()] - target / scale).abs()
        err_theirs = (code[b.absmax.long()] - target / scale).abs()
        assert (err_ours <= err_theirs + 1e-7).all(), path
        differ += int((a.absmax != b.absmax).sum())
        total += a.absmax.numel()
    assert differ <= 0.01 * total


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_save_model_writes_what_transformers_bitsandbytes_loads(dense, tmp_path, fmt):
    from transformers import AutoModelForCausalLM

    model = load_model(dense, quantize=fmt).eval()
    save_model(model, tmp_path / "saved")
    q = json.loads((tmp_path / "saved" / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "bitsandbytes" and q["load_in_4bit"] == (fmt == "nf4")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", device_map="cpu").eval()
    again = load_model(tmp_path / "saved")
    for (path, a), (_, b) in zip(quantized_modules(model), quantized_modules(again), strict=True):
        for name, t in a.named_buffers():
            assert torch.equal(t, getattr(b, name)), f"{path}.{name}"
        layer = hf.get_submodule(path)
        if fmt == "int8":
            assert torch.equal(layer.weight.data, a.codes) and torch.equal(layer.weight.SCB, a.scb)
        else:
            assert torch.equal(layer.weight.data.view(-1), a.packed.view(-1))
    if fmt == "nf4":
        ids = tokens(3)
        with torch.no_grad():
            torch.testing.assert_close(model(ids), hf(ids).logits, **F32)


def test_a_partly_merged_model_names_its_full_precision_layers_for_transformers(dense, tmp_path):
    from transformers import AutoModelForCausalLM

    from lowrank.models.quantized import QuantizedLinear

    model = load_model(dense, quantize="nf4").eval()
    layer = model.model.layers[0].self_attn
    layer.q_proj = layer.q_proj.to_linear()  # what merge_adapter leaves where a LoRA was
    save_model(model, tmp_path / "saved")
    q = json.loads((tmp_path / "saved" / "config.json").read_text())["quantization_config"]
    assert q["llm_int8_skip_modules"] == ["lm_head", "model.layers.0.self_attn.q_proj"]
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", device_map="cpu").eval()
    assert type(hf.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert isinstance(load_model(tmp_path / "saved").model.layers[1].self_attn.q_proj, QuantizedLinear)
    ids = tokens(4)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, **F32)


def test_a_dequantised_model_saves_without_quantization_config(nf4_dq, tmp_path):
    from lowrank.models.quantized import dequantize_model

    model = dequantize_model(load_model(nf4_dq[0]))
    save_model(model, tmp_path / "plain")
    assert "quantization_config" not in json.loads((tmp_path / "plain" / "config.json").read_text())
    assert not quantized_modules(load_model(tmp_path / "plain"))


def test_fp4_folder_is_refused_naming_fp4(dense, tmp_path):
    make_bnb_checkpoint(dense, tmp_path / "fp4", load_in_4bit=True, bnb_4bit_quant_type="fp4")
    with pytest.raises(CheckpointError, match=r"config\.json: key 'quantization_config' .*'fp4'"):
        load_model(tmp_path / "fp4")
    # The tensors alone say so too, should the config be edited.
    config = json.loads((tmp_path / "fp4" / "config.json").read_text())
    config["quantization_config"]["bnb_4bit_quant_type"] = "nf4"
    (tmp_path / "fp4" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor '.*bitsandbytes__fp4' is an FP4 weight"):
        load_model(tmp_path / "fp4")


@pytest.mark.parametrize("method, name", [("gptq", "GPTQ"), ("awq", "AWQ"), ("fp8", "fp8"), ("modelopt", "NVFP4")])
def test_other_quantisation_methods_are_refused_by_name(tmp_path, method, name):
    config = shrink(real_config("Qwen2.5-0.5B-Instruct"))
    config["quantization_config"] = {"quant_method": method, "bits": 4}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=f"config.json: key 'quantization_config' asks for {name}"):
        read_config(tmp_path)


def test_the_hub_bnb_4bit_config_reads():
    (tmp := real_config("unsloth--Llama-3.2-1B-Instruct-bnb-4bit"))
    from lowrank.models import config_from_dict

    cfg = config_from_dict(tmp)
    assert cfg.hf["quantization_config"]["bnb_4bit_quant_type"] == "nf4" and cfg.num_hidden_layers == 16


def test_quantize_twice_is_refused(int8_folder):
    with pytest.raises(CheckpointError, match="stored as int8; quantize='nf4' would quantise it twice"):
        load_model(int8_folder[0], quantize="nf4")
