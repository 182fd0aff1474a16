"""Preference tuning: DPO (and IPO), and the reference-free ORPO and SimPO, on any method.

Every pair is a prompt x with a chosen answer y_w and a rejected one y_l. Per sequence,
log pi(y|x) = sum over the answer's tokens of log p(token | before), and |y| its token count.

    DPO    l = -(1-e) logsig(b D) - e logsig(-b D),   D = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))
           (e: label smoothing, cDPO; e = 0 is DPO)      rewards r = b (log pi(y) - log ref(y))
    IPO    l = (D' - 1 / (2 b))^2,   D' = D with each log-prob divided by |y| (TRL's ipo)
    ORPO   l = NLL(y_w) - lam logsig(log odds(y_w) - log odds(y_l)),   odds(y) = p / (1 - p),
           p = exp(log pi(y) / |y|);  NLL(y_w): the chosen answers' token-mean cross-entropy
           rewards r = lam log pi(y) / |y|
    SimPO  l = -(1-e) logsig(M) - e logsig(-M),   M = b (log pi(y_w) / |y_w| - log pi(y_l) / |y_l|) - gamma
           rewards r = b log pi(y) / |y|

These are TRL's formulas (DPOTrainer, experimental ORPOTrainer, CPOTrainer with
loss_type="simpo" and cpo_alpha=0); docs/preference.md lists where lowrank departs from it.

A step's loss is the mean over the pairs of the whole step (all micro-batches, all ranks);
ORPO's NLL term is the token mean over the chosen answers of the step, as the SFT loss is:

    loss_step = sum_pairs l_pair / n_pairs  (+ sum_chosen_tokens nll / n_chosen_tokens for ORPO)

A micro-batch holds B pairs as 2B rows, chosen first (data/preference.py), so both answers
read the shared prompt in one forward. Per-token log-probs come from the fused linear
cross-entropy with reduction="none": no [tokens, vocab] logits.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import distributed as dist
from ..data.dataset import IGNORE_INDEX
from ..data.preference import make_pair_batches
from ..kernels import linear_cross_entropy
from .prepare import forward_autocast
from .reference import make_reference

# What a step logs, with TRL's names; each is a mean over the step's pairs.
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")


# ---- per-sequence log-probabilities ---------------------------------------------------------

def token_logps(model, batch: dict, fused: bool = True) -> torch.Tensor:
    """log p(labels[t + 1] | ids[:t + 1]) at each position t [rows, T], 0 where nothing is trained."""
    hidden = model.model(batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids"))
    targets = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)
    if fused:
        weight = model.lm_head.weight
        with torch.autocast(hidden.device.type, enabled=False):  # the op computes in fp32 itself
            nll, _ = linear_cross_entropy(hidden.to(weight.dtype), weight, targets, bias=model.lm_head.bias,
                                          reduction="none")
        return -nll
    logits = model.lm_head(hidden).float()
    logp = logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    return logp.masked_fill(targets == IGNORE_INDEX, 0.0)


def sequence_logps(model, batch: dict, fused: bool = True) -> torch.Tensor:
    """Summed answer log-probabilities of each row [rows]."""
    return token_logps(model, batch, fused).sum(-1)


def answer_lengths(labels: torch.Tensor) -> torch.Tensor:
    """Trained tokens of each row [rows] (labels shifted as the loss shifts them)."""
    return (labels[:, 1:] != IGNORE_INDEX).sum(-1)


# ---- the pair losses, on per-sequence log-probabilities ------------------------------------

def dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta: float, label_smoothing: float = 0.0,
             kind: str = "sigmoid", chosen_len=None, rejected_len=None):
    """(losses, chosen rewards, rejected rewards) [pairs] of DPO (kind "sigmoid") or IPO ("ipo":
    the log-ratios divided by the answer lengths)."""
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    if kind == "ipo":
        delta = chosen_ratio / chosen_len.clamp(min=1) - rejected_ratio / rejected_len.clamp(min=1)
        losses = (delta - 1 / (2 * beta)) ** 2
    else:
        losses = _smoothed(beta * (chosen_ratio - rejected_ratio), label_smoothing)
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def orpo_loss(chosen_avg, rejected_avg, lam: float):
    """(odds-ratio losses -lam logsig(log odds ratio), chosen rewards, rejected rewards) [pairs] from
    per-token average log-probabilities; the step adds the chosen answers' NLL."""
    log_odds = (chosen_avg - rejected_avg) - (log1mexp(chosen_avg) - log1mexp(rejected_avg))
    return -lam * F.logsigmoid(log_odds), lam * chosen_avg.detach(), lam * rejected_avg.detach()


