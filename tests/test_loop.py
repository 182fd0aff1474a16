"""The training loop (lowrank.train.loop) against references: one
optimizer step against a transformers model trained by hand on the same examples, with the loss
normalised by the trained tokens of the whole step."""

import math

import pytest
import torch
import torch.nn.functional as F

from lowrank.adapters.peft_format import load_adapter
from lowrank.models.checkpoint import load_model
from lowrank.train.loop import (NonFiniteLossError, TrainConfig, build_run, epoch_batches, evaluate, finetune,
                                step_share, train_step)
from lowrank.train.state import latest_checkpoint
from tests.conftest import TOL
from tests.train_helpers import interrupted_run, read_metrics, tiny_model_dir, write_pretokenized

BETA1 = 0.9


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("training")
    return root, tiny_model_dir(root / "model"), write_pretokenized(root / "data.jsonl", 13, seed=3)


def config(setup, **kw):
    root, model, data = setup
    base = dict(model=str(model), data=str(data), output=str(root / "out"), method="full", batch_size=2,
                grad_accum=3, shuffle=False, lr_scheduler="constant", lr=1e-3, weight_decay=0.1, max_grad_norm=0.5,
                max_steps=1, dtype="float32", device="cpu", progress=False, seed=0)
    return TrainConfig(**{**base, **kw})


# ---- one optimizer step against transformers -------------------------------------------------

