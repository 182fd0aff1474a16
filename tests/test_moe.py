"""DeepSeek-V2/V3 (MLA + MoE) and Qwen2/Qwen3-MoE against transformers, on tiny random
checkpoints that keep the structure of the real configs in ../shared/fixtures/configs/, saved
by transformers in the hub's per-expert layout (`mlp.experts.N.gate_proj.weight`), sharded,
with the 4.x config.json."""

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from tests.conftest import TOL, randomize_, real_config, shrink

import lowrank
from lowrank.models.moe import dispatch, load_balancing_loss, set_routers_trainable

VOCAB = 257


def _mla(d: dict, **overrides) -> dict:
    """A DeepSeek config shrunk: 3 layers (the first dense), 4 heads, 8 routed experts, top-3,
    and odd MLA dims (v_head_dim != qk_nope_head_dim) so a swapped split shows up. The
    yarn rope scaling (factor 40, mscale_all_dim) and the routing settings stay as published."""
    d = dict(d)
    d.update(num_hidden_layers=3, first_k_dense_replace=1, vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
             num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=12,
             qk_rope_head_dim=8, v_head_dim=10, moe_intermediate_size=24, n_routed_experts=8,
             num_experts_per_tok=3, torch_dtype="float32")
    for key in ("bos_token_id", "eos_token_id"):
        d[key] %= VOCAB
    d.update(overrides)
    return d


def _v3(**overrides):
    d = real_config("DeepSeek-V3")
    # The published weights are fp8 blocks with scale tensors (refused at load, see below);
    # the test weights are fp32, so the quantization_config goes.
    d.pop("quantization_config")
    return _mla(d, q_lora_rank=24, n_group=4, topk_group=2, **overrides)  # 256/8/4 -> 8/4/2


def _v2_lite(**overrides):
    d = real_config("DeepSeek-V2-Lite.partial")
    # Keys the partial file lacks, as the published config.json has them.
    d.update(q_lora_rank=None, tie_word_embeddings=False, aux_loss_alpha=0.001, seq_aux=True, ep_size=1,
             attention_dropout=0.0)
    return _mla(d, **overrides)


def _qwen2_moe(**overrides):
    # Keys the partial file lacks (qkv_bias, mlp_only_layers) take transformers' defaults.
    d = shrink(real_config("Qwen1.5-MoE-A2.7B.partial"), layers=3, vocab=VOCAB)
    d.update(moe_intermediate_size=24, shared_expert_intermediate_size=40, num_experts=8, num_experts_per_tok=2)
    d.update(overrides)
    return d


def _qwen3_moe(**overrides):
    # Qwen3-0.6B's attention (q/k norm, explicit head_dim, GQA 16/8) plus the MoE keys of the
    # published Qwen3-30B-A3B config (norm_topk_prob, untied embeddings, every layer sparse).
    d = shrink(real_config("Qwen3-0.6B"), layers=3, vocab=VOCAB)
    d.update(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], num_experts=8, num_experts_per_tok=2,
             moe_intermediate_size=24, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
             tie_word_embeddings=False, router_aux_loss_coef=0.001, output_router_logits=False)
    d.update(overrides)
    return d


CONFIGS = {
    "deepseek-v3": _v3,  # MLA with q_lora_rank, sigmoid + noaux_tc, yarn, interleaved rope
    "deepseek-v3-halves": lambda: _v3(rope_interleave=False, norm_topk_prob=False),
    "deepseek-v2-lite": _v2_lite,  # q_proj (no q_lora_rank), softmax + greedy, 2 shared experts
    # DeepSeek-V2 proper: q_lora_rank, group-limited greedy, routed_scaling_factor 16; plus biases
    "deepseek-v2-grouped": lambda: _v2_lite(q_lora_rank=24, topk_method="group_limited_greedy", n_group=4,
                                            topk_group=2, routed_scaling_factor=16.0, attention_bias=True),
    "qwen2-moe": _qwen2_moe,
    # layers 1 and 3 by the step, minus mlp_only_layers: only layer 1 sparse
    "qwen2-moe-sparse-step": lambda: _qwen2_moe(num_hidden_layers=4, decoder_sparse_step=2, mlp_only_layers=[3]),
    "qwen3-moe": _qwen3_moe,
}


