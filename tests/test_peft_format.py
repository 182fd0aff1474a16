"""PEFT-format adapters, both ways, with peft as the oracle: an adapter trained by
transformers + peft loads into lowrank with the same logits; one saved by lowrank loads with
PeftModel.from_pretrained with the same logits. Plus the real PEFT adapters in ../shared, and
every bad adapter folder: one CheckpointError, the model left as it was."""

import copy
import json
import warnings

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lowrank
from lowrank import CheckpointError, ConfigError
from lowrank.adapters.freeze import trainable_parameters, trainable_summary
from lowrank.adapters.lora import LoraConfig, apply_lora, lora_modules, merge_adapter
from lowrank.adapters.peft_format import load_adapter, save_adapter
from tests.conftest import FIXTURES, make_hf_checkpoint, real_config, shrink

peft = pytest.importorskip("peft")
ATOL = 1e-4  # fp32 logits against transformers, as tests/test_models.py


def ids(seed=1, B=2, T=9):
    return torch.randint(0, 257, (B, T), generator=torch.Generator().manual_seed(seed))


def peft_logits(pm, x):
    pm.eval()
    with torch.no_grad():
        return pm(input_ids=x).logits


def ours_logits(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


def train_with_peft(hf, peft_config, steps=3):
    """get_peft_model + AdamW for a few steps, so B (and what else trains) is non-zero."""
    pm = peft.get_peft_model(copy.deepcopy(hf), peft_config)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=2e-2)
    pm.train()
    for step in range(steps):
        logits = pm(input_ids=ids(step)).logits
        nn.functional.cross_entropy(logits.flatten(0, 1), ids(step + 50).flatten()).backward()
        opt.step()
        opt.zero_grad()
    return pm


PEFT_VARIANTS = {
    "qv": dict(target_modules=["q_proj", "v_proj"], lora_dropout=0.1),
    "rslora-regex": dict(target_modules=r"model\.layers\.\d+\.(self_attn\.o_proj|mlp\.(gate|down)_proj)", use_rslora=True),
    "layers-head-bias": dict(target_modules=["k_proj", "up_proj"], layers_to_transform=[1], modules_to_save=["lm_head"], bias="all"),
    "all-linear-gaussian": dict(target_modules="all-linear", init_lora_weights="gaussian", bias="lora_only"),
}


