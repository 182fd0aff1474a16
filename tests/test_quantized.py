"""Quantised base layers (models/quantized.py) and training on them (QLoRA).

The oracles: bitsandbytes' own Linear4bit state dict; float64 formulas on the dequantised weight;
a lowrank run whose base holds the dequantised weights in full precision, so the quantisation is
the only difference (losses within the fp32 row of TOL); PEFT over transformers + bitsandbytes
for an adapter trained on a 4-bit base.
"""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from lowrank.adapters.lora import LoraConfig, apply_lora, lora_modules, merge_adapter, merged
from lowrank.adapters.peft_format import load_adapter
from lowrank.errors import ConfigError
from lowrank.kernels import dequantize_nf4, quantize_int8, quantize_nf4
from lowrank.models.checkpoint import load_model, save_model
from lowrank.models.quantized import QuantizedLinear, dequantize_model, quantized_modules
from lowrank.train.loop import TrainConfig, build_run, finetune
from tests.conftest import TOL, make_bnb_checkpoint, make_hf_checkpoint, real_config, shrink
from tests.train_helpers import adapter_tensors, cli, read_metrics, tiny_model_dir, write_pretokenized

F32 = TOL[torch.float32]


def weight(n, k, seed, dtype=torch.float32):
    return (torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) / k ** 0.5).to(dtype)


# ---- the layer ----------------------------------------------------------------------------------

def test_state_dict_is_bitsandbytes_linear4bit_state_dict():
    import bitsandbytes as bnb

    w = weight(72, 192, 0)
    ours = QuantizedLinear(quantize_nf4(w), bias=torch.randn(72)).state_dict()
    layer = bnb.nn.Linear4bit(192, 72, bias=True, compress_statistics=True, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True, quant_type="nf4")
    layer.weight = layer.weight._quantize("cpu")
    theirs = layer.state_dict()
    assert list(ours) == ["bias", *[k for k in theirs if k != "bias"]]
    for key in theirs:
        if key != "bias":
            assert torch.equal(ours[key], theirs[key].view(ours[key].shape)), key


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_forward_and_backward_are_the_dense_layer_on_the_dequantised_weight(fmt):
    w = weight(40, 128, 1)
    q = quantize_nf4(w) if fmt == "nf4" else quantize_int8(w)
    layer = QuantizedLinear(q, bias=torch.randn(40, generator=torch.Generator().manual_seed(2)))
    x = torch.randn(3, 7, 128, dtype=torch.float32, generator=torch.Generator().manual_seed(3), requires_grad=True)
    y = layer(x)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(4))
    (y * dy).sum().backward()
    w64 = layer.dequantize(torch.float64)
    x64 = x.detach().double().requires_grad_()
    y64 = F.linear(x64, w64, layer.bias.double())
    (y64 * dy.double()).sum().backward()
    torch.testing.assert_close(y.double(), y64, **F32)
    torch.testing.assert_close(x.grad.double(), x64.grad, **F32)
    assert not any(p.requires_grad for p in layer.parameters())
    if fmt == "nf4":
        assert torch.equal(layer.dequantize(), dequantize_nf4(q))


def test_load_state_dict_round_trips():
    a = QuantizedLinear(quantize_nf4(weight(24, 64, 5)), bias=torch.randn(24))
    b = QuantizedLinear(quantize_nf4(weight(24, 64, 6)), bias=torch.randn(24))
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.dequantize(), b.dequantize()) and torch.equal(a.bias, b.bias)


# ---- quantise on load -------------------------------------------------------------------------

def test_dense_quantise_on_load_covers_the_projections_and_nothing_else(tmp_path):
    folder = tiny_model_dir(tmp_path / "m", "Qwen2.5-7B-Instruct", seed=1)
    full, model = load_model(folder), load_model(folder, quantize="nf4")
    names = {p.split(".", 3)[3] for p, _ in quantized_modules(model)}
    assert names == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    for path, m in quantized_modules(model):
        assert torch.equal(m.dequantize(), dequantize_nf4(quantize_nf4(full.get_submodule(path).weight.detach())))
        assert torch.equal(m.bias, full.get_submodule(path).bias) if m.bias is not None else True
    for name in ("lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"):
        assert torch.equal(dict(model.named_parameters())[name], dict(full.named_parameters())[name])