def _hf_checkpoint(folder, config: dict, seed: int = 0):
    """Build, randomise and save a transformers model; rewrite config.json in the 4.x layout."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32)
    randomize_(hf, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, buf in hf.named_buffers():  # a buffer: randomize_ does not reach it
            if name.endswith("e_score_correction_bias"):
                buf.copy_(0.3 * torch.randn(buf.shape, generator=g))
    hf.eval().save_pretrained(folder, max_shard_size="60KB")
    (folder / "config.json").rename(folder / "config.5x.json")  # as transformers 5 wrote it
    (folder / "config.json").write_text(json.dumps(config))
    return hf


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """checkpoint(name) -> (folder, transformers model), built once per module."""
    built = {}

    def get(name):
        if name not in built:
            folder = tmp_path_factory.mktemp("moe") / name
            built[name] = folder, _hf_checkpoint(folder, CONFIGS[name]())
        return built[name]

    return get


def _ids(B=2, T=13, seed=1):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def _weight_keys(folder):
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return set(index["weight_map"])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(checkpoint, name):
    folder, hf = checkpoint(name)
    keys = _weight_keys(folder)  # the hub's per-expert layout, sharded
    assert any(k.endswith(".mlp.experts.7.down_proj.weight") for k in keys)
    assert not any("gate_up_proj" in k for k in keys)
    assert "rope_parameters" not in json.loads((folder / "config.json").read_text())
    model = lowrank.load_model(folder)
    if name == "qwen2-moe-sparse-step":
        assert [hasattr(layer.mlp, "experts") for layer in model.model.layers] == [False, True, False, False]
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-4, rtol=0)
        torch.testing.assert_close(model.model(ids), hf.model(ids).last_hidden_state, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["deepseek-v3", "deepseek-v2-lite", "qwen2-moe", "qwen3-moe"])
def test_config_as_transformers_5_writes_it(checkpoint, tmp_path, name):
    """rope_parameters, dtype, qwen3_moe's num_local_experts: the 5.x layout loads too, and
    saves back in the 4.x one."""
    folder, hf = checkpoint(name)
    for f in folder.glob("model*"):
        (tmp_path / f.name).symlink_to(f)
    (tmp_path / "config.json").write_text((folder / "config.5x.json").read_text())
    assert "rope_parameters" in json.loads((tmp_path / "config.json").read_text())
    model = lowrank.load_model(tmp_path)
    ids = _ids(seed=3)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-4, rtol=0)
    saved = model.config.to_hf_dict()
    assert "rope_parameters" not in saved and "num_local_experts" not in saved
    again = lowrank.models.config_from_dict(saved)
    assert dataclasses.replace(again, hf={}) == dataclasses.replace(model.config, hf={})


@pytest.mark.parametrize("name", ["deepseek-v3", "qwen2-moe"])
def test_padded_batch_matches_transformers(checkpoint, name):
    folder, hf = checkpoint(name)
    model = lowrank.load_model(folder)
    ids = _ids(B=3, T=11, seed=2)
    mask = torch.ones_like(ids)
    mask[1, 7:], mask[2, 4:] = 0, 0  # right padding
    with torch.no_grad():
        ours = model(ids, attention_mask=mask)
        ref = hf(ids, attention_mask=mask).logits
    keep = mask.bool()
    torch.testing.assert_close(ours[keep], ref[keep], atol=1e-4, rtol=0)


def test_packed_rows_match_examples_alone(checkpoint):
    folder, _ = checkpoint("deepseek-v2-lite")
    model = lowrank.load_model(folder)
    g = torch.Generator().manual_seed(4)
    seqs = [torch.randint(0, VOCAB, (n,), generator=g) for n in (6, 9, 4)]
    ids = torch.cat(seqs)[None]
    pos = torch.cat([torch.arange(len(s)) for s in seqs])[None]
    with torch.no_grad():
        packed = model(ids, position_ids=pos)[0]
        start = 0
        for s in seqs:
            torch.testing.assert_close(packed[start: start + len(s)], model(s[None])[0], **TOL[torch.float32])
            start += len(s)


@pytest.mark.parametrize("name", ["deepseek-v3", "deepseek-v2-lite", "qwen2-moe", "qwen3-moe"])
def test_greedy_generation_matches_transformers(checkpoint, name):
    folder, hf = checkpoint(name)
    model = lowrank.load_model(folder)
    prompt = _ids(B=1, T=7, seed=9)
    ours = lowrank.generate(model, prompt, max_new_tokens=10)
    ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, do_sample=False,
                      eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours, ref)


def test_batched_left_padded_generation_matches_transformers(checkpoint):
    """The MLA latent cache under a padding mask, step after step."""
    folder, hf = checkpoint("deepseek-v3")
    model = lowrank.load_model(folder)
    ids = _ids(B=2, T=9, seed=2).clamp(min=1)
    mask = torch.ones_like(ids)
    ids[1, :4], mask[1, :4] = 0, 0
    ours = lowrank.generate(model, ids, max_new_tokens=10, attention_mask=mask, pad_token_id=0)
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=None,
                      pad_token_id=0)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("name", ["deepseek-v3", "qwen2-moe"])
def test_save_round_trip_in_the_per_expert_layout(checkpoint, tmp_path, name):
    from transformers import AutoModelForCausalLM

    folder, _ = checkpoint(name)
    model = lowrank.load_model(folder)
    out = lowrank.save_model(model, tmp_path / "saved", max_shard_size="50KB")
    assert _weight_keys(out) == _weight_keys(folder)  # same keys, per expert, as the hub's files
    saved = json.loads((out / "config.json").read_text())
    assert "rope_parameters" not in saved and saved["model_type"] == model.config.model_type
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = _ids(seed=5)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-4, rtol=0)
    again = lowrank.load_model(out)
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_bf16_checkpoint_loads_and_runs(checkpoint):
    from transformers import AutoModelForCausalLM

    folder, _ = checkpoint("deepseek-v3")
    model = lowrank.load_model(folder, dtype=torch.bfloat16)
    assert model.model.layers[1].mlp.experts[0].up_proj.weight.dtype == torch.bfloat16
    # As in transformers: the router's correction bias stays fp32 (bf16 would reorder experts).
    assert model.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    ids = _ids(seed=15)
    with torch.no_grad():
        ours, ref = model(ids).float(), hf(ids).logits.float()
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, ref, atol=5e-2, rtol=5e-2)


def _moe_reference(x, ids, weights, experts):
    """The dense formula, token by token."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            out[t] += weights[t, j] * experts[int(ids[t, j])](x[t: t + 1])[0]
    return out


