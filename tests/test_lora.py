"""LoRA against the dense ΔW: y = x @ (W + scale * B @ A).T + bias, in float64 as the reference;
merging against the unmerged model and against transformers; what trains and what stays put."""

import copy
import math

import pytest
import torch
import torch.nn as nn
from tests.conftest import TOL

import lowrank
from lowrank import ConfigError
from lowrank.adapters.lora import LoraConfig, LoraLinear, apply_lora, lora_modules, merge_adapter, merged


def make_linear(n_in, n_out, bias, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(n_in, n_out, bias=bias, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n_out, n_in, generator=g, dtype=dtype) / n_in**0.5)
        if bias:
            lin.bias.copy_(torch.randn(n_out, generator=g, dtype=dtype))
    return lin


def random_b_(m: LoraLinear, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) / m.r**0.5)


def dense_reference(x, lin, a, b, scale):
    """float64 x @ (W + scale * B @ A).T + bias, differentiable in x, A, B."""
    w = lin.weight.detach().double() + scale * b @ a
    y = x @ w.T
    return y + lin.bias.detach().double() if lin.bias is not None else y


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rslora", [False, True])
def test_forward_and_gradients_match_dense_delta_w(dtype, bias, rslora):
    n_in, n_out, r, alpha = 37, 29, 5, 7.0
    m = LoraLinear(make_linear(n_in, n_out, bias, dtype, seed=1), r, alpha, use_rslora=rslora)
    random_b_(m)
    expected_scale = alpha / math.sqrt(r) if rslora else alpha / r
    assert m.scale == pytest.approx(expected_scale, rel=1e-15)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 7, n_in, generator=g, dtype=dtype, requires_grad=True)
    dy = torch.randn(3, 7, n_out, generator=g, dtype=dtype)

    y = m(x)
    y.backward(dy)

    x64 = x.detach().double().requires_grad_()
    a64 = m.lora_A.weight.detach().double().requires_grad_()
    b64 = m.lora_B.weight.detach().double().requires_grad_()
    ref = dense_reference(x64, m.base_layer, a64, b64, expected_scale)
    ref.backward(dy.double())

    tol = TOL[dtype]
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), ref.detach(), **tol)
    torch.testing.assert_close(x.grad.double(), x64.grad, **tol)
    torch.testing.assert_close(m.lora_A.weight.grad.double(), a64.grad, **tol)
    torch.testing.assert_close(m.lora_B.weight.grad.double(), b64.grad, **tol)
    assert m.base_layer.weight.grad is not None  # a bare nn.Linear: requires_grad until apply_lora freezes it


def test_init_b_zero_a_kaiming_or_gaussian():
    torch.manual_seed(0)
    n_in, r = 509, 8
    k = LoraLinear(make_linear(n_in, 31, False, torch.float32, 0), r, 16)
    bound = 1 / n_in**0.5  # kaiming_uniform_(a=sqrt(5)): sqrt(6 / ((1 + 5) * fan_in))
    a = k.lora_A.weight
    assert torch.count_nonzero(k.lora_B.weight) == 0
    assert a.abs().max() <= bound and a.abs().max() > 0.95 * bound
    assert a.std().item() == pytest.approx(bound / 3**0.5, rel=0.05)  # uniform's std
    gauss = LoraLinear(make_linear(n_in, 31, False, torch.float32, 0), r, 16, init="gaussian")
    assert gauss.lora_A.weight.std().item() == pytest.approx(1 / r, rel=0.05)
    assert gauss.lora_A.weight.abs().max() > 2.5 / r  # unbounded, unlike the uniform init
    assert torch.count_nonzero(gauss.lora_B.weight) == 0


def test_dropout_zero_is_exact_and_eval_applies_none():
    g = torch.Generator().manual_seed(3)
    base = make_linear(23, 19, True, torch.float32, 4)
    plain = LoraLinear(base, 4, 8.0, dropout=0.0)
    random_b_(plain)
    dropped = copy.deepcopy(plain)
    dropped.dropout_p = 0.3
    x = torch.randn(5, 23, generator=g)
    plain.train()
    y_train = plain(x)
    plain.eval()
    assert torch.equal(y_train, plain(x))  # p = 0 draws nothing
    dropped.eval()
    assert torch.equal(dropped(x), plain(x))  # eval mode: no dropout at any p


