"""lowrank/models/generation.py: sampling as transformers' logits processors compute it, the
repetition penalty in greedy decoding against transformers' generate, streaming with on_token,
and the defaults read from generation_config.json."""

import json

import pytest
import torch

import lowrank
from lowrank.models.generation import generation_defaults, process_logits
from tests.conftest import FIXTURES, TOL


def _inputs(seed, B=3, V=257, T=11):
    g = torch.Generator().manual_seed(seed)
    return 3 * torch.randn(B, V, generator=g), torch.randint(0, V, (B, T), generator=g)


@pytest.mark.parametrize("temperature,top_k,top_p,penalty", [
    (0.7, 0, 1.0, 1.0), (1.3, 13, 1.0, 1.0), (0.6, 0, 0.95, 1.0), (0.9, 40, 0.8, 1.0),
    (0.0, 0, 1.0, 1.3), (0.6, 50, 0.95, 1.15), (1.0, 1, 0.5, 0.8),
])
def test_processed_scores_equal_transformers_processors(temperature, top_k, top_p, penalty):
    from transformers import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper,
                              TopPLogitsWarper)

    logits, ids = _inputs(seed=int(temperature * 100) + top_k)
    ref = logits.clone()
    if penalty != 1.0:
        ref = RepetitionPenaltyLogitsProcessor(penalty)(ids, ref)
    if temperature > 0:  # transformers' sampling warpers, in generate's order
        for warper in (TemperatureLogitsWarper(temperature), top_k and TopKLogitsWarper(top_k),
                       top_p < 1 and TopPLogitsWarper(top_p)):
            if warper:
                ref = warper(ids, ref)
    ours = process_logits(logits, ids, temperature, top_k, top_p, penalty)
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    kept = ~torch.isinf(ref)
    torch.testing.assert_close(ours[kept], ref[kept], **TOL[torch.float32])
    if temperature > 0:  # the distribution sampled from
        torch.testing.assert_close(ours.softmax(-1), ref.softmax(-1), **TOL[torch.float32])


def test_greedy_with_repetition_penalty_equals_transformers_generate(tied):
    folder, hf = tied
    model = lowrank.load_model(folder)
    prompt = torch.randint(0, 257, (2, 9), generator=torch.Generator().manual_seed(4))
    ours = lowrank.generate(model, prompt, 14, repetition_penalty=1.7)
    ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=14, do_sample=False,
                      repetition_penalty=1.7, eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours, ref)
    plain = lowrank.generate(model, prompt, 14)
    assert not torch.equal(plain, ours)  # the penalty changed the answer: the test can fail


def test_top_k_1_sampling_is_greedy_and_on_token_streams_and_stops(tied):
    folder, _ = tied
    model = lowrank.load_model(folder)
    prompt = torch.randint(0, 257, (7,), generator=torch.Generator().manual_seed(5))
    greedy = lowrank.generate(model, prompt, 9)
    sampled = lowrank.generate(model, prompt, 9, temperature=1.5, top_k=1, generator=torch.Generator().manual_seed(1))
    assert torch.equal(greedy, sampled)
    seen = []
    out = lowrank.generate(model, prompt, 9, on_token=lambda t: seen.append(int(t[0])) or len(seen) == 4)
    assert seen == greedy[7:11].tolist() and torch.equal(out, greedy[:11])


def test_defaults_from_generation_config_as_transformers_reads_them(tmp_path):
    from transformers import GenerationConfig

    r1 = FIXTURES / "tokenizers" / "deepseek-r1-distill-qwen"
    ours, ref = generation_defaults(r1), GenerationConfig.from_pretrained(r1)
    assert ref.do_sample and ours["temperature"] == ref.temperature == 0.6
    assert ours["top_p"] == ref.top_p and ours["eos_token_id"] == [ref.eos_token_id]
    assert ours["top_k"] == GenerationConfig._get_default_generation_params()["top_k"]  # unset: transformers' 50
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False, "temperature": 0.7,
                                                                  "eos_token_id": [3, 5], "max_new_tokens": 40}))
    greedy = generation_defaults(tmp_path)
    assert greedy["temperature"] == 0.0 and greedy["eos_token_id"] == [3, 5] and greedy["max_new_tokens"] == 40
    assert generation_defaults(tmp_path / "nothing")["temperature"] == 0.0  # no file: greedy


@pytest.mark.parametrize("kw,message", [({"top_p": 0.0}, "top_p=0.0"), ({"top_k": -1}, "top_k=-1"),
                                        ({"repetition_penalty": 0.0}, "repetition_penalty=0.0"),
                                        ({"temperature": -1.0}, "temperature=-1.0")])
def test_bad_sampling_settings_are_config_errors(tied, kw, message):
    model = lowrank.load_model(tied[0])
    with pytest.raises(lowrank.ConfigError, match=message):
        lowrank.generate(model, torch.tensor([1, 2, 3]), 2, **kw)