def test_dispatch_matches_the_dense_formula():
    from lowrank.models.decoder import MLP

    g = torch.Generator().manual_seed(7)
    E, H, N, k = 6, 10, 17, 2
    experts = torch.nn.ModuleList(MLP(H, 7) for _ in range(E)).double()
    randomize_(experts, seed=3)
    x = torch.randn(N, H, generator=g, dtype=torch.float64, requires_grad=True)
    # experts 0 and 5 get no token; the others several, in scrambled order
    ids = torch.stack([torch.randperm(4, generator=g)[:k] + 1 for _ in range(N)])
    w = torch.rand(N, k, generator=g, dtype=torch.float64, requires_grad=True)
    ours = dispatch(x, ids, w, experts)
    ref = _moe_reference(x, ids, w, experts)
    torch.testing.assert_close(ours, ref, **TOL[torch.float64])
    up = torch.randn(N, H, generator=g, dtype=torch.float64)
    got = torch.autograd.grad((ours * up).sum(), [x, w, experts[1].down_proj.weight])
    want = torch.autograd.grad((ref * up).sum(), [x, w, experts[1].down_proj.weight])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL[torch.float64])


def test_load_balancing_loss_matches_transformers():
    from transformers.models.qwen2_moe.modeling_qwen2_moe import load_balancing_loss_func

    g = torch.Generator().manual_seed(8)
    B, T, E, k = 3, 7, 8, 2
    logits = [torch.randn(B * T, E, generator=g) for _ in range(3)]
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, 5:], mask[2, 2:] = 0, 0
    for m in (None, mask):
        ours = load_balancing_loss(logits, E, k, m)
        ref = load_balancing_loss_func(tuple(logits), E, k, m)
        torch.testing.assert_close(ours, ref, **TOL[torch.float32])