@pytest.mark.parametrize("name", list(PEFT_VARIANTS))
def test_adapter_trained_by_peft_loads_into_lowrank(untied, tmp_path, name):
    folder, hf = untied
    kwargs = dict(r=4, lora_alpha=12, task_type="CAUSAL_LM") | PEFT_VARIANTS[name]
    pm = train_with_peft(hf, peft.LoraConfig(**kwargs))
    pm.save_pretrained(tmp_path / "adapter")
    model = load_adapter(lowrank.load_model(folder), tmp_path / "adapter")
    x = ids(7)
    assert (peft_logits(pm, x) - hf(x).logits).abs().max() > 1e-2  # training moved the adapter
    torch.testing.assert_close(ours_logits(model, x), peft_logits(pm, x), atol=ATOL, rtol=0)
    # PEFT's wrapped modules are ours
    peft_wrapped = {n.removeprefix("base_model.model.") for n, m in pm.named_modules()
                    if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert {p for p, _ in lora_modules(model)} == peft_wrapped


OUR_VARIANTS = {
    "default": LoraConfig(r=5, alpha=10),
    "rslora-regex": LoraConfig(r=4, alpha=6, use_rslora=True, target_modules=r".*\.(q_proj|mlp\.up_proj)"),
    "regex-with-layers": LoraConfig(r=3, target_modules=r".*_proj", layers=[0]),
    "all-linear-layers-gaussian": LoraConfig(r=3, alpha=5, target_modules="all-linear", layers=1, init="gaussian"),
    "head-and-biases": LoraConfig(r=4, target_modules=["v_proj", "down_proj"], modules_to_save=["lm_head"], bias="all"),
    "lora-only-bias": LoraConfig(r=4, target_modules=["q_proj", "o_proj"], bias="lora_only", dropout=0.05),
}


def perturb_trainables_(model, seed=0):
    """Random values in every trainable tensor (B included), as training would leave them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


@pytest.mark.parametrize("name", list(OUR_VARIANTS))
def test_adapter_saved_by_lowrank_loads_in_peft(untied, tmp_path, name):
    folder, hf = untied
    config = OUR_VARIANTS[name]
    model = perturb_trainables_(apply_lora(lowrank.load_model(folder), config))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(folder))
    vllm_refuses = bool(config.modules_to_save) or config.bias != "none"
    assert any("vLLM" in str(w.message) for w in caught) == vllm_refuses
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "adapter")
    x = ids(3)
    ours = ours_logits(model, x)
    assert (ours - hf(x).logits).abs().max() > 1e-2
    torch.testing.assert_close(peft_logits(pm, x), ours, atol=ATOL, rtol=0)
    peft_wrapped = {n.removeprefix("base_model.model.") for n, m in pm.named_modules()
                    if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert {p for p, _ in lora_modules(model)} == peft_wrapped
    # and back into lowrank
    again = load_adapter(lowrank.load_model(folder), tmp_path / "adapter")
    torch.testing.assert_close(ours_logits(again, x), ours, atol=0, rtol=0)


def test_tied_model_with_head_in_modules_to_save_both_ways(tied, tmp_path):
    """PEFT trains a copy of a tied lm_head; lowrank unties the same way."""
    folder, hf = tied
    pm = train_with_peft(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"],
                                             task_type="CAUSAL_LM"))
    pm.save_pretrained(tmp_path / "from-peft")
    model = load_adapter(lowrank.load_model(folder), tmp_path / "from-peft")
    x = ids(4)
    torch.testing.assert_close(ours_logits(model, x), peft_logits(pm, x), atol=ATOL, rtol=0)

    with pytest.warns(UserWarning, match="modules_to_save"):
        save_adapter(perturb_trainables_(model, 5), tmp_path / "from-ours")
    pm2 = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "from-ours")
    torch.testing.assert_close(peft_logits(pm2, x), ours_logits(model, x), atol=ATOL, rtol=0)
    # merged and saved whole: transformers reads an untied model with the trained head
    merge_adapter(model)
    lowrank.save_model(model, tmp_path / "merged")
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    torch.testing.assert_close(peft_logits(merged, x), peft_logits(pm2, x), atol=ATOL, rtol=0)


def test_saved_adapter_holds_no_base_weight_and_peft_config_keys(tied, tmp_path):
    folder, _ = tied
    attention = ["q_proj", "k_proj", "v_proj", "o_proj"]
    model = perturb_trainables_(apply_lora(lowrank.load_model(folder), LoraConfig(r=4, alpha=8, dropout=0.1,
                                                                                  target_modules=attention)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a plain LoRA adapter is servable: no vLLM warning
        save_adapter(model, tmp_path / "a", base_model_name_or_path="Qwen/Qwen2.5-0.5B-Instruct")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    with safe_open(tmp_path / "a" / "adapter_model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert f.metadata() == {"format": "pt"}
    expected = {f"base_model.model.model.layers.{i}.self_attn.{p}_proj.lora_{ab}.weight"
                for i in (0, 1) for p in "qkvo" for ab in "AB"}
    assert keys == expected
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    peft_keys = set(json.loads((FIXTURES / "adapters/qwen2.5-0.5b-peft-lora/sft/adapter_config.json").read_text()))
    assert set(cfg) == peft_keys  # what PEFT releases since 0.6 read
    assert (cfg["peft_type"], cfg["task_type"], cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"]) == ("LORA", "CAUSAL_LM", 4, 8, 0.1)
    assert sorted(cfg["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert cfg["base_model_name_or_path"] == "Qwen/Qwen2.5-0.5B-Instruct" and cfg["fan_in_fan_out"] is False
    loaded = peft.LoraConfig.from_pretrained(tmp_path / "a")
    assert loaded.r == 4 and loaded.lora_alpha == 8 and not loaded.use_rslora


def test_trainable_counts_match_peft(tied):
    folder, hf = tied
    pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    model = apply_lora(lowrank.load_model(folder), LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    assert trainable_parameters(model) == pm.get_nb_trainable_parameters()
    t, total = pm.get_nb_trainable_parameters()
    assert trainable_summary(model) == f"trainable params: {t:,d} || all params: {total:,d} || trainable%: {100 * t / total:.4f}"


# ---- the real PEFT adapters -------------------------------------------------------------------

@pytest.fixture(scope="module")
def qwen05_full_width(tmp_path_factory):
    """Qwen2.5-0.5B-Instruct's attention at full size (24 layers, 896 wide, 14/2 heads): the
    adapters' shapes. The MLP and vocabulary, which they do not touch, are shrunk (~44M params)."""
    cfg = real_config("Qwen2.5-0.5B-Instruct") | dict(intermediate_size=32, vocab_size=300, torch_dtype="float32")
    for key in ("bos_token_id", "eos_token_id"):
        cfg[key] = cfg[key] % 300
    folder = tmp_path_factory.mktemp("qwen05-full-width")
    return folder, make_hf_checkpoint(folder, cfg)


def test_real_peft_adapters_match_peft(qwen05_full_width):
    folder, hf = qwen05_full_width
    x = torch.randint(0, 300, (2, 7), generator=torch.Generator().manual_seed(0))
    base = peft_logits(hf, x)
    for which in ("sft", "dpo"):
        adapter = FIXTURES / "adapters/qwen2.5-0.5b-peft-lora" / which
        model = load_adapter(lowrank.load_model(folder), adapter)
        wrapped = lora_modules(model)
        assert len(wrapped) == 48 and {p.rsplit(".", 1)[-1] for p, _ in wrapped} == {"q_proj", "v_proj"}
        assert all(m.scale == 4.0 and m.dropout_p == 0.1 for _, m in wrapped)  # alpha 32 / r 8
        pm = peft.PeftModel.from_pretrained(hf, adapter)  # wraps hf in place; unload() below undoes it
        ref = peft_logits(pm, x)
        hf = pm.unload()
        assert (ref - base).abs().max() > 1e-3  # the real adapter changes the logits
        torch.testing.assert_close(ours_logits(model, x), ref, atol=ATOL, rtol=0)


def test_adapter_loads_ready_for_inference_into_an_eval_model(qwen05_full_width):
    """An eval model stays in eval mode when an adapter with dropout is loaded, as
    PeftModel.from_pretrained leaves it: equal logits without calling eval() again."""
    folder, hf = qwen05_full_width
    adapter = FIXTURES / "adapters/qwen2.5-0.5b-peft-lora/dpo"  # lora_dropout 0.1
    x = torch.randint(0, 300, (2, 7), generator=torch.Generator().manual_seed(3))
    pm = peft.PeftModel.from_pretrained(hf, adapter)
    with torch.no_grad():
        ref = pm(input_ids=x).logits
    pm.unload()
    model = load_adapter(lowrank.load_model(folder).eval(), adapter)
    wrapped = lora_modules(model)
    assert wrapped and all(m.dropout_p == 0.1 for _, m in wrapped)
    assert not any(m.training for m in model.modules())
    assert not any(p.requires_grad for _, m in wrapped for p in (m.lora_A.weight, m.lora_B.weight))
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, atol=ATOL, rtol=0)

    # trainable=True (what --init-adapter does): the adapter trains, the base stays frozen.
    again = load_adapter(lowrank.load_model(folder).train(), adapter, trainable=True)
    trains = {n for n, p in again.named_parameters() if p.requires_grad}
    assert trains == {n for n, _ in again.named_parameters() if ".lora_A." in n or ".lora_B." in n}
    assert all(m.training for _, m in lora_modules(again))


