"""benchmarks/memory_estimate.py predicts GPU peaks by counting tensor bytes on fake tensors.
Reference: the CPU allocator's own peak (the profiler's allocation events) over the same steps run
on real tensors. The counting, the fake-tensor stand-ins and the undoing of every patch are checked."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

pytest.importorskip("peft")
BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def me():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import memory_estimate
    finally:
        sys.path.remove(str(BENCHMARKS))
    return memory_estimate


def allocator_peak(prof) -> int:
    """The highest total of bytes the CPU allocator held, above its total when profiling began."""
    events = []

    def walk(nodes):
        for n in nodes:
            if n.tag == _EventType.Allocation:
                events.append((n.start_time_ns, n.extra_fields.alloc_size))
            walk(n.children)

    walk(prof.profiler.kineto_results.experimental_event_tree())
    now = peak = 0
    for _, size in sorted(events):
        now += size
        peak = max(peak, now)
    return peak


def fake_and_measured(me, variant, config, shape):
    """(the fake-tensor estimate, the real-tensor one, the CPU allocator's peak over the real run)."""
    sdpa, module_to = F.scaled_dot_product_attention, torch.nn.Module.to
    fake = me.estimate(variant, config, shape, fake=True, pretend_cuda=False)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        real = me.estimate(variant, config, shape, fake=False, pretend_cuda=False)
    measured = allocator_peak(prof)

    assert F.scaled_dot_product_attention is sdpa and torch.nn.Module.to is module_to
    assert torch.get_default_dtype() == torch.float32
    assert fake["trainable"] == real["trainable"] > 0
    assert fake["weights_bytes"] == pytest.approx(real["weights_bytes"], rel=1e-3)
    assert real["peak_bytes"] == pytest.approx(measured, rel=0.01)
    assert fake["peak_bytes"] == pytest.approx(measured, rel=0.02)
    return fake, real, measured


@pytest.mark.parametrize("variant", ["lowrank", "peft"])
@pytest.mark.parametrize("checkpointing,tied", [(False, True), (True, False)])
def test_fake_count_matches_the_allocator_on_real_tensors(me, variant, checkpointing, tied):
    config = me.hf_config(dict(hidden_size=96, intermediate_size=232, num_hidden_layers=2, num_attention_heads=6,
                               num_key_value_heads=2, vocab_size=1999, tie_word_embeddings=tied))
    shape = {"batch": 3, "seq": 53, "r": 5, "checkpointing": checkpointing}
    fake, _, _ = fake_and_measured(me, variant, config, shape)
    assert fake["peak_bytes"] > 2 * fake["weights_bytes"]  # activations and the loss are counted, not just weights


def nf4_bytes(n: int, k: int) -> int:
    """What bitsandbytes stores for an [n, k] NF4 weight, double quantised: 4-bit codes, a uint8
    absmax per 64 values, an fp32 absmax per 256 of those."""
    blocks = -(-n * k // 64)
    return -(-n * k // 2) + blocks + 4 * -(-blocks // 256)


def test_qlora_count_matches_the_allocator_where_the_weights_dominate(me):
    """Few tokens, wide projections, checkpointing: the peak is mostly the NF4 weights and the bf16
    weight each base matmul dequantises (with its scratch), which the count must hold too."""
    h, inter, layers, vocab = 192, 1000, 3, 1001
    config = me.hf_config(dict(hidden_size=h, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=6,
                               num_key_value_heads=2, vocab_size=vocab, tie_word_embeddings=False))
    shape = {"batch": 1, "seq": 13, "r": 3, "checkpointing": True}
    fake, _, _ = fake_and_measured(me, "lowrank-nf4", config, shape)
    dense = me.estimate("lowrank", config, shape)

    kv = 2 * h // 6
    projections = [(h, h), (kv, h), (kv, h), (h, h), (inter, h), (inter, h), (h, inter)]
    biases = 2 * (h + 2 * kv)  # q/k/v biases stay bf16
    bf16 = 2 * sum(n * k for n, k in projections) + biases
    assert dense["weights_bytes"] - fake["weights_bytes"] == layers * (bf16 - sum(nf4_bytes(n, k) for n, k in projections)
                                                                       - biases)
    assert fake["peak_bytes"] - fake["weights_bytes"] > 2 * inter * h  # a dequantised MLP weight is counted


def test_checkpointing_and_the_fused_loss_lower_the_predicted_peak(me):
    config = me.hf_config(dict(hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=30011, tie_word_embeddings=True))
    shape = {"batch": 2, "seq": 301, "r": 3}
    runs = {(v, gc): me.estimate(v, config, dict(shape, checkpointing=gc), steps=1)
            for v in ("lowrank", "peft") for gc in (False, True)}
    for v in ("lowrank", "peft"):
        assert runs[v, True]["peak_bytes"] < runs[v, False]["peak_bytes"]
    # Full logits of 602 x 30011 in fp32 alone are 72 MB: the fused loss never holds them.
    logits = 2 * 301 * 30011 * 4
    assert runs["peft", True]["peak_bytes"] - runs["lowrank", True]["peak_bytes"] > logits