def test_model_aux_loss_matches_transformers(checkpoint):
    from transformers.models.qwen2_moe.modeling_qwen2_moe import load_balancing_loss_func

    folder, hf = checkpoint("qwen2-moe")
    model = lowrank.load_model(folder)
    ids = _ids(B=2, T=9, seed=6)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        model(ids, attention_mask=mask)
        assert model.aux_loss is None  # off by default
        model.config.aux_loss_coef = 0.01
        model(ids, attention_mask=mask)
        out = hf(ids, attention_mask=mask, output_router_logits=True)
    ref = load_balancing_loss_func(out.router_logits, 8, 2, mask)
    torch.testing.assert_close(model.aux_loss, 0.01 * ref, atol=1e-6, rtol=1e-5)


def _lm_loss(logits, ids):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def test_training_steps_reduce_the_loss(checkpoint):
    folder, _ = checkpoint("deepseek-v3")
    model = lowrank.load_model(folder)
    model.config.aux_loss_coef = 0.01
    ids = _ids(B=2, T=12, seed=11)
    routers = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("mlp.gate.weight")}
    assert routers and not any(model.get_parameter(n).requires_grad for n in routers)  # frozen by default

    # Gradient checkpointing recomputes the layers and must give the same gradients.
    model.train()
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.model.gradient_checkpointing = ckpt
        (_lm_loss(model(ids), ids) + model.aux_loss).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-5, rtol=1e-4)

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = _lm_loss(model(ids), ids)
        (loss + model.aux_loss).backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    for n, before in routers.items():
        assert torch.equal(model.get_parameter(n), before), n

    assert set_routers_trainable(model) == 2
    opt = torch.optim.AdamW([model.get_parameter(n) for n in routers], lr=1e-2)
    opt.zero_grad()
    (_lm_loss(model(ids), ids) + model.aux_loss).backward()
    opt.step()
    assert all(not torch.equal(model.get_parameter(n), before) for n, before in routers.items())


