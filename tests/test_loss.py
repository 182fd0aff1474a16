"""masked_cross_entropy against F.cross_entropy, and gradient accumulation normalised per step."""

import pytest
import torch
import torch.nn.functional as F
from tests.conftest import TOL

from lowrank.data.batching import collate
from lowrank.train.loss import count_trainable_tokens, masked_cross_entropy


def random_labels(B, T, V, g, masked=0.4):
    labels = torch.randint(0, V, (B, T), generator=g)
    return labels.masked_fill(torch.rand(B, T, generator=g) < masked, -100)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_equals_cross_entropy_on_shifted_logits(dtype):
    g = torch.Generator().manual_seed(0)
    B, T, V = 3, 11, 37
    logits = torch.randn(B, T, V, generator=g).to(dtype)
    labels = random_labels(B, T, V, g)
    loss_sum, n = masked_cross_entropy(logits, labels)
    # the reference: position t predicts labels[t + 1], in float64 on the same logits
    ref_logits, ref_labels = logits[:, :-1].double().reshape(-1, V), labels[:, 1:].reshape(-1)
    keep = ref_labels != -100
    assert n.item() == keep.sum().item() > 0
    assert loss_sum.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    ref_mean = F.cross_entropy(ref_logits, ref_labels, ignore_index=-100)
    ref_sum = -ref_logits.log_softmax(-1)[keep].gather(1, ref_labels[keep, None]).sum()
    tol = TOL[torch.float64] if dtype == torch.float64 else TOL[torch.float32]  # the loss runs in fp32
    torch.testing.assert_close(loss_sum.double(), ref_sum, **tol)
    torch.testing.assert_close(loss_sum.double() / n, ref_mean, **tol)


def test_first_label_and_masked_labels_never_count():
    logits = torch.randn(1, 4, 5)
    loss_sum, n = masked_cross_entropy(logits, torch.tensor([[3, -100, -100, -100]]))
    assert n.item() == 0 and loss_sum.item() == 0.0
    with pytest.raises(ValueError, match="share"):
        masked_cross_entropy(logits, torch.zeros(1, 3, dtype=torch.long))


class TinyCausal(torch.nn.Module):
    """Embedding, a causal running mean over positions, a head: right padding changes nothing before it."""

    def __init__(self, vocab=29, dim=8):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.mix = torch.nn.Linear(dim, dim)
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        steps = torch.arange(1, x.shape[1] + 1, dtype=x.dtype)[None, :, None]
        return self.head(x + torch.tanh(self.mix(x.cumsum(1) / steps)))


def test_accumulated_micro_batches_equal_one_batch():
    g = torch.Generator().manual_seed(0)
    # micro-batches with very different answer lengths: 1-token answers, then 40-token ones
    examples = []
    for prompt, answer, count in ((5, 1, 4), (3, 40, 2), (20, 6, 3)):
        for _ in range(count):
            ids = torch.randint(0, 29, (prompt + answer,), generator=g).tolist()
            examples.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    micro_batches = [collate(examples[:4], 0), collate(examples[4:6], 0), collate(examples[6:], 0)]
    whole = collate(examples, 0)
    n_step = count_trainable_tokens(micro_batches)
    assert n_step == count_trainable_tokens([whole["labels"]]) == 4 * 1 + 2 * 40 + 3 * 6

    torch.manual_seed(0)
    model = TinyCausal().double()
    loss, _ = masked_cross_entropy(model(whole["input_ids"]), whole["labels"])
    loss = loss / n_step
    loss.backward()
    expected_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    accumulated = 0.0
    means = []
    for mb in micro_batches:
        loss_sum, n = masked_cross_entropy(model(mb["input_ids"]), mb["labels"])
        (loss_sum / n_step).backward()
        accumulated += loss_sum.detach() / n_step
        means.append(loss_sum.detach() / n)
    torch.testing.assert_close(accumulated, loss.detach(), **TOL[torch.float64])
    for p, expected in zip(model.parameters(), expected_grads):
        torch.testing.assert_close(p.grad, expected, **TOL[torch.float64])
    # the mean of per-micro-batch means is a different (wrong) number here
    assert abs(sum(means) / len(means) - loss.item()) > 1e-3
