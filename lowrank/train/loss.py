"""The language-model loss, summed over trained tokens so the step can divide once.

Labels are aligned with input_ids and shifted here: logits at position t predict labels[t + 1];
-100 marks positions that are not trained. A step made of several micro-batches (gradient
accumulation, later data-parallel ranks) must weight every trained token alike, so each
micro-batch returns its *sum* and the loop divides by the trained tokens of the whole step:

    loss = sum over micro-batches of loss_sum_k / n_step,   n_step = count_trainable_tokens(micro_batches)

The mean of per-micro-batch means would instead give a token of a short answer more weight than
one of a long answer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.dataset import IGNORE_INDEX


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss_sum, n_tokens): fp32 (or fp64) cross-entropy of logits [B, T, V] against labels [B, T] shifted
    by one, summed over the labels that are not -100, and their number (a long tensor)."""
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} must share [B, T]")
    targets = labels[:, 1:].reshape(-1)
    # at least fp32: a bf16 log-softmax over a 150k vocabulary loses the small probabilities
    logits = logits[:, :-1].reshape(-1, logits.shape[-1])
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    loss_sum = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum, (targets != IGNORE_INDEX).sum()


def count_trainable_tokens(micro_batches) -> int:
    """Trained tokens of an optimizer step: labels [B, T] of each micro-batch (tensors, or batch
    dicts holding "labels"), shifted as masked_cross_entropy shifts them."""
    total = 0
    for batch in micro_batches:
        labels = batch["labels"] if isinstance(batch, dict) else batch
        total += int((labels[:, 1:] != IGNORE_INDEX).sum())
    return total
