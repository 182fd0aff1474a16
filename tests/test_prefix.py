"""Prefix tuning / P-tuning v2 (lowrank/adapters/prefix.py): attention against a float64
formula, training invariants, and interop with peft's PREFIX_TUNING in both directions."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import lowrank
from lowrank.adapters.peft_format import load_adapter, save_adapter
from lowrank.adapters.prefix import (
    PrefixConfig,
    apply_prefix,
    fold_prefix,
    has_prefix,
    load_prefix_from_peft,
    prefix_to_peft,
    remove_prefix,
)
from lowrank.errors import CheckpointError, ConfigError
from lowrank.models import build_model, config_from_dict

from tests.conftest import TOL, randomize_, real_config, shrink

GQA, MHA = "Qwen2.5-0.5B-Instruct", "deepseek-llm-7b-base"  # 14/2 heads with q/k/v bias; 32/32


def tiny_model(name=GQA, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return randomize_(build_model(config_from_dict(shrink(real_config(name)))), seed).to(dtype)


def rand_ids(B, T, seed):
    return torch.randint(0, 257, (B, T), generator=torch.Generator().manual_seed(seed))


def train_steps(model, params, steps=2, seed=0, lr=1e-2):
    """A couple of AdamW steps on next-token loss over random ids (model(ids) -> logits)."""
    opt = torch.optim.AdamW(params, lr=lr)
    for step in range(steps):
        ids = rand_ids(3, 9, seed + step)
        logits = model(ids)
        logits = getattr(logits, "logits", logits)
        F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()


# ---- the attention a prefix produces, against the formula in float64 ----------------------


def reference_attention(attn, x, cos, sin, pk, pv, allowed):
    """softmax(q [pk; k]^T / sqrt(d)) [pv; v] over the allowed keys, then o_proj, by hand."""
    B, T, _ = x.shape
    H, Hkv, D = attn.n_heads, attn.n_kv, attn.head_dim
    q = (x @ attn.q_proj.weight.T + attn.q_proj.bias).view(B, T, H, D).transpose(1, 2)
    k = (x @ attn.k_proj.weight.T + attn.k_proj.bias).view(B, T, Hkv, D).transpose(1, 2)
    v = (x @ attn.v_proj.weight.T + attn.v_proj.bias).view(B, T, Hkv, D).transpose(1, 2)

    def rope(t):
        half = torch.cat([-t[..., D // 2:], t[..., : D // 2]], dim=-1)
        return t * cos[:, None] + half * sin[:, None]

    k = torch.cat([pk.expand(B, -1, -1, -1), rope(k)], dim=2)  # the prefix is not rotated
    v = torch.cat([pv.expand(B, -1, -1, -1), v], dim=2)
    k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
    scores = rope(q) @ k.transpose(-1, -2) / math.sqrt(D)
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    y = scores.softmax(-1) @ v
    return y.transpose(1, 2).reshape(B, T, H * D) @ attn.o_proj.weight.T


@pytest.mark.parametrize("padded", [False, True])
def test_attention_equals_explicit_concatenation_float64(padded):
    model = tiny_model(GQA, dtype=torch.float64)
    P, B, T = 7, 2, 11
    encoder = apply_prefix(model, PrefixConfig(num_virtual_tokens=P))
    attn = model.model.layers[1].self_attn
    seen = {}
    attn.register_forward_pre_hook(lambda m, args: seen.update(x=args[0], cos=args[1], sin=args[2]))
    attn.register_forward_hook(lambda m, args, out: seen.update(out=out))
    mask = torch.ones(B, T, dtype=torch.long)
    if padded:
        mask[1, 6:] = 0
    with torch.no_grad():
        model(rand_ids(B, T, 5), attention_mask=mask)
        # Layer 1's slice of PEFT's flat table: [P, layer, key|value, kv head, head_dim].
        table = encoder.embedding.weight.view(P, 2, 2, attn.n_kv, attn.head_dim)
        pk, pv = table[:, 1, 0].transpose(0, 1)[None], table[:, 1, 1].transpose(0, 1)[None]
        s, t = torch.arange(T)[None, :], torch.arange(T)[:, None]
        real = (s <= t) & (mask[:, None, :].bool() | (s == t))  # [B, T, T]
        allowed = torch.cat([torch.ones(B, T, P, dtype=torch.bool), real], dim=2)
        ref = reference_attention(attn, seen["x"], seen["cos"], seen["sin"], pk, pv, allowed)
    torch.testing.assert_close(seen["out"], ref, **TOL[torch.float64])
    # Real tokens sit after the P virtual ones: positions P .. P+T-1.
    inv_freq = 1.0 / model.config.rope_theta ** (torch.arange(0, attn.head_dim, 2, dtype=torch.float64) / attn.head_dim)
    angles = (torch.arange(P, P + T, dtype=torch.float64)[:, None] * inv_freq).repeat(1, 2)
    torch.testing.assert_close(seen["cos"][0], angles.cos(), atol=1e-5, rtol=0)


# ---- training: only the prefix learns, the table is fresh every forward -------------------


@pytest.mark.parametrize("projection", [False, True])
def test_only_prefix_parameters_change(projection):
    model = tiny_model(MHA)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    encoder = apply_prefix(model, PrefixConfig(num_virtual_tokens=5, projection=projection, projection_hidden=24))
    trainable = [p for p in model.parameters() if p.requires_grad]
    # Registered once, on model.prefix_encoder: the per-layer hooks are not modules.
    assert {id(p) for p in trainable} == {id(p) for p in encoder.parameters()}
    assert len(trainable) == (5 if projection else 1)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    train_steps(model, trainable)
    for key, value in base.items():
        assert torch.equal(model.state_dict()[key], value), key
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("prefix_encoder."))
    for key, value in encoder.state_dict().items():
        assert not torch.equal(value, before[key]), key


def test_projection_runs_once_per_forward_and_is_never_stale():
    model = tiny_model(GQA)
    encoder = apply_prefix(model, PrefixConfig(num_virtual_tokens=4, projection=True, projection_hidden=40))
    calls = []
    encoder.transform.register_forward_hook(lambda *a: calls.append(1))
    ids = rand_ids(2, 7, 8)
    model(ids)
    assert len(calls) == 1  # two layers, one MLP evaluation
    model.model(ids)  # hidden states only (the fused-loss path) recompute it too
    assert len(calls) == 2
    train_steps(model, list(encoder.parameters()), steps=1)
    # After the step, the output follows the new parameters: compare with a model given the
    # same prefixes from scratch.
    fresh = tiny_model(GQA)
    load_prefix_from_peft(fresh, *prefix_to_peft(model))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), fresh(ids), **TOL[torch.float32])


@pytest.mark.parametrize("projection", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(projection):
    model = tiny_model(GQA)
    encoder = apply_prefix(model, PrefixConfig(num_virtual_tokens=3, projection=projection, projection_hidden=20))
    ids = rand_ids(2, 9, 9)
    grads = []
    for checkpointing in (False, True):
        model.model.gradient_checkpointing = checkpointing
        model(ids).logsumexp(-1).mean().backward()
        grads.append([p.grad.clone() for p in encoder.parameters()])
        encoder.zero_grad()
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


# ---- masks, padding, packing, generation ------------------------------------------------


def test_right_padding_matches_each_sequence_alone():
    model = tiny_model(GQA)
    apply_prefix(model, PrefixConfig(num_virtual_tokens=6))
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 257, (n,), generator=g) for n in (12, 5, 9)]
    ids = torch.full((3, 12), 7)  # a real token id as padding: only the mask keeps it out
    mask = torch.zeros(3, 12, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    with torch.no_grad():
        batch = model(ids, attention_mask=mask)
        for i, s in enumerate(seqs):
            torch.testing.assert_close(batch[i, : len(s)], model(s[None])[0], **TOL[torch.float32])


def test_packed_rows_match_examples_alone():
    model = tiny_model(MHA)
    apply_prefix(model, PrefixConfig(num_virtual_tokens=4))
    seqs = [rand_ids(1, n, 20 + n)[0] for n in (6, 9, 4)]
    ids = torch.cat(seqs)[None]
    pos = torch.cat([torch.arange(len(s)) for s in seqs])[None]
    with torch.no_grad():
        packed = model(ids, position_ids=pos)[0]
        start = 0
        for s in seqs:
            torch.testing.assert_close(packed[start : start + len(s)], model(s[None])[0], **TOL[torch.float32])
            start += len(s)


def test_cached_generation_matches_the_full_sequence():
    model = tiny_model(MHA, seed=1)
    apply_prefix(model, PrefixConfig(num_virtual_tokens=5, projection=True))
    prompt = rand_ids(1, 8, 11)
    out = lowrank.generate(model, prompt, max_new_tokens=7)
    with torch.no_grad():
        full = model(out[:, :-1])  # no cache: every token sees the prefix and everything before it
    assert torch.equal(full[0, 7:].argmax(-1), out[0, 8:])


# ---- remove, fold, dtype ----------------------------------------------------------------


def test_remove_prefix_restores_the_model():
    model = tiny_model(GQA)
    ids = rand_ids(2, 6, 12)
    with torch.no_grad():
        base = model(ids)
    apply_prefix(model, PrefixConfig(num_virtual_tokens=3))
    with pytest.raises(ConfigError, match="already has a prefix"):
        apply_prefix(model, PrefixConfig(num_virtual_tokens=3))
    with torch.no_grad():
        assert not torch.allclose(model(ids), base)
    copied = copy.deepcopy(model)  # a copy carries its own prefix and hook
    with torch.no_grad():
        with_prefix = model(ids)
        copied.prefix_encoder.embedding.weight.mul_(-1.0)
        assert torch.equal(model(ids), with_prefix) and not torch.allclose(copied(ids), with_prefix)
    remove_prefix(copied)
    remove_prefix(model)
    assert not has_prefix(model) and all(p.requires_grad for p in model.parameters())
    assert not model.model._forward_pre_hooks and not copied.model._forward_pre_hooks
    assert "prefix_encoder.embedding.weight" not in model.state_dict()
    with torch.no_grad():
        assert torch.equal(model(ids), base) and torch.equal(copied(ids), base)


def test_fold_prefix_keeps_outputs_and_drops_the_mlp():
    model = tiny_model(GQA)
    encoder = apply_prefix(model, PrefixConfig(num_virtual_tokens=4, projection=True, projection_hidden=48))
    ids = rand_ids(2, 8, 13)
    with torch.no_grad():
        before = model(ids)
        table = encoder.table().clone()
    fold_prefix(model)
    assert encoder.transform is None and list(encoder.state_dict()) == ["embedding.weight"]
    assert torch.equal(encoder.embedding.weight, table)
    assert [p is encoder.embedding.weight for p in model.parameters() if p.requires_grad] == [True]
    with torch.no_grad():
        torch.testing.assert_close(model(ids), before, **TOL[torch.float32])


def test_prefix_on_a_bf16_model_trains_in_fp32():
    model = tiny_model(GQA)
    encoder = apply_prefix(model, PrefixConfig(num_virtual_tokens=4))
    bf16 = tiny_model(GQA).to(torch.bfloat16)
    assert apply_prefix(bf16, PrefixConfig(num_virtual_tokens=2)).embedding.weight.dtype == torch.float32
    load_prefix_from_peft(bf16, *prefix_to_peft(model))  # replaces the prefix it had
    assert bf16.prefix_encoder.num_tokens == 4 and bf16.prefix_encoder.embedding.weight.dtype == torch.float32
    assert torch.equal(bf16.prefix_encoder.embedding.weight, encoder.embedding.weight)
    ids = rand_ids(2, 9, 14)
    with torch.no_grad():
        ours, ref, bare = bf16(ids).float(), model(ids), tiny_model(GQA)(ids)
    # Elementwise bf16 error grows with the logits' scale; judge the whole tensor instead:
    # bf16 stays within 3% of fp32 while the prefix itself moves the logits by far more.
    assert (ours - ref).norm() < 3e-2 * ref.norm() < (bare - ref).norm()


# ---- bad adapters: one CheckpointError naming the key, the model untouched ---------------


def _bad(change):
    def apply(cfg, tensors):
        cfg, tensors = dict(cfg), dict(tensors)
        change(cfg, tensors)
        return cfg, tensors

    return apply


BAD = {
    "num_layers": _bad(lambda c, t: c.update(num_layers=3)),
    "num_attention_heads": _bad(lambda c, t: c.update(num_attention_heads=14)),
    "token_dim": _bad(lambda c, t: c.update(token_dim=224)),
    "peft_type": _bad(lambda c, t: c.update(peft_type="LORA")),
    "task_type": _bad(lambda c, t: c.update(task_type="SEQ_2_SEQ_LM")),
    "num_virtual_tokens": _bad(lambda c, t: c.update(num_virtual_tokens=0)),
    "num_transformer_submodules": _bad(lambda c, t: c.update(num_transformer_submodules=2)),
    "missing": _bad(lambda c, t: c.pop("num_layers")),
    "prompt_embeddings": _bad(lambda c, t: t.update(prompt_embeddings=t["prompt_embeddings"][:, :-2])),
    "extra.weight": _bad(lambda c, t: t.update({"extra.weight": torch.ones(2)})),
    "gone": _bad(lambda c, t: t.pop("prompt_embeddings")),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_adapter_raises_naming_the_key_and_leaves_the_model(case):
    source = tiny_model(GQA)
    apply_prefix(source, PrefixConfig(num_virtual_tokens=5))
    cfg, tensors = BAD[case](*prefix_to_peft(source))
    model = tiny_model(GQA)
    apply_prefix(model, PrefixConfig(num_virtual_tokens=3))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    key = {"missing": "num_layers", "gone": "prompt_embeddings"}.get(case, case)
    with pytest.raises(CheckpointError, match=key) as failure:
        load_prefix_from_peft(model, cfg, tensors, folder="runs/adapter")
    assert str(failure.value).startswith("runs/adapter/adapter_")  # the file at fault
    assert model.prefix_encoder.num_tokens == 3
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["prefix_encoder.embedding.weight"]


# ---- interop with peft -------------------------------------------------------------------


def peft_prefix_model(hf, P, projection, seed=0):
    from peft import PrefixTuningConfig, get_peft_model

    torch.manual_seed(seed)
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=projection,
                                encoder_hidden_size=24 if projection else None)
    return get_peft_model(hf, config)


@pytest.mark.parametrize("name,projection", [(GQA, True), (MHA, False), (GQA, False)])
def test_logits_and_gradients_match_peft(tiny_checkpoint, name, projection):
    folder, hf = tiny_checkpoint(name)
    pm = peft_prefix_model(hf, 6, projection)
    model = lowrank.load_model(folder)
    encoder = apply_prefix(model, PrefixConfig(num_virtual_tokens=6, projection=projection, projection_hidden=24))
    encoder.load_state_dict(pm.prompt_encoder["default"].state_dict())  # PEFT's parameter names
    ids, mask = rand_ids(2, 10, 15), torch.ones(2, 10, dtype=torch.long)
    mask[1, 7:] = 0
    ours, ref = model(ids, attention_mask=mask), pm(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(ours[0], ref[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(ours[1, :7], ref[1, :7], atol=1e-4, rtol=0)
    ours[1, :7].logsumexp(-1).sum().backward()
    ref[1, :7].logsumexp(-1).sum().backward()
    for n, p in pm.prompt_encoder["default"].named_parameters():
        torch.testing.assert_close(encoder.get_parameter(n).grad, p.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name,projection", [(GQA, True), (MHA, False)])
def test_peft_trained_adapter_loads_with_the_same_logits(tiny_checkpoint, tmp_path, name, projection):
    folder, hf = tiny_checkpoint(name)
    pm = peft_prefix_model(hf, 5, projection, seed=1)
    train_steps(pm, [p for p in pm.parameters() if p.requires_grad], seed=30)
    pm.save_pretrained(tmp_path / "adapter")
    pm.eval()
    model = lowrank.load_model(folder)
    load_adapter(model, tmp_path / "adapter")
    ids = rand_ids(2, 11, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), pm(input_ids=ids).logits, atol=1e-4, rtol=0)


@pytest.mark.filterwarnings("ignore:save_adapter")  # its note that vLLM serves LoRA adapters only
@pytest.mark.parametrize("name,projection", [(GQA, True), (MHA, False)])
def test_lowrank_adapter_loads_in_peft_with_the_same_logits(tiny_checkpoint, tmp_path, name, projection):
    from peft import PeftModel

    folder, hf = tiny_checkpoint(name)
    model = lowrank.load_model(folder)
    encoder = apply_prefix(model, PrefixConfig(num_virtual_tokens=7, projection=projection))
    train_steps(model, list(encoder.parameters()), seed=40)
    save_adapter(model, tmp_path / "adapter")
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    table = load_file(tmp_path / "adapter" / "adapter_model.safetensors")["prompt_embeddings"]
    cfg = model.config
    assert adapter_config["peft_type"] == "PREFIX_TUNING" and adapter_config["num_virtual_tokens"] == 7
    assert adapter_config["num_attention_heads"] == cfg.num_key_value_heads
    assert adapter_config["token_dim"] == cfg.num_key_value_heads * cfg.head_dim
    assert adapter_config["prefix_projection"] is False  # the saved table is folded
    with torch.no_grad():
        assert torch.equal(table, encoder.table())
    pm = PeftModel.from_pretrained(hf, tmp_path / "adapter")
    ids = rand_ids(3, 9, 17)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), pm(input_ids=ids).logits, atol=1e-4, rtol=0)


def peft_greedy_full_forward(pm, ids, mask, steps):
    """Greedy decoding by PEFT's full forward pass, one token at a time, no cache: positions
    count real tokens (as generate derives them from the mask). The oracle for cached
    generation, because transformers 5.24's generate drops PEFT's prefix from the cache
    ("Both `past_key_values` and `cache` are set ... ignoring deprecated `past_key_values`")."""
    with torch.no_grad():
        for _ in range(steps):
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            nxt = pm(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1].argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    return ids


def test_left_padded_greedy_generation_matches_peft(tiny_checkpoint):
    folder, hf = tiny_checkpoint(GQA)
    pm = peft_prefix_model(hf, 4, projection=False, seed=2).eval()
    model = lowrank.load_model(folder)
    apply_prefix(model, PrefixConfig(num_virtual_tokens=4)).load_state_dict(pm.prompt_encoder["default"].state_dict())
    ids, mask = rand_ids(2, 9, 18), torch.ones(2, 9, dtype=torch.long)
    ids[1, :3], mask[1, :3] = 0, 0
    ref = peft_greedy_full_forward(pm, ids, mask, steps=8)
    ours = lowrank.generate(model, ids, max_new_tokens=8, attention_mask=mask, pad_token_id=0)
    assert torch.equal(ours, ref)
    # The prefix changes the answer: a test that would pass without it proves nothing.
    plain = lowrank.generate(lowrank.load_model(folder), ids, max_new_tokens=8, attention_mask=mask, pad_token_id=0)
    assert not torch.equal(plain, ref)


def test_explicit_position_ids_match_peft(tiny_checkpoint):
    folder, hf = tiny_checkpoint(MHA)
    pm = peft_prefix_model(hf, 4, projection=False, seed=3)
    model = lowrank.load_model(folder)
    apply_prefix(model, PrefixConfig(num_virtual_tokens=4)).load_state_dict(pm.prompt_encoder["default"].state_dict())
    ids, pos = rand_ids(2, 8, 19), torch.arange(2, 10).expand(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, position_ids=pos), pm(input_ids=ids, position_ids=pos).logits,
                                   atol=1e-4, rtol=0)