def simpo_loss(chosen_avg, rejected_avg, beta: float, gamma: float, label_smoothing: float = 0.0):
    """(losses, chosen rewards, rejected rewards) [pairs] of SimPO from per-token average log-probabilities."""
    losses = _smoothed(beta * (chosen_avg - rejected_avg) - gamma, label_smoothing)
    return losses, beta * chosen_avg.detach(), beta * rejected_avg.detach()


def _smoothed(margin, label_smoothing: float):
    return -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation on either side of -log 2."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


# ---- one micro-batch --------------------------------------------------------------------------

class PreferenceLoss(torch.nn.Module):
    """The pair loss of a micro-batch, the unit DistributedDataParallel wraps.

    forward(batch) -> (pair_sum, nll_sum, stats): the summed pair losses, ORPO's summed chosen
    NLL (0 otherwise), and detached sums over the pairs [n_pairs, loss, *METRICS]. A pair
    without a trained token on either side (step_share's stand-in batch) counts for nothing.
    """

    def __init__(self, model, cfg, reference=None):
        super().__init__()
        self.model, self.cfg, self.reference = model, cfg, reference
        self.fused = cfg.loss == "fused"

    def forward(self, batch):
        cfg = self.cfg
        lengths = answer_lengths(batch["labels"])
        tokens = token_logps(self.model, batch, self.fused)
        logps = tokens.sum(-1)
        chosen, rejected = logps.chunk(2)
        chosen_len, rejected_len = lengths.chunk(2)
        valid = ((chosen_len > 0) & (rejected_len > 0)).to(logps.dtype)
        nll_sum = torch.zeros((), dtype=logps.dtype, device=logps.device)
        if cfg.objective == "dpo":
            ref = batch["ref_logps"] if "ref_logps" in batch else self.reference.logps(batch)
            ref_chosen, ref_rejected = ref.to(logps.dtype).chunk(2)
            if cfg.dpo_loss == "ipo":  # TRL logs the length-normalised log-probs of IPO
                shown = chosen / chosen_len.clamp(min=1), rejected / rejected_len.clamp(min=1)
            else:
                shown = chosen, rejected
            losses, r_chosen, r_rejected = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, cfg.resolved_beta(),
                                                    cfg.label_smoothing, cfg.dpo_loss, chosen_len, rejected_len)
        else:
            shown = chosen / chosen_len.clamp(min=1), rejected / rejected_len.clamp(min=1)
            if cfg.objective == "orpo":
                losses, r_chosen, r_rejected = orpo_loss(*shown, cfg.orpo_lambda)
                nll_sum = -(tokens.chunk(2)[0].sum(-1) * valid).sum()
            else:
                losses, r_chosen, r_rejected = simpo_loss(*shown, cfg.resolved_beta(), cfg.simpo_gamma,
                                                          cfg.label_smoothing)
        pair_sum = (losses * valid).sum()
        per_pair = torch.stack([valid, losses.detach(), r_chosen, r_rejected, (r_chosen > r_rejected).to(valid.dtype),
                                r_chosen - r_rejected, shown[0].detach(), shown[1].detach()])
        stats = (per_pair.double() * valid.double()).sum(-1)
        return pair_sum, nll_sum, stats


# ---- one optimizer step -----------------------------------------------------------------------

def preference_backward(run, micro_batches: list[dict]) -> tuple[float, dict]:
    """The backward passes of one optimizer step over this process's micro-batches (gradients
    left in .grad); returns (the step's loss, its metrics) over all processes."""
    info = run.dist
    trained = [b["labels"][:, 1:] != IGNORE_INDEX for b in micro_batches]
    chosen_tokens = sum(int(t.chunk(2)[0].sum()) for t in trained)
    tokens = sum(int(b["attention_mask"].sum()) for b, t in zip(micro_batches, trained) if t.any())
    counts = torch.tensor([_pairs(micro_batches), chosen_tokens, tokens, sum(int(t.sum()) for t in trained)],
                          dtype=torch.float64)
    n_pairs, n_chosen, tokens, n_trained = dist.all_reduce_sum(counts.to(run.device), info).tolist()
    # DDP averages gradients over ranks: scale so the average is the mean over the step's pairs.
    pair_scale, nll_scale = info.world_size / max(n_pairs, 1.0), info.world_size / max(n_chosen, 1.0)
    stats = torch.zeros(2 + len(METRICS), dtype=torch.float64, device=run.device)
    nll = torch.zeros((), dtype=torch.float64, device=run.device)
    for i, batch in enumerate(micro_batches):
        batch = {key: value.to(run.device, non_blocking=True) for key, value in batch.items()}
        with dist.no_sync(run.loss_module, sync=i == len(micro_batches) - 1):
            with forward_autocast(run):  # the forward only
                pair_sum, nll_sum, part = run.loss_module(batch)
                loss = pair_sum * pair_scale + nll_sum * nll_scale
            (run.scaler.scale(loss) if run.scaler else loss).backward()
        stats += part
        nll += nll_sum.detach().double()
    stats[1] = stats[1] + nll * n_pairs / max(n_chosen, 1.0)  # the NLL term enters the loss as a token mean
    row = _metrics(dist.all_reduce_sum(stats, info))
    loss = row.pop("loss")
    if run.config.objective == "orpo":
        row["nll_loss"] = dist.all_reduce_sum(nll, info).item() / max(n_chosen, 1.0)
    return loss, {"tokens": int(tokens), "trained_tokens": int(n_trained), "pairs": int(n_pairs), **row}