def test_moe_experts_are_quantised_routers_are_not(tmp_path):
    folder = tiny_model_dir(tmp_path / "moe", "Qwen1.5-MoE-A2.7B.partial", seed=2, moe_intermediate_size=24,
                            shared_expert_intermediate_size=40, num_experts=8, num_experts_per_tok=2)
    model = load_model(folder, quantize="int8").eval()
    paths = [p for p, _ in quantized_modules(model)]
    assert any(".mlp.experts.3.down_proj" in p for p in paths) and any("shared_expert.up_proj" in p for p in paths)
    assert not any(p.endswith(("mlp.gate", "shared_expert_gate")) for p in paths)
    assert type(model.model.layers[0].mlp.shared_expert_gate) is torch.nn.Linear
    ids = torch.randint(0, 257, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = dequantize_model(load_model(folder, quantize="int8")).eval()(ids)
        torch.testing.assert_close(model(ids), expected, **F32)


# ---- LoRA on a quantised base, merging ---------------------------------------------------------

@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    root = tmp_path_factory.mktemp("qlora")
    return root, tiny_model_dir(root / "model", "Qwen2.5-7B-Instruct", seed=4)


def test_merge_folds_into_the_dequantised_weight(dense):
    root, folder = dense
    model = load_model(folder, quantize="nf4").eval()
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    g = torch.Generator().manual_seed(7)
    for _, m in lora_modules(model):
        m.lora_B.weight.data = torch.randn(m.lora_B.weight.shape, generator=g) * 0.05
    path, m = lora_modules(model)[0]
    expected = m.base_layer.dequantize(torch.float64) + m.scale * (m.lora_B.weight.double() @ m.lora_A.weight.double())
    ids = torch.randint(0, 257, (2, 10), generator=g)
    with torch.no_grad():
        before = model(ids)
        with merged(model):
            torch.testing.assert_close(model(ids), before, **F32)
        assert isinstance(model.get_submodule(path).base_layer, QuantizedLinear)  # back as it was
        merge_adapter(model)
        after = model(ids)
    layer = model.get_submodule(path)
    assert type(layer) is torch.nn.Linear and not quantized_modules(model)
    torch.testing.assert_close(layer.weight.double(), expected, **F32)
    torch.testing.assert_close(after, before, **F32)


# ---- training --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(dense):
    """The data, and a folder holding the NF4-dequantised weights of the model in full precision."""
    root, folder = dense
    data = write_pretokenized(root / "data.jsonl", 10, seed=8)
    save_model(dequantize_model(load_model(folder, quantize="nf4")), root / "dequantised")
    return root, folder, root / "dequantised", data


def run_config(folder, data, output, **kw):
    base = dict(model=str(folder), data=str(data), output=str(output), method="lora", r=4, dropout=0.1, lr=1e-2,
                batch_size=2, grad_accum=2, max_steps=3, lr_scheduler="constant", dtype="float32", device="cpu",
                progress=False, seed=1)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def qlora(runs):
    """A 3-step QLoRA run with gradient checkpointing: its config and result."""
    root, folder, _, data = runs
    cfg = run_config(folder, data, root / "qlora", quantize="nf4", gradient_checkpointing=True)
    return cfg, finetune(cfg)


@pytest.mark.parametrize("method", ["lora", "prefix"])
def test_qlora_steps_equal_a_run_on_the_dequantised_weights(runs, qlora, tmp_path, method):
    root, folder, dequantised, data = runs
    if method == "lora":
        cfg, q = qlora
    else:
        cfg = run_config(folder, data, tmp_path / "q", method=method, quantize="nf4")
        q = finetune(cfg)
    ref = finetune(run_config(dequantised, data, tmp_path / "ref", method=method))
    assert len(q.losses) == 3 and q.losses[0] != q.losses[-1]
    for a, b in zip(q.losses, ref.losses, strict=True):
        assert a == pytest.approx(b, rel=1e-5)
    ours, theirs = adapter_tensors(cfg.output), adapter_tensors(tmp_path / "ref")
    assert set(ours) == set(theirs)
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-5, rtol=1e-4, msg=key)


