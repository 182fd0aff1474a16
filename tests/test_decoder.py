"""Logits, hidden states and generation against transformers on tiny random checkpoints
shaped like the real configs in ../shared/fixtures/configs/."""

import json

import pytest
import torch

import lowrank

ARCHS = [
    "Qwen2.5-0.5B-Instruct",  # qwen2, tied embeddings, GQA 14/2
    "Qwen2.5-7B-Instruct",  # qwen2, untied
    "DeepSeek-R1-Distill-Qwen-1.5B",  # qwen2 with DeepSeek's ids, rope_theta 1e4
    "Qwen3-0.6B",  # qwen3: q/k norm, explicit head_dim
    "deepseek-llm-7b-base",  # llama, multi-head (32/32)
    "DeepSeek-R1-Distill-Llama-8B",  # llama, llama3 rope scaling, GQA 32/8
]


def ids_for(model_or_vocab, B=2, T=13, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 257, (B, T), generator=g)


def assert_logits_match(ours, hf, ids, **kw):
    with torch.no_grad():
        a = ours(ids, **kw)
        b = hf(ids, **kw).logits
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("layout,shard", [("5.x", None), ("4.x", "60KB")])
def test_logits_match_transformers(tiny_checkpoint, name, layout, shard):
    folder, hf = tiny_checkpoint(name, layout=layout, max_shard_size=shard)
    if shard:
        assert (folder / "model.safetensors.index.json").is_file()
    cfg = json.loads((folder / "config.json").read_text())
    assert ("rope_parameters" in cfg) == (layout == "5.x")
    model = lowrank.load_model(folder)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    assert_logits_match(model, hf, ids_for(model))


def test_hidden_states_before_lm_head(tiny_checkpoint):
    folder, hf = tiny_checkpoint("Qwen2.5-0.5B-Instruct")
    model = lowrank.load_model(folder)
    ids = ids_for(model)
    with torch.no_grad():
        hidden = model.model(ids)
        ref = hf.model(ids).last_hidden_state
    torch.testing.assert_close(hidden, ref, atol=1e-5, rtol=0)


def test_biases_are_honoured(tiny_checkpoint):
    folder, hf = tiny_checkpoint("deepseek-llm-7b-base", attention_bias=True, mlp_bias=True)
    model = lowrank.load_model(folder)
    assert model.model.layers[1].self_attn.o_proj.bias is not None
    assert model.model.layers[1].mlp.down_proj.bias is not None
    assert_logits_match(model, hf, ids_for(model))


@pytest.mark.parametrize(
    "scaling,max_pos",
    [
        ({"type": "linear", "factor": 2.0}, 4096),
        ({"type": "dynamic", "factor": 2.0}, 8),  # a 13-token input runs past 8 positions
        ({"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}, 131072),
        ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
          "beta_fast": 16, "beta_slow": 2}, 256),
    ],
)
def test_rope_scaling_matches_transformers(tiny_checkpoint, scaling, max_pos):
    folder, hf = tiny_checkpoint("Qwen2.5-0.5B-Instruct", layout="4.x", rope_scaling=scaling,
                                 max_position_embeddings=max_pos)
    model = lowrank.load_model(folder)
    assert_logits_match(model, hf, ids_for(model))


def test_bf16_checkpoint_loads_and_runs(tiny_checkpoint):
    folder, hf = tiny_checkpoint("Qwen2.5-0.5B-Instruct", dtype=torch.bfloat16)
    model = lowrank.load_model(folder)
    assert model.lm_head.weight.dtype == torch.bfloat16
    ids = ids_for(model)
    with torch.no_grad():
        ours = model(ids).float()
        ref = hf.to(torch.bfloat16)(ids).logits.float()
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, ref, atol=5e-2, rtol=5e-2)
    assert lowrank.load_model(folder, dtype=torch.float32).lm_head.weight.dtype == torch.float32