BAD = [
    ("deepseek-v2-lite", {"topk_method": "noaux_tc"}, "topk_method"),
    ("deepseek-v2-lite", {"scoring_func": "sigmoid"}, "scoring_func"),
    ("deepseek-v2-lite", {"norm_topk_prob": True}, "norm_topk_prob"),
    ("deepseek-v2-lite", {"topk_method": "group_limited_greedy", "n_group": 3}, "n_group"),
    ("deepseek-v2-lite", {"moe_layer_freq": 2}, "moe_layer_freq"),
    ("deepseek-v3", {"topk_method": "greedy"}, "topk_method"),
    ("deepseek-v3", {"scoring_func": "softmax"}, "scoring_func"),
    ("deepseek-v3", {"topk_group": 5}, "topk_group"),
    ("deepseek-v3", {"num_experts_per_tok": 5, "topk_group": 1}, "num_experts_per_tok"),
    ("deepseek-v3", {"quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
    ("deepseek-v3", {"kv_lora_rank": None}, "kv_lora_rank"),
    ("qwen2-moe", {"num_experts_per_tok": 9}, "num_experts_per_tok"),
    ("qwen2-moe", {"mlp_only_layers": [3]}, "mlp_only_layers"),
    ("qwen3-moe", {"hidden_act": "gelu"}, "hidden_act"),
]


@pytest.mark.parametrize("name,overrides,key", BAD, ids=[f"{n}-{k}" for n, _, k in BAD])
def test_bad_configs_fail_at_load(tmp_path, name, overrides, key):
    config = {**CONFIGS[name](), **overrides}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(lowrank.CheckpointError) as e:
        lowrank.load_model(tmp_path)
    assert "config.json" in str(e.value) and repr(key) in str(e.value)


# LoRA on MLA and on the routed experts. transformers 5 holds experts fused
# (`experts.gate_up_proj`); PEFT 0.21 converts a per-expert adapter to that layout when it loads
# it, but only for the routed experts: it maps every target named gate_proj / up_proj /
# down_proj to the fused experts, so same-named shared-expert or dense-MLP projections must be
# left out of an adapter meant for PEFT (hence the regex), and it has no conversion entry for
# qwen2_moe itself (only for the families that borrow its pattern), so Qwen2-MoE expert
# adapters round-trip through lowrank only.
MLA_AND_EXPERTS = (r".*\.(self_attn\.(q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
                   r"|mlp\.experts(\.\d+)?\.(gate_proj|up_proj|down_proj))")
LORA_CASES = [
    ("deepseek-v3", MLA_AND_EXPERTS, True),
    ("deepseek-v2-lite", ["q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"], True),
    ("qwen3-moe", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], True),
    ("qwen2-moe", "all-linear", False),  # experts, shared expert and its gate too
]


# PEFT's conversion sets a rank/alpha pattern for the fused gate_up_proj and then warns that
# it matched no *module* (it is a parameter target): noise from PEFT, not a problem here.
@pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys did not match:RuntimeWarning")
@pytest.mark.parametrize("name,targets,through_peft", LORA_CASES, ids=[c[0] for c in LORA_CASES])
def test_lora_on_moe_trains_and_round_trips(checkpoint, tmp_path, name, targets, through_peft):
    from lowrank.adapters import LoraConfig, apply_lora, load_adapter, save_adapter

    folder, hf = checkpoint(name)
    model = lowrank.load_model(folder)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=targets))
    adapted = {p.rsplit(".", 1)[-1] for p, m in model.named_modules() if hasattr(m, "lora_A")}
    assert "gate" not in adapted  # the router is never an adapter target
    if name != "deepseek-v2-lite":
        assert any(".experts.5." in p for p, m in model.named_modules() if hasattr(m, "lora_A"))
    g = torch.Generator().manual_seed(12)
    with torch.no_grad():  # B starts at zero: give the adapter an effect before training it
        for n, p in model.named_parameters():
            if n.endswith("lora_B.weight"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    ids = _ids(B=2, T=10, seed=13)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = _lm_loss(model(ids), ids)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    model.eval()
    base = {n.replace(".base_layer", ""): p for n, p in model.named_parameters() if "lora_" not in n}
    assert base.keys() == frozen.keys()
    assert all(torch.equal(base[n], frozen[n]) for n in frozen)

    out = save_adapter(model, tmp_path / "adapter")
    ids = _ids(B=2, T=9, seed=14)
    with torch.no_grad():
        ours = model(ids)
        again = load_adapter(lowrank.load_model(folder), out).eval()
        torch.testing.assert_close(again(ids), ours, **TOL[torch.float32])
        if through_peft:
            from peft import PeftModel
            from transformers import AutoModelForCausalLM

            peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), out).eval()
            torch.testing.assert_close(ours, peft_model(ids).logits, atol=1e-4, rtol=0)