def _pairs(micro_batches) -> int:
    """Pairs with a trained token on both sides."""
    total = 0
    for b in micro_batches:
        chosen, rejected = answer_lengths(b["labels"]).chunk(2)
        total += int(((chosen > 0) & (rejected > 0)).sum())
    return total


def _metrics(stats: torch.Tensor) -> dict:
    n = max(float(stats[0]), 1.0)
    return {"loss": float(stats[1]) / n, **{name: float(v) / n for name, v in zip(METRICS, stats[2:])}}


# ---- the reference, evaluation ------------------------------------------------------------------

def build_reference(model, cfg):
    """DPO's reference for a model whose method is applied (reference.py); None for the other objectives."""
    if cfg.objective != "dpo":
        return None
    fused = cfg.loss == "fused"
    return make_reference(model, lambda m, batch: sequence_logps(m, batch, fused), cfg.method, cfg.init_adapter,
                          precompute=cfg.precompute_ref)


@torch.no_grad()
def evaluate_preference(run) -> dict:
    """eval_loss and eval_rewards/... over the eval pairs (shared out across processes)."""
    cfg, info = run.config, run.dist
    table = run.reference.tables.get("eval") if run.reference is not None else None
    batches = make_pair_batches(run.eval_examples, cfg.batch_size, run.pad_id, shuffle=False, ref_logps=table)
    stats = torch.zeros(2 + len(METRICS), dtype=torch.float64, device=run.device)
    totals = torch.zeros(2, dtype=torch.float64, device=run.device)  # ORPO: chosen NLL sum, chosen tokens
    loss_module = _unwrapped(run.loss_module)
    run.model.eval()
    try:
        for batch in batches[info.rank::info.world_size]:
            batch = {key: value.to(run.device) for key, value in batch.items()}
            with forward_autocast(run):
                _, nll_sum, part = loss_module(batch)
            stats += part
            totals += torch.stack([nll_sum.double(), answer_lengths(batch["labels"]).chunk(2)[0].sum().double()])
    finally:
        run.model.train()
    stats, totals = dist.all_reduce_sum(stats, info), dist.all_reduce_sum(totals, info)
    stats[1] += totals[0] * stats[0] / totals[1].clamp(min=1.0)
    row = _metrics(stats)
    return {"eval_loss": row.pop("loss"), **{f"eval_{k}": v for k, v in row.items()}}


def _unwrapped(module):
    return getattr(module, "module", module)  # DDP holds the loss module as .module


@torch.no_grad()
def precompute_reference(run) -> None:
    """--precompute-ref: the reference log-probabilities of every train and eval pair, once,
    before the first step; from then on they travel in the batches and the reference holds
    nothing. Processes share the work and all-reduce the tables."""
    cfg, info = run.config, run.dist
    tables = {}
    for name, pairs in (("train", run.train_examples), ("eval", run.eval_examples)):
        if not pairs:
            continue
        table = torch.zeros(len(pairs), 2, dtype=torch.float64, device=run.device)
        batches = make_pair_batches(pairs, cfg.batch_size, run.pad_id, shuffle=False)
        for batch in batches[info.rank::info.world_size]:
            index = batch.pop("pair_index").to(run.device)
            batch = {key: value.to(run.device) for key, value in batch.items()}
            with forward_autocast(run):
                table[index] = run.reference.logps(batch).double().view(2, -1).t()
        tables[name] = dist.all_reduce_sum(table, info).float().cpu()
    run.reference.precomputed(tables)


def preference_batches(run, epoch: int) -> list[dict]:
    """The pair batches of one epoch (every process builds the same list)."""
    cfg = run.config
    table = run.reference.tables.get("train") if run.reference is not None else None
    return make_pair_batches(run.train_examples, cfg.batch_size, run.pad_id, seed=cfg.seed + epoch,
                             shuffle=cfg.shuffle, ref_logps=table)
