"""Freeze fine-tuning: exactly the selected parameters train; frozen ones stay bit-identical
through AdamW steps; the optimizer holds state for trainable ones only; counts as transformers."""

import pytest
import torch
import torch.nn as nn

import lowrank
from lowrank import ConfigError
from lowrank.adapters.freeze import FreezeConfig, apply_freeze, trainable_parameters, trainable_summary
from tests.conftest import make_hf_checkpoint, real_config, shrink

N_LAYERS = 4


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    """4-layer Llama-structured model (DeepSeek-R1-Distill-Llama, untied head)."""
    folder = tmp_path_factory.mktemp("llama4")
    return folder, make_hf_checkpoint(folder, shrink(real_config("DeepSeek-R1-Distill-Llama-8B"), layers=N_LAYERS))


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen-tied")
    return folder, make_hf_checkpoint(folder, shrink(real_config("Qwen2.5-0.5B-Instruct")))


def layer_params(i, part=""):
    """Parameter-name prefix of layer i (optionally of one part of it)."""
    return f"model.layers.{i}.{part}"


@pytest.mark.parametrize("config,prefixes", [
    (FreezeConfig(), [layer_params(2), layer_params(3)]),
    (FreezeConfig(trainable_layers=1), [layer_params(3)]),
    (FreezeConfig(trainable_layers=-2), [layer_params(0), layer_params(1)]),
    (FreezeConfig(trainable_layers=[0, 2]), [layer_params(0), layer_params(2)]),
    (FreezeConfig(trainable_layers=4), [layer_params(i) for i in range(4)]),
    (FreezeConfig(trainable_layers=2, trainable_modules=["mlp"]), [layer_params(2, "mlp."), layer_params(3, "mlp.")]),
    (FreezeConfig(trainable_layers=[1], trainable_modules=["q_proj", "mlp.down_proj", "lm_head"]),
     [layer_params(1, "self_attn.q_proj."), layer_params(1, "mlp.down_proj."), "lm_head."]),
    (FreezeConfig(trainable_layers=1, trainable_modules=["lm_head", "norm"]), [layer_params(3), "lm_head.", "model.norm."]),
    (FreezeConfig(trainable_layers=0, trainable_modules=["embed_tokens"]), ["model.embed_tokens."]),
])
def test_selects_exactly(untied, config, prefixes):
    folder, _ = untied
    model = apply_freeze(lowrank.load_model(folder), config)
    names = [n for n, _ in model.named_parameters()]
    expected = {n for n in names if any(n.startswith(p) for p in prefixes)}
    assert expected  # the oracle selects something
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected


def test_frozen_parameters_are_bit_identical_after_adamw_steps(untied):
    folder, _ = untied
    model = apply_freeze(lowrank.load_model(folder), FreezeConfig(trainable_layers=1, trainable_modules=["lm_head"]))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1)  # decay would move a frozen weight it saw
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(3):
        x = torch.randint(0, 257, (2, 10), generator=g)
        y = torch.randint(0, 257, (2, 10), generator=g)
        nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[n]), n
        else:
            assert torch.equal(p, before[n]) and p.grad is None, n
    assert {id(p) for p in opt.state} == {id(p) for p in trainable}
    assert all(len(s) for s in opt.state.values())


def test_counts_match_transformers_and_tied_weights_count_once(untied, tied):
    for folder, hf in (untied, tied):
        model = lowrank.load_model(folder)
        assert trainable_parameters(model) == (hf.num_parameters(), hf.num_parameters())
    folder, hf = tied
    model = apply_freeze(lowrank.load_model(folder), FreezeConfig(trainable_layers=1))
    layer = sum(p.numel() for p in hf.model.layers[1].parameters())
    assert trainable_parameters(model) == (layer, hf.num_parameters())
    total = hf.num_parameters()
    assert trainable_summary(model) == (f"trainable params: {layer:,d} || all params: {total:,d} || "
                                        f"trainable%: {100 * layer / total:.4f}")


def test_tied_head_trains_the_embeddings_too(tied):
    folder, _ = tied
    model = apply_freeze(lowrank.load_model(folder), FreezeConfig(trainable_layers=0, trainable_modules=["lm_head"]))
    assert model.model.embed_tokens.weight.requires_grad  # one tensor


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(trainable_layers=5), "has 4 layers"),
    (dict(trainable_layers=-5), "has 4 layers"),
    (dict(trainable_layers=[1, 4]), "no layer 4"),
    (dict(trainable_layers=[-1]), "no layer -1"),
    (dict(trainable_modules=["attn"]), "'attn' matches no module"),
    (dict(trainable_layers=0, trainable_modules=["mlp"]), "selects no layer"),
    (dict(trainable_layers=0), "selects no parameter"),
])
def test_bad_config_leaves_the_model(untied, kwargs, fragment):
    folder, _ = untied
    model = lowrank.load_model(folder)
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ConfigError, match=fragment):
        apply_freeze(model, FreezeConfig(**kwargs))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads


@pytest.mark.parametrize("kwargs", [dict(trainable_layers="2"), dict(trainable_layers=True),
                                    dict(trainable_modules="mlp|self_attn")])  # names, not a regex
def test_bad_config_types(kwargs):
    with pytest.raises(ConfigError, match="FreezeConfig"):
        FreezeConfig(**kwargs)
