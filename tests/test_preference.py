"""Preference tuning (lowrank.train.preference): DPO / IPO / ORPO / SimPO steps against a reference
written here with transformers + peft in float64 (each sequence alone, unpadded; the reference
model as TRL takes it), the loss formulas against the papers' forms on hand-built log-probs,
TRL's DPOTrainer on identical batches, and the CLI."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from lowrank.train.loop import TrainConfig, build_run, epoch_batches, finetune, step_share, train_step
from lowrank.train.preference import dpo_loss, orpo_loss, simpo_loss
from tests.conftest import TOL
from tests.train_helpers import read_metrics, run_module, tiny_chat_model_dir, write_preference_records

BETA1 = 0.9
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("preference")
    return root, tiny_chat_model_dir(root / "model", seed=4), write_preference_records(root / "pairs.jsonl", 11, seed=2)


def config(setup, **kw):
    root, model, data = setup
    # 11 pairs, 2 per micro-batch, 3 micro-batches per step: step 2 holds micro-batches of 2, 2 and 1
    # pairs, so the mean over pairs differs from the mean of micro-batch means; step 3 is epoch 1.
    base = dict(model=str(model), data=str(data), output=str(root / "out"), objective="dpo", method="lora", r=4,
                alpha=8.0, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"], batch_size=2, grad_accum=3,
                lr=1e-2, lr_scheduler="constant", weight_decay=0.1, max_grad_norm=0.5, max_steps=3, dtype="float32",
                device="cpu", progress=False, seed=0)
    return TrainConfig(**{**base, **kw})


# ---- the reference: transformers + peft, one sequence at a time, float64 ----------------------

def hf_logps(model, example) -> tuple[torch.Tensor, int]:
    """(summed answer log-prob, answer tokens) of one unpadded sequence under a transformers model."""
    ids, labels = torch.tensor([example["input_ids"]]), torch.tensor(example["labels"][1:])
    logits = model(input_ids=ids).logits[0, :-1].double()
    trained = labels != -100
    logp = logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[:, None]).squeeze(-1)
    return (logp * trained).sum(), int(trained.sum())


def pair_loss(cfg, policy, reference, pair):
    """(loss, chosen NLL sum, chosen tokens, metrics) of one pair, written from the formulas."""
    (pc, nc), (pr, nr) = hf_logps(policy, pair["chosen"]), hf_logps(policy, pair["rejected"])
    beta, eps = cfg.resolved_beta(), cfg.label_smoothing
    if cfg.objective == "dpo":
        with torch.no_grad():
            rc, rr = hf_logps(reference, pair["chosen"])[0], hf_logps(reference, pair["rejected"])[0]
        if cfg.dpo_loss == "ipo":
            loss = ((pc - rc) / nc - (pr - rr) / nr - 1 / (2 * beta)) ** 2
            shown = pc / nc, pr / nr
        else:
            d = beta * ((pc - rc) - (pr - rr))
            loss = -(1 - eps) * F.logsigmoid(d) - eps * F.logsigmoid(-d)
            shown = pc, pr
        rewards = beta * (pc - rc), beta * (pr - rr)
        return loss, torch.zeros(()), 0, (*rewards, *shown)
    ac, ar = pc / nc, pr / nr
    if cfg.objective == "orpo":
        odds = lambda a: torch.log(torch.exp(a) / (1 - torch.exp(a)))  # noqa: E731  log(p / (1 - p))
        loss = -cfg.orpo_lambda * F.logsigmoid(odds(ac) - odds(ar))
        return loss, -pc, nc, (cfg.orpo_lambda * ac, cfg.orpo_lambda * ar, ac, ar)
    m = beta * (ac - ar) - cfg.simpo_gamma
    loss = -(1 - eps) * F.logsigmoid(m) - eps * F.logsigmoid(-m)
    return loss, torch.zeros(()), 0, (beta * ac, beta * ar, ac, ar)


def reference_run(cfg, policy, reference, pairs, steps):
    """Train `policy` (transformers / peft, float64) over `steps` (lists of pair indices); returns
    each step's (loss, metrics). The step's loss: mean over its pairs (+ ORPO's token-mean NLL)."""
    params = [p for p in policy.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(BETA1, 0.999), eps=1e-8)
    rows, first = [], {}
    for indices in steps:
        parts = [pair_loss(cfg, policy, reference, pairs[i]) for i in indices]
        n_tokens = sum(p[2] for p in parts)
        loss = sum(p[0] for p in parts) / len(parts) + (sum(p[1] for p in parts) / n_tokens if n_tokens else 0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        for q in params:  # each weight's first nonzero gradient (see sound_weights)
            first.setdefault(q, torch.zeros_like(q))
            first[q] = torch.where(first[q] == 0, q.grad, first[q])
        opt.step()
        opt.zero_grad()
        r_c, r_r, l_c, l_r = (torch.stack([p[3][k].detach() for p in parts]) for k in range(4))
        metrics = dict(zip(METRICS, [r_c.mean(), r_r.mean(), (r_c > r_r).double().mean(), (r_c - r_r).mean(),
                                     l_c.mean(), l_r.mean()]))
        rows.append((loss.item(), {k: v.item() for k, v in metrics.items()}))
    reference_run.first_grads = first
    return rows


def sound_weights(p) -> torch.Tensor:
    """The weights of `p` whose first nonzero gradient in the last reference_run was not tiny.

    AdamW's first update of a weight is about lr * sign(gradient), whatever the gradient's size,
    so a weight whose first gradient sits at fp32's noise level (an element of lora_A in step 2,
    after B = 0 made every lora_A gradient 0 in step 1) moves by +-lr on a coin toss."""
    g = reference_run.first_grads[p].abs()
    return g > 1e-4 * g.max()


def peft_lora(cfg, run):
    """The transformers model with a peft LoRA holding lowrank's initial adapter weights (float64)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float64)
    peft = get_peft_model(hf, LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=0.0,
                                         target_modules=list(cfg.target_modules)))
    ours = {name: p for name, p in run.model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if p.requires_grad:
                p.copy_(ours[name.removeprefix("base_model.model.").replace(".default.", ".")].double())
    return peft


def run_steps(run):
    """lowrank's steps; returns (metric rows, the pair indices of each step)."""
    rows, steps = [], []
    for step in range(run.total_steps):
        epoch, k = divmod(step, run.steps_per_epoch)
        micro = step_share(run, epoch_batches(run, epoch), k)
        steps.append([i for b in micro for i in b["pair_index"].tolist()])
        rows.append(train_step(run, micro, step))
    return rows, steps


def check_rows(rows, ref_rows, beta):
    for row, (ref_loss, ref_metrics) in zip(rows, ref_rows, strict=True):
        assert row["loss"] == pytest.approx(ref_loss, rel=1e-5, abs=1e-6)
        # A reward is beta times a difference of two fp32 log-probs of size |logps|: fp32's 1e-5
        # applies to the log-probs, hence beta * 1e-5 * |logps| to the difference.
        scale = beta * max(abs(ref_metrics["logps/chosen"]), abs(ref_metrics["logps/rejected"]))
        for name in METRICS:
            assert row[name] == pytest.approx(ref_metrics[name], rel=1e-5, abs=1e-5 * scale), name


CASES = {
    "dpo": dict(),
    "dpo-smoothed-precomputed": dict(label_smoothing=0.2, precompute_ref=True),
    "ipo-plain-loss": dict(dpo_loss="ipo", loss="plain", beta=0.5),
    "orpo": dict(objective="orpo", orpo_lambda=0.3),
    "simpo": dict(objective="simpo", label_smoothing=0.1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_lora_steps_match_transformers_peft(setup, case):
    cfg = config(setup, **CASES[case])
    run = build_run(cfg)
    peft = peft_lora(cfg, run)
    rows, steps = run_steps(run)
    assert [len(s) for s in steps] == [6, 5, 6]  # unequal micro-batches in step 2

    class Off:  # the reference: the base, i.e. peft with its adapter switched off (TRL's null_ref_context)
        def __call__(self, **kw):
            with peft.disable_adapter():
                return peft(**kw)

    ref_rows = reference_run(cfg, peft, Off(), run.train_examples, steps)
    check_rows(rows, ref_rows, cfg.resolved_beta() or cfg.orpo_lambda)
    ours = {name: p for name, p in run.model.named_parameters() if p.requires_grad}
    for name, p in peft.named_parameters():
        if p.requires_grad:
            key = name.removeprefix("base_model.model.").replace(".default.", ".")
            sound = sound_weights(p)
            assert sound.float().mean() > 0.95
            torch.testing.assert_close(ours[key].double()[sound], p.detach()[sound], atol=1e-3 * cfg.lr, rtol=1e-4,
                                       msg=key)


@pytest.mark.parametrize("method", ["full", "freeze"])
def test_full_and_freeze_steps_match_a_frozen_transformers_copy(setup, method):
    from transformers import AutoModelForCausalLM

    cfg = config(setup, method=method, lr=1e-3, trainable_layers=1, max_steps=2)
    run = build_run(cfg)
    assert run.reference.mode == "initial_copy"
    policy = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float64)
    reference = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float64).requires_grad_(False)
    trained = set(n for n, p in run.model.named_parameters() if p.requires_grad)
    for name, p in policy.named_parameters():
        p.requires_grad_(name in trained)
    # Only the trained parameters are copied (for freeze: one layer of two).
    assert set(run.reference.copies) == trained
    rows, steps = run_steps(run)
    check_rows(rows, reference_run(cfg, policy, reference, run.train_examples, steps), cfg.resolved_beta())
    initial = dict(reference.named_parameters())
    for name, copy in run.reference.copies.items():  # the reference was not updated
        assert torch.equal(copy.double(), initial[name]), name


def test_init_adapter_reference_is_the_initial_adapter(setup, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lowrank.adapters.peft_format import save_adapter

    first = build_run(config(setup))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in first.model.named_parameters():
            if p.requires_grad:  # B != 0: the initial adapter differs from the base
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    save_adapter(first.model, tmp_path / "sft")
    cfg = config(setup, init_adapter=str(tmp_path / "sft"), max_steps=2)
    run = build_run(cfg)
    assert run.reference.mode == "initial_copy"
    assert all(".lora_" in name for name in run.reference.copies)  # only the adapter is copied
    load = lambda trainable: PeftModel.from_pretrained(  # noqa: E731
        AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float64), tmp_path / "sft", is_trainable=trainable)
    rows, steps = run_steps(run)
    check_rows(rows, reference_run(cfg, load(True), load(False), run.train_examples, steps), cfg.resolved_beta())


# ---- the formulas, on hand-built log-probabilities ------------------------------------------------

def test_pair_losses_follow_the_papers_formulas():
    g = torch.Generator().manual_seed(3)
    pc, pr, rc, rr = (-torch.rand(7, generator=g, dtype=torch.float64) * 40 - 0.5 for _ in range(4))
    nc, nr = torch.randint(1, 30, (7,), generator=g), torch.randint(1, 30, (7,), generator=g)
    beta, eps = 0.3, 0.15
    # DPO (Rafailov et al. eq. 7) with cDPO's smoothing: -E[(1-e) log s(h) + e log s(-h)]
    h = beta * ((pc - rc) - (pr - rr))
    loss, r_c, r_r = dpo_loss(pc, pr, rc, rr, beta, eps)
    expected = -(1 - eps) * torch.log(1 / (1 + torch.exp(-h))) - eps * torch.log(1 / (1 + torch.exp(h)))
    torch.testing.assert_close(loss, expected, **TOL[torch.float64])
    torch.testing.assert_close(r_c - r_r, h, **TOL[torch.float64])
    # IPO (Azar et al. eq. 17) on length-normalised log-ratios, as TRL's ipo
    loss, _, _ = dpo_loss(pc, pr, rc, rr, beta, kind="ipo", chosen_len=nc, rejected_len=nr)
    torch.testing.assert_close(loss, ((pc - rc) / nc - (pr - rr) / nr - 1 / (2 * beta)) ** 2, **TOL[torch.float64])
    # ORPO (Hong et al. eq. 6-7): odds(y) = P / (1 - P), P = exp(mean token log-prob)
    ac, ar = pc / nc, pr / nr
    P_c, P_r = torch.exp(ac), torch.exp(ar)
    loss, r_c, r_r = orpo_loss(ac, ar, 0.25)
    ratio = (P_c / (1 - P_c)) / (P_r / (1 - P_r))
    torch.testing.assert_close(loss, -0.25 * torch.log(torch.sigmoid(torch.log(ratio))), **TOL[torch.float64])
    torch.testing.assert_close(r_c, 0.25 * ac, **TOL[torch.float64])
    # ORPO near P = 1 (a short, confident answer): log(1 - P) without cancellation
    near = torch.tensor([-1e-9], dtype=torch.float64)
    assert torch.isfinite(orpo_loss(near, near - 1, 1.0)[0]).all()
    # SimPO (Meng et al. eq. 6): -log s(b/|y_w| log pi(y_w) - b/|y_l| log pi(y_l) - gamma)
    loss, r_c, r_r = simpo_loss(ac, ar, 2.0, 0.7)
    torch.testing.assert_close(loss, -torch.log(torch.sigmoid(2.0 * ac - 2.0 * ar - 0.7)), **TOL[torch.float64])
    torch.testing.assert_close(r_r, 2.0 * ar, **TOL[torch.float64])


# ---- TRL's DPOTrainer, on identical batches -------------------------------------------------------

def test_dpo_loss_and_metrics_match_trl_dpo_trainer(setup, tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoTokenizer

    cfg = config(setup, output=str(tmp_path / "out"), label_smoothing=0.0)
    run = build_run(cfg)
    peft = peft_lora(cfg, run).float()

    # Each sequence as TRL splits it: prompt ids, then the answer (the trained span) to its end.
    def split(example):
        first = next(i for i, y in enumerate(example["labels"]) if y != -100)
        last = max(i for i, y in enumerate(example["labels"]) if y != -100)
        return example["input_ids"][:first], example["input_ids"][first:last + 1]

    pairs = [run.train_examples[i] for i in (0, 3, 5)]
    features, ours = [], []
    for pair in pairs:
        (prompt, chosen), (prompt_r, rejected) = split(pair["chosen"]), split(pair["rejected"])
        assert prompt == prompt_r
        features.append({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected})
        ours.append({side: {"input_ids": prompt + ans, "labels": [-100] * len(prompt) + ans}
                     for side, ans in (("chosen", chosen), ("rejected", rejected))})
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), beta=0.1, per_device_train_batch_size=3,
                         report_to=[], use_cpu=True, bf16=False, logging_steps=1, max_length=None)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    data = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}] * 3)
    trainer = trl.DPOTrainer(model=peft, args=args, train_dataset=data, processing_class=tokenizer)
    # TRL keeps a copy of the adapter it is given as its reference ("ref": B = 0 here, i.e. the base,
    # as lowrank's fresh adapter switched off); B != 0 afterwards makes policy and reference differ.
    with torch.no_grad():
        for name, p in run.model.named_parameters():
            if name.endswith("lora_B.weight"):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.3)
        for name, p in peft.named_parameters():
            if p.requires_grad and ".default." in name:
                p.copy_(dict(run.model.named_parameters())[
                    name.removeprefix("base_model.model.").replace(".default.", ".")])

    batch = trainer.data_collator(features)
    trl_loss = trainer.compute_loss(trainer.model, batch)
    trl_loss.backward()
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    from lowrank.data.preference import collate_pairs

    batch = collate_pairs(ours, run.pad_id)
    pair_sum, _, stats = run.loss_module(batch)
    (pair_sum / 3).backward()
    assert (pair_sum / 3).item() == pytest.approx(trl_loss.item(), rel=1e-5)
    for k, name in enumerate(METRICS):
        assert stats[2 + k].item() / 3 == pytest.approx(trl_metrics[name], rel=1e-4, abs=1e-5), name
    grads = {n: p.grad for n, p in run.model.named_parameters() if p.requires_grad}
    for name, p in peft.named_parameters():
        if p.requires_grad and ".default." in name:
            key = name.removeprefix("base_model.model.").replace(".default.", ".")
            torch.testing.assert_close(grads[key], p.grad, atol=1e-5, rtol=1e-4, msg=key)


# ---- the command line -------------------------------------------------------------------------------

def test_cli_dpo_writes_trl_metrics_and_an_adapter(setup, tmp_path):
    root, model, data = setup
    out = tmp_path / "run"
    done = run_module("lowrank.train", ["--model", model, "--data", data, "--output", out, "--objective", "dpo",
                                        "--beta", "0.2", "--precompute-ref", "--max-steps", "2", "--batch-size", "2",
                                        "--grad-accum", "2", "--no-progress", "--device", "cpu"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    rows, _ = read_metrics(out)
    assert len(rows) == 2 and all(set(METRICS) <= set(r) for r in rows)
    assert rows[0]["loss"] == pytest.approx(math.log(2), rel=1e-5)  # step 0: the policy is the reference
    assert rows[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert "objective = \"dpo\"" in (out / "run.toml").read_text()
    bad = run_module("lowrank.train", ["--model", model, "--data", data, "--output", tmp_path / "bad",
                                       "--objective", "orpo", "--precompute-ref"], cwd=tmp_path)
    assert bad.returncode == 2 and "precompute_ref with objective='orpo'" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()