def test_prefix_adapter_on_qwen_moe_matches_peft(checkpoint, tmp_path):
    """The MoE decoder keeps the dense attention's prefix hook (prefix positions included)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lowrank.adapters import save_adapter
    from lowrank.adapters.prefix import PrefixConfig, apply_prefix

    folder, _ = checkpoint("qwen3-moe")
    model = lowrank.load_model(folder)
    encoder = apply_prefix(model, PrefixConfig(num_virtual_tokens=5))
    g = torch.Generator().manual_seed(16)
    with torch.no_grad():
        for p in encoder.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    with pytest.warns(UserWarning, match="vLLM"):
        out = save_adapter(model, tmp_path / "prefix")
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), out).eval()
    ids = _ids(B=2, T=9, seed=17)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), peft_model(ids).logits, atol=1e-4, rtol=0)


def test_multi_token_prediction_layers_are_skipped(checkpoint, tmp_path):
    """Real V3 / R1 checkpoints carry the MTP module as layer num_hidden_layers; it is not
    part of the causal LM, and transformers skips it too."""
    import shutil

    from safetensors.torch import save_file

    folder, hf = checkpoint("deepseek-v3")
    copy = tmp_path / "v3-mtp"
    shutil.copytree(folder, copy)
    cfg = json.loads((copy / "config.json").read_text())
    n = cfg["num_hidden_layers"]
    extra = {f"model.layers.{n}.eh_proj.weight": torch.randn(5, 7), f"model.layers.{n}.enorm.weight": torch.randn(5)}
    save_file(extra, str(copy / "mtp.safetensors"), metadata={"format": "pt"})
    index = json.loads((copy / "model.safetensors.index.json").read_text())
    index["weight_map"].update({k: "mtp.safetensors" for k in extra})
    (copy / "model.safetensors.index.json").write_text(json.dumps(index))
    cfg.pop("num_nextn_predict_layers", None)
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(lowrank.CheckpointError, match=f"model.layers.{n}"):
        lowrank.load_model(copy)  # without num_nextn_predict_layers the extra layer is refused
    cfg["num_nextn_predict_layers"] = 1
    (copy / "config.json").write_text(json.dumps(cfg))
    model = lowrank.load_model(copy)
    ids = _ids(seed=21)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-4, rtol=0)


def test_prefix_is_refused_on_latent_attention(checkpoint):
    from lowrank.adapters.prefix import PrefixConfig, apply_prefix

    model = lowrank.load_model(checkpoint("deepseek-v3")[0])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lowrank.ConfigError, match="latent attention"):
        apply_prefix(model, PrefixConfig(num_virtual_tokens=3))
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_training_loss_adds_the_router_loss_token_weighted(checkpoint):
    """The loop's loss with aux_loss_coef: LM loss sum + coef * load-balancing loss * trained
    tokens, so dividing by the step's tokens averages the router loss like the LM loss."""
    from transformers.models.qwen2_moe.modeling_qwen2_moe import load_balancing_loss_func

    from lowrank.train.loop import causal_lm_loss

    folder, hf = checkpoint("qwen2-moe")
    model = lowrank.load_model(folder)
    ids = _ids(B=2, T=9, seed=8)
    labels = ids.clone()
    labels[:, :4] = -100
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        plain_sum, count = causal_lm_loss(model, batch)
        model.config.aux_loss_coef = 0.02
        with_aux, count2 = causal_lm_loss(model, batch)
        ref_lm = torch.nn.functional.cross_entropy(hf(ids).logits[:, :-1].reshape(-1, VOCAB).double(),
                                                   labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")
        router = hf(ids, output_router_logits=True).router_logits
    assert int(count) == int(count2) == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(plain_sum.double(), ref_lm, atol=1e-4, rtol=1e-6)
    aux = 0.02 * load_balancing_loss_func(router, 8, 2, None)
    torch.testing.assert_close(with_aux.double(), ref_lm + aux.double() * int(count), atol=1e-4, rtol=1e-6)