# ---- bad adapter folders ------------------------------------------------------------------------

@pytest.fixture
def good_adapter(untied, tmp_path):
    folder, _ = untied
    model = perturb_trainables_(apply_lora(lowrank.load_model(folder), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])))
    return save_adapter(model, tmp_path / "adapter")


def edit_config(adapter, **changes):
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def edit_tensors(adapter, fn):
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def refused(folder, adapter, *fragments, model=None):
    model = model if model is not None else lowrank.load_model(folder)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(CheckpointError) as e:
        load_adapter(model, adapter)
    for f in fragments:
        assert f in str(e.value), str(e.value)
    now = model.state_dict()
    assert list(now) == list(state) and all(torch.equal(now[k], v) for k, v in state.items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    return str(e.value)


def test_missing_folder_and_files(untied, good_adapter, tmp_path):
    folder, _ = untied
    refused(folder, tmp_path / "nope", "nope", "no such adapter folder")
    refused(folder, folder, "no adapter_config.json", "lowrank.load_model")  # a model folder, not an adapter
    (good_adapter / "adapter_model.safetensors").rename(good_adapter / "adapter_model.bin")
    refused(folder, good_adapter, "adapter_model.bin", "pickle")


def test_corrupt_files(untied, good_adapter):
    folder, _ = untied
    weights = good_adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    refused(folder, good_adapter, "adapter_model.safetensors", "truncated")
    (good_adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "r": ')
    refused(folder, good_adapter, "adapter_config.json", "not valid JSON")
    (good_adapter / "adapter_config.json").write_text("[1, 2]")
    refused(folder, good_adapter, "adapter_config.json", "JSON object")


@pytest.mark.parametrize("changes,fragments", [
    (dict(target_modules=["q_proj", "qkv_proj"]), ["adapter_config.json", "'qkv_proj' matches no module"]),
    (dict(target_modules=["q_proj"]), ["adapter_model.safetensors", "v_proj", "target_modules"]),
    (dict(r=0), ["adapter_config.json", "r = 0"]),
    (dict(r=6), ["adapter_model.safetensors", "shape [4, 448]", "[6, 448]"]),
    (dict(use_dora=True), ["'use_dora'", "not supported"]),
    (dict(init_lora_weights="pissa"), ["init_lora_weights", "modified base"]),
    (dict(peft_type="IA3"), ["peft_type 'IA3'"]),
    (dict(task_type="SEQ_CLS"), ["task_type"]),
    (dict(layers_to_transform=[5]), ["no layer 5"]),
    (dict(bias="all"), ["lacks", "bias"]),
    (dict(modules_to_save=["lm_head"]), ["lacks", "lm_head.weight"]),
])
def test_config_that_does_not_fit(untied, good_adapter, changes, fragments):
    folder, _ = untied
    edit_config(good_adapter, **changes)
    refused(folder, good_adapter, *fragments)


def test_tensors_that_do_not_fit(untied, good_adapter):
    folder, _ = untied
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    edit_tensors(good_adapter, lambda t: t.update({key: torch.randn(60, 4)}))
    refused(folder, good_adapter, key, "[60, 4]", "another model")
    edit_tensors(good_adapter, lambda t: t.pop(key))
    refused(folder, good_adapter, "lacks", key)
    extra = "base_model.model.model.layers.9.self_attn.v_proj.lora_A.weight"
    edit_tensors(good_adapter, lambda t: t.update({key: torch.randn(64, 4), extra: torch.randn(4, 448)}))
    refused(folder, good_adapter, extra, "does not have")


def test_adapter_of_another_architecture(tmp_path, untied, tied):
    """A Qwen2.5-0.5B-shaped adapter (224 wide) on the 448-wide model, and a Qwen3 one."""
    folder, _ = untied
    other = apply_lora(lowrank.load_model(tied[0]), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    save_adapter(other, tmp_path / "qwen05")
    refused(folder, tmp_path / "qwen05", "has shape", "another model")
    q3 = tmp_path / "qwen3"
    make_hf_checkpoint(q3, shrink(real_config("Qwen3-0.6B"), layers=3))
    save_adapter(apply_lora(lowrank.load_model(q3), LoraConfig(r=4, layers=[2])), tmp_path / "q3-adapter")
    refused(folder, tmp_path / "q3-adapter", "no layer 2")


def test_adapter_of_a_model_with_another_layer_count(tmp_path, tied):
    """Same widths, 3 layers against the fixture's 2: refused by layer count, both ways."""
    folder, _ = tied
    deeper = tmp_path / "deeper"
    make_hf_checkpoint(deeper, shrink(real_config("Qwen2.5-0.5B-Instruct"), layers=3))
    save_adapter(apply_lora(lowrank.load_model(deeper), LoraConfig(r=4)), tmp_path / "a3")
    refused(folder, tmp_path / "a3", "holds LoRA weights for 3 decoder layers (0..2), this model has 2",
            "trained on another model (another layer count)")
    save_adapter(apply_lora(lowrank.load_model(folder), LoraConfig(r=4)), tmp_path / "a2")
    refused(deeper, tmp_path / "a2", "for 2 decoder layers (0..1), this model has 3", "another layer count")


def test_rslora_adapter_warns_that_gguf_lora_rescales(tied, tmp_path):
    model = apply_lora(lowrank.load_model(tied[0]), LoraConfig(r=16, alpha=8, use_rslora=True))
    with pytest.warns(UserWarning, match=r"llama.cpp's GGUF LoRA converter scales by alpha/r, which would shrink "
                                         r"its update 4x.*python -m lowrank.export") as caught:
        save_adapter(model, tmp_path / "rs")
    assert not any("vLLM" in str(w.message) for w in caught)  # vLLM serves rsLoRA


def test_loading_onto_a_model_that_has_lora_is_refused(untied, good_adapter):
    folder, _ = untied
    model = apply_lora(lowrank.load_model(folder), LoraConfig(target_modules=["k_proj"]))
    refused(folder, good_adapter, "already holds LoRA layers", model=model)


def test_save_without_adapter_is_refused(untied, tmp_path):
    folder, _ = untied
    with pytest.raises(ConfigError, match="save_model"):
        save_adapter(lowrank.load_model(folder), tmp_path / "x")
    assert not (tmp_path / "x").exists()