def reference_step(folder, examples, cfg, token_weighted=True):
    """transformers' model, the step's examples one by one (no padding), AdamW as the loop builds it.
    Returns (loss, clipped gradient by parameter name, parameters after the step)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    params = dict(hf.named_parameters())
    losses, counts = [], []
    for e in examples:
        ids, labels = torch.tensor([e["input_ids"]]), torch.tensor(e["labels"])
        logits = hf(ids).logits[0].double()
        losses.append(F.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="sum"))
        counts.append(int((labels[1:] != -100).sum()))
    if token_weighted:
        loss = sum(losses) / sum(counts)
    else:  # the mean of per-micro-batch means, which the loop must NOT compute
        bs = cfg.batch_size
        means = [sum(losses[i:i + bs]) / sum(counts[i:i + bs]) for i in range(0, len(losses), bs)]
        loss = sum(means) / len(means)
    loss.backward()
    loss = loss.detach()
    torch.nn.utils.clip_grad_norm_(hf.parameters(), cfg.max_grad_norm)
    grads = {name: p.grad.clone() for name, p in params.items()}
    decay = [p for p in params.values() if p.dim() >= 2]
    rest = [p for p in params.values() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(BETA1, 0.999), eps=1e-8)
    opt.step()
    return loss.item(), grads, {name: p.detach() for name, p in params.items()}


@pytest.mark.parametrize("loss,tiles", [("fused", 1), ("plain", 1), ("fused", 3)],
                         ids=["fused", "plain", "fused-mlp-tiles-3"])
def test_step_matches_transformers_with_token_weighted_accumulation(setup, loss, tiles, monkeypatch):
    # mlp_tiles=3 (with checkpointing, where it is meant to serve): every MLP runs over three
    # slices of the tokens and again over each in the backward; the step must not change.
    cfg = config(setup, loss=loss, mlp_tiles=tiles, gradient_checkpointing=tiles > 1)
    run = build_run(cfg)
    slices = []
    mlp = type(run.model.model.layers[0].mlp)
    inner = mlp._mlp
    monkeypatch.setattr(mlp, "_mlp", lambda self, x: slices.append(x.shape[:-1].numel()) or inner(self, x))
    batches = epoch_batches(run, 0)
    micro = step_share(run, batches, 0)
    assert len(micro) == 3
    examples = run.train_examples[:6]
    counts = [sum(int((torch.tensor(e["labels"][1:]) != -100).sum()) for e in examples[i:i + 2]) for i in (0, 2, 4)]
    assert len(set(counts)) > 1, "micro-batches must differ in trained tokens for the test to mean anything"

    row = train_step(run, micro, 0)
    layers, rows = len(run.model.model.layers), [b["input_ids"].numel() for b in micro]
    if tiles == 1:
        assert sorted(slices) == sorted(rows * layers)
    else:  # slices of a third, run in the forward and again in the backward
        assert max(slices) <= -(-max(rows) // tiles) and len(slices) > len(micro) * layers * tiles
    ref_loss, ref_grads, ref_params = reference_step(cfg.model, examples, cfg)
    _, wrong_grads, _ = reference_step(cfg.model, examples, cfg, token_weighted=False)

    assert row["loss"] == pytest.approx(ref_loss, rel=1e-5)
    assert row["trained_tokens"] == sum(counts)
    params = dict(run.model.named_parameters())
    assert set(params) == set(ref_params)
    for name, p in params.items():
        # AdamW's first moment after one step is (1 - beta1) * the clipped gradient.
        grad = run.optimizer.state[p]["exp_avg"] / (1 - BETA1)
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-6, rtol=1e-4, msg=name)
        # The update lr * m / (sqrt(v) + eps) is ill-conditioned where the gradient is ~eps (the key
        # bias's gradient is 0 in exact arithmetic: softmax ignores a shift shared by all keys).
        sound = ref_grads[name].abs() > 1e-5
        torch.testing.assert_close(p.detach()[sound], ref_params[name][sound], atol=2e-5, rtol=0, msg=name)
    # The mean of micro-batch means would have given a different gradient.
    name = "model.layers.0.mlp.down_proj.weight"
    assert not torch.allclose(ref_grads[name], wrong_grads[name], atol=1e-6, rtol=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_step_matches_fp32(setup, dtype):
    # On the CPU --dtype bfloat16 / float16 keeps the frozen weights in that dtype and runs under
    # autocast (float16 with a grad scaler); the step's loss and gradient follow fp32's.
    name = str(dtype).removeprefix("torch.")
    ref_row, ref = step_result(build_run(config(setup, method="lora", dropout=0.0, lr=1e-2)))
    run = build_run(config(setup, method="lora", dropout=0.0, lr=1e-2, dtype=name))
    assert run.model.model.layers[0].mlp.up_proj.base_layer.weight.dtype == dtype
    assert (run.scaler is not None) == (dtype == torch.float16)
    row, got = step_result(run)
    assert row["loss"] == pytest.approx(ref_row["loss"], rel=TOL[dtype]["rtol"])
    for key in ref:
        assert got[key].dtype == torch.float32  # trained weights and their moments stay fp32
        torch.testing.assert_close(got[key], ref[key], atol=1e-3, rtol=5e-2, msg=key)


def test_init_adapter_starts_from_a_saved_adapter(setup, tmp_path):
    first = finetune(config(setup, method="lora", r=4, alpha=8.0, target_modules=["q_proj", "v_proj"], max_steps=2,
                            grad_accum=1, lr=1e-2, output=str(tmp_path / "first")))
    run = build_run(config(setup, method="lora", init_adapter=str(first.adapter), lr=1e-2))  # r, targets: the adapter's
    saved = {k: v for k, v in first.model.state_dict().items() if "lora_" in k}
    loaded = {n: p for n, p in run.model.named_parameters() if p.requires_grad}
    assert set(loaded) == set(saved) and len(saved) == 2 * 2 * 2
    for name, p in loaded.items():
        assert torch.equal(p.detach(), saved[name]), name
    assert run.model.model.layers[0].self_attn.q_proj.lora_A.weight.shape[0] == 4
    train_step(run, step_share(run, epoch_batches(run, 0), 0), 0)
    assert not torch.equal(loaded["model.layers.0.self_attn.q_proj.lora_B.weight"].detach(),
                           saved["model.layers.0.self_attn.q_proj.lora_B.weight"])


def test_evaluate_matches_transformers(setup):
    from transformers import AutoModelForCausalLM

    run = build_run(config(setup, eval_split=0.4))
    assert len(run.eval_examples) == 5 and len(run.train_examples) == 8
    got = evaluate(run)
    hf = AutoModelForCausalLM.from_pretrained(run.config.model, dtype=torch.float32)
    total, n = 0.0, 0
    with torch.no_grad():
        for e in run.eval_examples:
            labels = torch.tensor(e["labels"])
            logits = hf(torch.tensor([e["input_ids"]])).logits[0].double()
            total += float(F.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="sum"))
            n += int((labels[1:] != -100).sum())
    assert got["eval_loss"] == pytest.approx(total / n, rel=1e-5)
    assert got["eval_ppl"] == pytest.approx(math.exp(total / n), rel=1e-5)


def step_result(run):
    row = train_step(run, step_share(run, epoch_batches(run, 0), 0), 0)
    return row, {name: run.optimizer.state[p]["exp_avg"].clone() for name, p in run.model.named_parameters()
                 if p.requires_grad}


@pytest.mark.parametrize("method", ["full", "prefix"])
def test_packing_and_gradient_checkpointing_give_the_same_step(setup, method):
    # One step over all 13 examples, so padded and packed batches hold the same tokens. With a
    # prefix, every packed example sees the prefix and starts at position P, as it does alone.
    padded_row, padded = step_result(build_run(config(setup, batch_size=13, grad_accum=1, method=method)))
    packed_run = build_run(config(setup, batch_size=4, grad_accum=8, packing=True, max_len=40, method=method))
    assert packed_run.steps_per_epoch == 1 and 1 < len(epoch_batches(packed_run, 0)) <= 8
    assert "position_ids" in epoch_batches(packed_run, 0)[0]
    packed_row, packed = step_result(packed_run)
    ckpt_row, ckpt = step_result(build_run(config(setup, batch_size=13, grad_accum=1, gradient_checkpointing=True,
                                                  method=method)))
    assert packed_row["trained_tokens"] == padded_row["trained_tokens"] == ckpt_row["trained_tokens"]
    assert packed_row["loss"] == pytest.approx(padded_row["loss"], rel=1e-5)
    assert ckpt_row["loss"] == pytest.approx(padded_row["loss"], rel=1e-6)
    for name in padded:
        torch.testing.assert_close(packed[name], padded[name], atol=1e-7, rtol=1e-4, msg=name)
        torch.testing.assert_close(ckpt[name], padded[name], **TOL[torch.float32], msg=name)


# ---- whole runs through finetune -----------------------------------------------------------

def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(ids)


@pytest.mark.parametrize("method", ["lora", "prefix", "freeze"])
def test_methods_train_their_parameters_and_save_what_they_trained(setup, tmp_path, method):
    cfg = config(setup, method=method, output=str(tmp_path / method), max_steps=3, lr=1e-2, grad_accum=1,
                 dropout=0.0, trainable_layers=1)
    before = {k: v.clone() for k, v in load_model(cfg.model).state_dict().items()}
    result = finetune(cfg)
    trained = result.model
    names = {n for n, p in trained.named_parameters() if p.requires_grad}
    state = trained.state_dict()
    changed = {k for k in before if k in state and not torch.equal(state[k], before[k])}
    base_keys = {k for k in before}
    if method == "freeze":
        # Only the last layer trains; everything else keeps its exact values.
        assert changed and all(k.startswith("model.layers.1.") for k in changed)
        assert names == {k for k in base_keys if k.startswith("model.layers.1.")}
    else:
        # LoRA keeps base weights under base_layer.*: compare those.
        base_after = {k.replace(".base_layer", ""): v for k, v in state.items()}
        assert all(torch.equal(base_after[k], before[k]) for k in base_keys)
        assert names and not (names & base_keys)
    assert len(read_metrics(cfg.output)[0]) == 3

    ids = torch.randint(0, 257, (2, 11), generator=torch.Generator().manual_seed(5))
    if method == "freeze":
        saved = load_model(result.adapter)
    else:
        saved = load_adapter(load_model(cfg.model), result.adapter)
    torch.testing.assert_close(logits(saved, ids), logits(trained, ids), **TOL[torch.float32])
    assert not torch.allclose(logits(load_model(cfg.model), ids), logits(trained, ids), atol=1e-3)


def test_same_seed_same_run_other_seed_other_run(setup, tmp_path):
    def run(seed, name):
        cfg = config(setup, method="lora", dropout=0.2, shuffle=True, seed=seed, max_steps=4, grad_accum=1,
                     output=str(tmp_path / name), lr=1e-2)
        result = finetune(cfg)
        return result.losses, {k: v.clone() for k, v in result.model.state_dict().items() if "lora_" in k}

    a_losses, a = run(1, "a")
    b_losses, b = run(1, "b")
    c_losses, c = run(2, "c")
    assert a_losses == b_losses
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a_losses != c_losses
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(setup, tmp_path, monkeypatch):
    import lowrank.train.loop as training

    real, calls = training.causal_lm_loss, []

    def poisoned(model, batch, fused=True):
        calls.append(1)
        loss, n = real(model, batch, fused)
        return (loss * float("nan") if len(calls) == 3 else loss), n

    monkeypatch.setattr(training, "causal_lm_loss", poisoned)
    cfg = config(setup, grad_accum=1, max_steps=5, save_every=1, output=str(tmp_path / "out"))
    with pytest.raises(NonFiniteLossError, match=r"step 3: loss nan.*step-2"):
        finetune(cfg)
    assert latest_checkpoint(tmp_path / "out" / "checkpoints").name == "step-2"
    assert [r["step"] for r in read_metrics(cfg.output)[0]] == [1, 2]
    assert not (tmp_path / "out" / "adapter").exists()


# ---- the epoch's batches: the lazy plan over the token cache gives the list code's batches ----------

@pytest.fixture(scope="module")
def alpaca(tmp_path_factory):
    """The shipped alpaca data tokenized without cache, as a list; and a cache folder for build_run."""
    from lowrank.data.dataset import load_dataset
    from lowrank.data.tokenizer import load_tokenizer
    from tests.conftest import DATA, FIXTURES

    qwen, data = FIXTURES / "tokenizers" / "qwen2.5-instruct", DATA / "alpaca_en_demo.json"
    examples = list(load_dataset(data, load_tokenizer(qwen), 256)[0])
    return dict(data=str(data), tokenizer=str(qwen), data_cache=str(tmp_path_factory.mktemp("cache"))), examples


@pytest.mark.parametrize("options", [dict(group_by_length=True), dict(packing=True),
                                     dict(packing=True, shuffle=False)])
def test_epoch_batches_and_eval_split_are_those_of_the_list_code(setup, alpaca, options):
    from tests import reference_batching as reference
    from tests.test_batching import same_batches

    paths, examples = alpaca
    cfg = config(setup, **{**paths, **dict(max_len=256, batch_size=4, grad_accum=1, shuffle=True, eval_split=0.1,
                                           seed=2), **options})
    run = build_run(cfg)
    train, evals = reference.split_examples(examples, cfg.eval_split, cfg.seed)
    assert list(run.train_examples) == train and list(run.eval_examples) == evals
    rows = reference.pack_rows(train, cfg.max_len, cfg.seed, cfg.shuffle) if cfg.packing else None
    for epoch in (0, 1):
        same_batches(epoch_batches(run, epoch), reference.epoch_batches(train, cfg, run.pad_id, rows, epoch))


def test_fractional_epochs_run_the_first_steps_of_the_epochs_and_resume_exactly(setup, tmp_path, monkeypatch):
    """13 examples, batch 2, grad_accum 3: 7 micro-batches, 3 steps per epoch. epochs=1.5 runs
    ceil(4.5) = 5 steps: the same run, step for step, as max_steps=5 (same schedule length)."""
    base = dict(method="lora", shuffle=True, lr_scheduler="cosine", lr=5e-3, dropout=0.1, save_every=2)
    by_epochs = finetune(config(setup, output=str(tmp_path / "e"), epochs=1.5, max_steps=0, **base))
    by_steps = finetune(config(setup, output=str(tmp_path / "s"), max_steps=5, **base))
    assert by_epochs.steps == 5 and len(by_epochs.losses) == 5
    assert by_epochs.losses == by_steps.losses
    assert read_metrics(tmp_path / "e")[0][-1]["epoch"] == pytest.approx(5 / 3, abs=1e-4)
    assert build_run(config(setup, epochs=0.5, max_steps=0)).total_steps == 2  # ceil(0.5 * 3)
    assert build_run(config(setup, epochs=1.1, max_steps=0, batch_size=1, grad_accum=13)).total_steps == 2

    # Ctrl-C as step 4 starts, after checkpoint step-2
    interrupted_run(monkeypatch, lambda: finetune(config(setup, output=str(tmp_path / "r"), epochs=1.5, max_steps=0,
                                                         **base)), at_step=3)
    resumed = finetune(config(setup, output=str(tmp_path / "r"), epochs=1.5, max_steps=0, resume=True, **base))
    assert [r["loss"] for r in read_metrics(tmp_path / "r")[0]] == pytest.approx(by_epochs.losses, rel=1e-6)
    a, b = by_epochs.model.state_dict(), resumed.model.state_dict()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0, msg=key)