def test_right_padding_matches_each_sequence_alone(tiny_checkpoint):
    folder, _ = tiny_checkpoint("Qwen3-0.6B")
    model = lowrank.load_model(folder)
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 257, (n,), generator=g) for n in (13, 7, 10)]
    T = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
        ids[i, len(s):] = 5  # a real token id as padding, so only the mask keeps it out
    with torch.no_grad():
        batch = model(ids, attention_mask=mask)
        for i, s in enumerate(seqs):
            alone = model(s[None])
            torch.testing.assert_close(batch[i, : len(s)], alone[0], atol=1e-5, rtol=0)


def test_packed_rows_match_examples_alone(tiny_checkpoint):
    folder, _ = tiny_checkpoint("DeepSeek-R1-Distill-Llama-8B")
    model = lowrank.load_model(folder)
    g = torch.Generator().manual_seed(4)
    seqs = [torch.randint(0, 257, (n,), generator=g) for n in (6, 9, 4)]
    ids = torch.cat(seqs)[None]
    pos = torch.cat([torch.arange(len(s)) for s in seqs])[None]
    with torch.no_grad():
        packed = model(ids, position_ids=pos)[0]
        start = 0
        for s in seqs:
            torch.testing.assert_close(packed[start: start + len(s)], model(s[None])[0], atol=1e-5, rtol=0)
            start += len(s)


@pytest.mark.parametrize("name,shard", [("Qwen2.5-0.5B-Instruct", "5GB"), ("DeepSeek-R1-Distill-Llama-8B", "40KB")])
def test_save_round_trip_through_transformers(tiny_checkpoint, tmp_path, name, shard):
    from transformers import AutoModelForCausalLM

    folder, _ = tiny_checkpoint(name, layout="4.x")
    model = lowrank.load_model(folder)
    out = lowrank.save_model(model, tmp_path / "saved", max_shard_size=shard)
    saved_cfg = json.loads((out / "config.json").read_text())
    assert "rope_theta" in saved_cfg and "rope_parameters" not in saved_cfg
    assert (out / "model.safetensors.index.json").is_file() == (shard == "40KB")
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert_logits_match(model, hf, ids_for(model))
    again = lowrank.load_model(out)
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("name", ["Qwen2.5-0.5B-Instruct", "Qwen3-0.6B", "deepseek-llm-7b-base"])
def test_greedy_generation_matches_transformers(tiny_checkpoint, name):
    folder, hf = tiny_checkpoint(name)
    model = lowrank.load_model(folder)
    prompt = ids_for(model, B=1, T=7, seed=9)
    ours = lowrank.generate(model, prompt, max_new_tokens=12)
    ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                      eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours, ref)


def test_batched_left_padded_generation_matches_transformers(tiny_checkpoint):
    folder, hf = tiny_checkpoint("Qwen2.5-0.5B-Instruct")
    model = lowrank.load_model(folder)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 257, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :4], mask[1, :4] = 0, 0
    eos = int(ids[0, 3])  # a token that may well come up, so stopping is exercised
    ours = lowrank.generate(model, ids, max_new_tokens=10, attention_mask=mask, eos_token_id=eos, pad_token_id=0)
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(ours[:, : ref.shape[1]], ref)
    assert (ours[:, ref.shape[1]:] == 0).all()


def test_sampling_is_seeded_and_top_p_keeps_the_head(tiny_checkpoint):
    folder, _ = tiny_checkpoint("Qwen2.5-0.5B-Instruct")
    model = lowrank.load_model(folder)
    prompt = ids_for(model, B=1, T=5)
    a = lowrank.generate(model, prompt, 8, temperature=0.8, top_p=0.9, generator=torch.Generator().manual_seed(0))
    b = lowrank.generate(model, prompt, 8, temperature=0.8, top_p=0.9, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    # top_p that keeps only the most likely token is greedy decoding.
    c = lowrank.generate(model, prompt, 8, temperature=1.0, top_p=1e-6, generator=torch.Generator().manual_seed(1))
    assert torch.equal(c, lowrank.generate(model, prompt, 8))