def test_resume_refuses_another_quantize_and_with_the_same_continues_the_uninterrupted_run(
        runs, qlora, tmp_path, monkeypatch, capsys):
    cfg, whole = qlora  # 3 steps, NF4 base, dropout and gradient checkpointing
    out = tmp_path / "cut"
    args = ["--model", cfg.model, "--data", cfg.data, "--output", out, "--method", "lora", "--r", cfg.r,
            "--dropout", cfg.dropout, "--lr", cfg.lr, "--batch-size", cfg.batch_size, "--grad-accum", cfg.grad_accum,
            "--lr-scheduler", "constant", "--dtype", "float32", "--device", "cpu", "--seed", cfg.seed,
            "--gradient-checkpointing", "--no-progress"]
    code, _, err = cli("lowrank.train", args + ["--quantize", "nf4", "--max-steps", 2, "--save-every", 1],
                       monkeypatch, capsys)
    assert code == 0, err
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for other in ("none", "int8"):
        code, _, err = cli("lowrank.train", args + ["--quantize", other, "--max-steps", 3, "--resume"],
                           monkeypatch, capsys)
        assert code == 2 and err.count("\n") == 1, err
        assert f"was written with quantize='nf4', this run has quantize='{other}'" in err
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing written

    code, _, err = cli("lowrank.train", args + ["--quantize", "nf4", "--max-steps", 3, "--resume"],
                       monkeypatch, capsys)
    assert code == 0, err
    rows = read_metrics(out)[0]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["loss"] for r in rows] == pytest.approx(whole.losses, rel=1e-6)
    ours, theirs = adapter_tensors(out), adapter_tensors(cfg.output)
    assert set(ours) == set(theirs)
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-6, rtol=0, msg=key)


@pytest.mark.parametrize("method", ["freeze", "full"])
def test_freeze_and_full_refuse_a_quantised_base(runs, tmp_path, method):
    root, folder, _, data = runs
    with pytest.raises(ConfigError, match=f"quantize='nf4' with method='{method}': a quantised weight cannot be"):
        build_run(run_config(folder, data, tmp_path / "o", method=method, quantize="nf4"))
    save_model(load_model(folder, quantize="nf4"), tmp_path / "prequantised")
    with pytest.raises(ConfigError, match=f"is stored quantised, which method='{method}' cannot train"):
        build_run(run_config(tmp_path / "prequantised", data, tmp_path / "o", method=method))


def test_adapter_trained_on_a_bnb_4bit_folder_loads_into_peft_over_bitsandbytes(tmp_path):
    from peft import PeftModel

    dense = tmp_path / "dense"
    make_hf_checkpoint(dense, shrink(real_config("Qwen2.5-7B-Instruct"), intermediate=192), seed=9)
    hf = make_bnb_checkpoint(dense, tmp_path / "bnb", load_in_4bit=True, bnb_4bit_quant_type="nf4",
                             bnb_4bit_use_double_quant=True)
    data = write_pretokenized(tmp_path / "data.jsonl", 6, seed=10)
    finetune(run_config(tmp_path / "bnb", data, tmp_path / "out", max_steps=2, lr=5e-2))
    ours = load_adapter(load_model(tmp_path / "bnb"), tmp_path / "out" / "adapter").eval()
    peft = PeftModel.from_pretrained(hf, tmp_path / "out" / "adapter").eval()
    ids = torch.randint(0, 257, (2, 12), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        with peft.disable_adapter():
            plain = peft(ids).logits
        theirs = peft(ids).logits
        assert (theirs - plain).abs().max() > 1e-3  # the adapter changes the answer
        torch.testing.assert_close(ours(ids), theirs, **F32)
