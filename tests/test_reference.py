"""lowrank.train.reference: DPO's reference is the step-0 model, held without a second copy of the
base: with a fresh LoRA or prefix adapter it is the base itself with the adapter switched off (its
log-probs equal transformers' base model's, before and after training), nothing is copied and
nothing of it is updated; --precompute-ref leaves only a table."""

import pytest
import torch

from lowrank.adapters.lora import LoraLinear, lora_disabled, lora_modules
from lowrank.adapters.prefix import prefix_disabled
from lowrank.data.preference import collate_pairs
from lowrank.train.loop import TrainConfig, build_run, epoch_batches, step_share, train_step
from lowrank.train.preference import sequence_logps
from tests.conftest import TOL
from tests.train_helpers import tiny_chat_model_dir, write_preference_records


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    return root, tiny_chat_model_dir(root / "model", seed=6), write_preference_records(root / "pairs.jsonl", 6, seed=8)


def config(setup, **kw):
    root, model, data = setup
    base = dict(model=str(model), data=str(data), output=str(root / "out"), objective="dpo", method="lora",
                dropout=0.0, batch_size=3, lr=5e-2, max_steps=2, dtype="float32", device="cpu", progress=False)
    return TrainConfig(**{**base, **kw})


def hf_base_logps(folder, pairs):
    """Summed answer log-probs of the base model in transformers, rows as collate_pairs orders them."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64)
    rows = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    out = []
    with torch.no_grad():
        for e in rows:
            logits = hf(input_ids=torch.tensor([e["input_ids"]])).logits[0, :-1]
            labels = torch.tensor(e["labels"][1:])
            logp = logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[:, None]).squeeze(-1)
            out.append((logp * (labels != -100)).sum())
    return torch.stack(out)


def train(run):
    for step in range(run.total_steps):
        train_step(run, step_share(run, epoch_batches(run, 0), step), step)


@pytest.mark.parametrize("method", ["lora", "prefix"])
def test_fresh_adapter_reference_is_the_base_and_copies_nothing(setup, method):
    cfg = config(setup, method=method, lr=5e-2 if method == "lora" else 1e-1)
    run = build_run(cfg)
    ref = run.reference
    assert ref.mode == "adapter_off" and ref.copies is None
    before = {name: (p.data_ptr(), p.detach().clone()) for name, p in run.model.named_parameters()}
    batch = collate_pairs(run.train_examples, run.pad_id)
    expected = hf_base_logps(cfg.model, run.train_examples)
    train(run)
    # No parameter was added, re-allocated or (outside the adapter) changed; the adapter was.
    params = dict(run.model.named_parameters())
    assert set(params) == set(before)
    for name, p in params.items():
        assert p.data_ptr() == before[name][0], name
        assert torch.equal(p.detach(), before[name][1]) != p.requires_grad, name
    # The reference is still the base, and the policy no longer is.
    torch.testing.assert_close(ref.logps(batch).double(), expected, **TOL[torch.float32])
    with torch.no_grad():
        policy = sequence_logps(run.model, batch).double()
    assert (policy - expected).abs().max() > 1e-3
    assert run.model.training  # the reference forward ran in eval mode and gave the mode back


def test_precompute_ref_keeps_a_table_only(setup):
    run = build_run(config(setup, method="full", precompute_ref=True, lr=1e-3))
    ref = run.reference
    assert ref.mode == "precomputed" and ref.copies is None and set(ref.tables) == {"train"}
    expected = hf_base_logps(run.config.model, run.train_examples)
    torch.testing.assert_close(ref.tables["train"].t().reshape(-1).double(), expected, **TOL[torch.float32])
    with pytest.raises(RuntimeError, match="precomputed"):
        ref.logps(collate_pairs(run.train_examples, run.pad_id))
    train(run)  # the batches carry the table
    torch.testing.assert_close(ref.tables["train"].t().reshape(-1).double(), expected, **TOL[torch.float32])


def test_disabling_contexts_restore_the_adapter_even_on_error(setup):
    lora = build_run(config(setup)).model
    wrapped = lora_modules(lora)
    with pytest.raises(KeyError):
        with lora_disabled(lora):
            assert not lora_modules(lora)
            assert not isinstance(lora.model.layers[0].self_attn.q_proj, LoraLinear)
            raise KeyError("inside")
    assert lora_modules(lora) == wrapped
    prefix = build_run(config(setup, method="prefix")).model
    hooks = [layer.self_attn.kv_prefix for layer in prefix.model.layers]
    with prefix_disabled(prefix):
        assert prefix.model.prefix_tokens() == 0
    assert [layer.self_attn.kv_prefix for layer in prefix.model.layers] == hooks and hooks[0] is not None