def test_dropout_is_unbiased():
    """E[dropout(x)] = x, so the mean output over many draws is the dense formula. Each draw's
    LoRA term has variance scale^2 * sum_k x_k^2 M_jk^2 * p / (1 - p) (M = B @ A); the mean over
    N draws must lie within 5 standard errors of the exact value, per element."""
    p, N, n_in, n_out = 0.25, 4000, 11, 6
    base = make_linear(n_in, n_out, True, torch.float64, 5)
    m = LoraLinear(base, 3, 6.0, dropout=p)
    random_b_(m)
    m.train()
    g = torch.Generator().manual_seed(6)
    x = torch.randn(n_in, generator=g, dtype=torch.float64)
    torch.manual_seed(7)
    with torch.no_grad():
        draws = m(x.expand(N, n_in))
        exact = dense_reference(x, base, m.lora_A.weight.double(), m.lora_B.weight.double(), m.scale)
        M = m.lora_B.weight @ m.lora_A.weight
        std = m.scale * ((x**2 * M**2).sum(-1) * p / (1 - p)).sqrt()
    assert draws.std(0).min() > 0.5 * std.min()  # dropout really draws
    assert ((draws.mean(0) - exact).abs() <= 5 * std / N**0.5).all()


# ---- on a tiny model --------------------------------------------------------------------------

def ids(seed=1, B=2, T=11):
    return torch.randint(0, 257, (B, T), generator=torch.Generator().manual_seed(seed))


def randomize_adapter_(model, seed=0):
    for i, (_, m) in enumerate(lora_modules(model)):
        random_b_(m, seed + i)
    return model


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()})


def assert_unchanged(model, snap):
    state, grads = snap
    now = model.state_dict()
    assert list(now) == list(state)
    for k, v in state.items():
        assert torch.equal(now[k], v), k
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert not lora_modules(model) and not hasattr(model, "lora_config")


LAYER_LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


@pytest.mark.parametrize("config,expected", [
    (LoraConfig(), [f"model.layers.{i}.{s}" for i in (0, 1) for s in LAYER_LINEARS]),  # the seven projections
    (LoraConfig(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
     [f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qkvo"]),
    (LoraConfig(target_modules="all-linear"), [f"model.layers.{i}.{s}" for i in (0, 1) for s in LAYER_LINEARS]),
    (LoraConfig(target_modules=r".*\.1\.mlp\.(up|down)_proj"), ["model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]),
    (LoraConfig(target_modules=["v_proj", "mlp.gate_proj"], layers=[1]), ["model.layers.1.self_attn.v_proj", "model.layers.1.mlp.gate_proj"]),
    (LoraConfig(target_modules=["q_proj", "lm_head"]), ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "lm_head"]),
])
def test_apply_wraps_targets_and_freezes_the_rest(untied, config, expected):
    folder, _ = untied
    model = lowrank.load_model(folder)
    with torch.no_grad():
        before = model(ids())
    apply_lora(model, config)
    assert sorted(p for p, _ in lora_modules(model)) == sorted(expected)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(f"{p}.lora_{ab}.weight" for p in expected for ab in "AB")
    keys = model.state_dict().keys()
    assert f"{expected[0]}.base_layer.weight" in keys and f"{expected[0]}.lora_A.weight" in keys
    with torch.no_grad():
        torch.testing.assert_close(model(ids()), before, atol=0, rtol=0)  # B = 0: nothing changes yet


def test_bias_and_modules_to_save_train(untied):
    folder, _ = untied
    model = apply_lora(lowrank.load_model(folder), LoraConfig(target_modules=["q_proj", "o_proj"], bias="lora_only",
                                                              modules_to_save=["lm_head"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lora = {f"model.layers.{i}.self_attn.{p}.lora_{ab}.weight" for i in (0, 1) for p in ("q_proj", "o_proj") for ab in "AB"}
    # Qwen2 has biases on q/k/v only: lora_only trains the adapted q_proj's, o_proj has none.
    assert trainable == lora | {f"model.layers.{i}.self_attn.q_proj.base_layer.bias" for i in (0, 1)} | {"lm_head.weight"}
    everything = apply_lora(lowrank.load_model(folder), LoraConfig(bias="all"))
    biases = {n for n, p in everything.named_parameters() if p.requires_grad and "lora_" not in n}
    assert biases == {n for n, _ in everything.named_parameters() if n.endswith(".bias")} and len(biases) == 6


def test_base_weights_unchanged_after_optimizer_steps(untied):
    folder, _ = untied
    model = apply_lora(lowrank.load_model(folder), LoraConfig(r=4, dropout=0.1, target_modules="all-linear"))
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    model.train()
    for step in range(3):
        logits = model(ids(step))
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), ids(step + 10).flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
    now = dict(model.named_parameters())
    for n, v in base.items():
        assert torch.equal(now[n], v), n
        assert now[n].grad is None
    assert all(not torch.equal(now[n], v) for n, v in lora.items())  # A and B both moved
    assert {id(p) for p in opt.state} == {id(now[n]) for n in lora}


def test_merge_gives_same_logits_and_transformers_loads_it(untied, tmp_path):
    folder, _ = untied
    model = randomize_adapter_(apply_lora(lowrank.load_model(folder), LoraConfig(r=6, alpha=12, target_modules="all-linear")))
    x = ids()
    with torch.no_grad():
        unmerged = model(x)
        assert (unmerged - lowrank.load_model(folder)(x)).abs().max() > 1e-2  # the adapter does something
    merge_adapter(model)
    assert not lora_modules(model) and not hasattr(model, "lora_config")
    assert all(type(m) is nn.Linear for p, m in model.named_modules() if p.endswith("_proj"))
    assert set(model.state_dict()) == set(lowrank.load_model(folder).state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(x), unmerged, **TOL[torch.float32])
    with pytest.raises(ConfigError, match="no LoRA layers"):
        merge_adapter(model)  # merging twice is refused

    from transformers import AutoModelForCausalLM

    lowrank.save_model(model, tmp_path / "merged")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, unmerged, atol=1e-4, rtol=0)


def test_merge_in_bf16_is_computed_in_fp32(untied):
    """The merged bf16 weight is the fp32 sum rounded once, not a sum of bf16-rounded terms."""
    folder, _ = untied
    model = randomize_adapter_(apply_lora(lowrank.load_model(folder, dtype=torch.bfloat16), LoraConfig(r=4)))
    m = model.model.layers[0].self_attn.q_proj
    assert m.lora_A.weight.dtype == torch.float32 and m.base_layer.weight.dtype == torch.bfloat16
    w, a, b = (t.detach().double() for t in (m.base_layer.weight, m.lora_A.weight, m.lora_B.weight))
    expected = (w + m.scale * b @ a).to(torch.bfloat16)
    merge_adapter(model)
    merged_w = model.model.layers[0].self_attn.q_proj.weight
    assert merged_w.dtype == torch.bfloat16
    assert (merged_w.double() - expected.double()).abs().max() <= 2**-7 * expected.double().abs().max()
    assert (merged_w != w.to(torch.bfloat16)).any()


def test_merged_context_keeps_the_adapter_for_training(untied, tmp_path):
    folder, _ = untied
    model = randomize_adapter_(apply_lora(lowrank.load_model(folder), LoraConfig(target_modules=["q_proj", "down_proj"])))
    wrappers = dict(lora_modules(model))
    base = {p: m.base_layer.weight.detach().clone() for p, m in wrappers.items()}
    x = ids()
    with torch.no_grad():
        unmerged = model(x)
    with merged(model):
        assert not lora_modules(model)
        with torch.no_grad():
            torch.testing.assert_close(model(x), unmerged, **TOL[torch.float32])
        lowrank.save_model(model, tmp_path / "m")
    assert dict(lora_modules(model)) == wrappers
    for p, m in wrappers.items():
        assert torch.equal(m.base_layer.weight, base[p]), p
    reloaded = lowrank.load_model(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), unmerged, **TOL[torch.float32])
        torch.testing.assert_close(model(x), unmerged, atol=0, rtol=0)
    # training goes on
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(x).square().mean().backward()
    opt.step()
    for p, m in wrappers.items():
        assert torch.equal(m.base_layer.weight, base[p])


def test_half_base_keeps_fp32_adapter_and_matches_dense():
    """bf16 base: A and B stay fp32 (the optimizer updates fp32), the matmuls run in bf16."""
    m = LoraLinear(make_linear(41, 27, True, torch.bfloat16, 8), 4, 8.0)
    random_b_(m)
    assert m.lora_A.weight.dtype == m.lora_B.weight.dtype == torch.float32
    x = torch.randn(6, 41, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16)
    y = m(x)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and m.lora_A.weight.grad.dtype == torch.float32
    ref = dense_reference(x.double(), m.base_layer, m.lora_A.weight.detach().double(),
                          m.lora_B.weight.detach().double(), m.scale)
    torch.testing.assert_close(y.double(), ref, **TOL[torch.bfloat16])


def test_tied_model_modules_to_save_gets_its_own_head(tied):
    folder, _ = tied
    model = lowrank.load_model(folder)
    embed = model.model.embed_tokens.weight.detach().clone()
    apply_lora(model, LoraConfig(r=2, target_modules=["v_proj"], modules_to_save=["lm_head"]))
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, embed)
    assert model.config.tie_word_embeddings is False
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(ids()).square().mean().backward()
    opt.step()
    assert torch.equal(model.model.embed_tokens.weight, embed)
    assert not torch.equal(model.lm_head.weight, embed)


# ---- bad input: one ConfigError, the model left as it was ---------------------------------------

@pytest.mark.parametrize("kwargs,fragment", [
    (dict(r=0), "r = 0"), (dict(r=-3), "r = -3"), (dict(r=2.5), "r = 2.5"), (dict(r=True), "r = True"),
    (dict(alpha=0), "alpha"), (dict(dropout=1.0), "dropout"), (dict(target_modules="q_proj("), "regex"),
    (dict(target_modules=[]), "target_modules"), (dict(bias="some"), "bias"), (dict(init="xavier"), "init"),
    (dict(layers=[-1]), "layers"), (dict(modules_to_save="lm_.*"), "modules_to_save"),  # names, not a regex
])
def test_bad_config_values(kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(")):
        LoraConfig(**kwargs)


@pytest.mark.parametrize("config,fragment", [
    (LoraConfig(target_modules=["qkv_proj"]), "'qkv_proj' matches no module"),
    (LoraConfig(target_modules=["q_proj", "v-proj"]), "'v-proj' matches no module"),
    (LoraConfig(target_modules=r"model\.layers\.7\..*"), "matches no module"),
    (LoraConfig(target_modules=["mlp"]), "a MLP: LoRA adapts nn.Linear"),
    (LoraConfig(layers=[2]), "no layer 2"),
    (LoraConfig(modules_to_save=["score"]), "'score' matches no module"),
    (LoraConfig(target_modules=["lm_head"]), "tied"),
])
def test_apply_refuses_and_leaves_the_model(tied, config, fragment):
    folder, _ = tied
    model = lowrank.load_model(folder)
    snap = snapshot(model)
    with pytest.raises(ConfigError, match=fragment):
        apply_lora(model, config)
    assert_unchanged(model, snap)


def test_applying_twice_is_refused(tied):
    folder, _ = tied
    model = apply_lora(lowrank.load_model(folder), LoraConfig(target_modules=["q_proj"]))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for config in (LoraConfig(target_modules=["q_proj"]), LoraConfig(target_modules=["k_proj"])):
        with pytest.raises(ConfigError, match="already holds LoRA layers"):
            apply_lora(model, config)
    assert list(model.state_dict()) == list(state)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_qkv_and_gate_up_run_as_one_merged_call(untied, monkeypatch):
    """apply_lora sets the model's qkv_fn / gate_up_fn hooks so q/k/v and gate/up go through one
    lora_linear_merged call (one wide GEMM on a GPU); the result equals running each
    projection alone, in training (same dropout masks) and in eval mode, and after a merge."""
    import lowrank.adapters.lora as lora_mod

    folder, _ = untied
    config = LoraConfig(r=5, alpha=10, dropout=0.2, target_modules="all-linear")
    model = randomize_adapter_(apply_lora(lowrank.load_model(folder), config))
    calls = []
    real = lora_mod.lora_linear_merged
    monkeypatch.setattr(lora_mod, "lora_linear_merged", lambda x, ws, *a: calls.append(len(ws)) or real(x, ws, *a))
    x = ids()
    hooked = [m for m in model.modules() if getattr(m, "qkv_fn", None) or getattr(m, "gate_up_fn", None)]
    assert len(hooked) == 2 * model.config.num_hidden_layers
    for train in (True, False):
        model.train(train)
        torch.manual_seed(11)
        with torch.no_grad():
            grouped = model(x)
        for m in hooked:
            m.qkv_fn = m.gate_up_fn = None  # each projection alone
        torch.manual_seed(11)
        with torch.no_grad():
            alone = model(x)
        for m in hooked:
            m.qkv_fn = m.gate_up_fn = lora_mod.lora_group
        torch.testing.assert_close(grouped, alone, **TOL[torch.float32])
    assert calls == [3, 2] * model.config.num_hidden_layers * 2
    # q and v adapted, k left plain: the group runs each projection as itself.
    partial = randomize_adapter_(apply_lora(lowrank.load_model(folder), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])))
    calls.clear()
    with torch.no_grad():
        partial(x)
    assert calls == []
    model.eval()
    with torch.no_grad():
        before = model(x)
    merge_adapter(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, **TOL[torch.float32])
