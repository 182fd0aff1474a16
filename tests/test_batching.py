"""lowrank.data.batching: padded batches, length grouping and packing; packed rows give the same
per-token losses as the examples run one by one."""

import math

import pytest
import torch
import torch.nn.functional as F
from tests.conftest import DATA, FIXTURES, TOL

from lowrank.data.batching import collate, collate_packed, length_grouped_order, make_batches, pack
from lowrank.data.dataset import load_dataset
from lowrank.data.tokenizer import load_tokenizer
from lowrank.errors import ConfigError, DataError
from lowrank.train.loss import masked_cross_entropy
from tests import reference_batching as reference

QWEN = FIXTURES / "tokenizers" / "qwen2.5-instruct"
IDENTITY = {"name": "Lowrank", "author": "the lowrank team"}


@pytest.fixture(scope="module")
def qwen():
    return load_tokenizer(QWEN)


# ---- batching ------------------------------------------------------------------------------------

def synthetic_examples(n, vocab=53, seed=0):
    """Examples of varied lengths: a prompt (-100) then an answer."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        prompt, answer = torch.randint(1, 12, (2,), generator=g).tolist()
        ids = torch.randint(0, vocab, (prompt + answer,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def test_collate_pads_right():
    examples = synthetic_examples(3)
    batch = collate(examples, pad_id=0)
    width = max(len(e["input_ids"]) for e in examples)
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    for key in batch:
        assert batch[key].shape == (3, width) and batch[key].dtype == torch.long
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        assert batch["input_ids"][row, :n].tolist() == e["input_ids"] and (batch["input_ids"][row, n:] == 0).all()
        assert batch["labels"][row, :n].tolist() == e["labels"] and (batch["labels"][row, n:] == -100).all()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
    with pytest.raises(ConfigError, match="pad"):
        collate(examples, pad_id=None)


def test_length_grouped_order_is_deterministic_and_groups():
    lengths = [len(e["input_ids"]) for e in synthetic_examples(400)]
    batches = length_grouped_order(lengths, batch_size=8, seed=3)
    assert batches == length_grouped_order(lengths, batch_size=8, seed=3)
    assert batches != length_grouped_order(lengths, batch_size=8, seed=4)
    assert sorted(i for b in batches for i in b) == list(range(400))

    def padded(bs):
        return sum(len(b) * max(lengths[i] for i in b) for b in bs)

    order = torch.randperm(400, generator=torch.Generator().manual_seed(3)).tolist()
    assert padded(batches) < padded([order[i:i + 8] for i in range(0, 400, 8)])
    assert make_batches(synthetic_examples(40), 4, 0, seed=1, group_by_length=True)[0]["input_ids"].shape[0] == 4


def test_packing_rows(qwen):
    examples, _ = load_dataset(DATA / "identity.json", qwen, 128, replacements=IDENTITY)
    rows = pack(examples, max_len=256)
    assert sorted(i for row in rows for i in row) == list(range(len(examples)))
    assert all(sum(len(examples[i]["input_ids"]) for i in row) <= 256 for row in rows)
    assert len(rows) < len(examples) / 2
    batch = collate_packed([[examples[i] for i in row] for row in rows], pad_id=qwen.pad_token_id, width=256)
    for r, row in enumerate(rows):
        start = 0
        for seq, i in enumerate(row, start=1):
            e, n = examples[i], len(examples[i]["input_ids"])
            assert batch["input_ids"][r, start:start + n].tolist() == e["input_ids"]
            assert batch["position_ids"][r, start:start + n].tolist() == list(range(n))
            assert (batch["seq_ids"][r, start:start + n] == seq).all()
            # the first token of each example is never a target: nothing predicts across examples
            assert batch["labels"][r, start].item() == -100
            assert batch["labels"][r, start + 1:start + n].tolist() == e["labels"][1:]
            start += n
        assert (batch["labels"][r, start:] == -100).all() and (batch["seq_ids"][r, start:] == 0).all()
        assert (batch["attention_mask"][r, start:] == 0).all() and (batch["attention_mask"][r, :start] == 1).all()
    with pytest.raises(DataError, match="max_len"):
        pack(examples, max_len=8)


class TinyCausalLM(torch.nn.Module):
    """One attention layer whose mask is built from seq_ids and causality, the way a model
    consumes a packed batch; positions from position_ids."""

    def __init__(self, vocab=53, dim=16, max_pos=64):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.pos = torch.nn.Embedding(max_pos, dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, input_ids, position_ids, seq_ids):
        x = self.embed(input_ids) + self.pos(position_ids)
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        T = input_ids.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        mask = (seq_ids[:, :, None] == seq_ids[:, None, :]) & causal & (seq_ids[:, :, None] != 0)
        scores = (q @ k.transpose(1, 2)) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(~mask, float("-inf")).nan_to_num(neginf=-1e30)  # padding rows: no NaN
        return self.head(x + scores.softmax(-1) @ v)


def test_packed_losses_equal_unpacked_losses():
    torch.manual_seed(0)
    model = TinyCausalLM().double()
    examples = synthetic_examples(12, seed=1)
    rows = pack(examples, max_len=40)  # make_batches packs the same way when shuffle=False
    batches = make_batches(examples, batch_size=2, pad_id=0, shuffle=False, packing=True, max_len=40)
    assert sum(b["input_ids"].shape[0] for b in batches) == len(rows) > 1
    for b, batch in enumerate(batches):
        logits = model(batch["input_ids"], batch["position_ids"], batch["seq_ids"])
        targets = batch["labels"][:, 1:]
        per_token = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), reduction="none",
                                    ignore_index=-100).view(targets.shape)
        for r in range(batch["input_ids"].shape[0]):
            for seq, index in enumerate(rows[2 * b + r], start=1):
                # a target belongs to the example of the position it sits at
                packed = per_token[r][batch["seq_ids"][r, 1:] == seq].sum()
                e = examples[index]
                n = len(e["input_ids"])
                alone, _ = masked_cross_entropy(
                    model(torch.tensor([e["input_ids"]]), torch.arange(n)[None], torch.ones(1, n, dtype=torch.long)),
                    torch.tensor([e["labels"]]))
                torch.testing.assert_close(packed, alone, **TOL[torch.float64])


# ---- the array-backed plan against the list code it replaced (tests/reference_batching.py) -------

def same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.fixture(scope="module")
def alpaca(qwen):
    examples, _ = load_dataset(DATA / "alpaca_en_demo.json", qwen, 256)
    return examples


@pytest.mark.parametrize("options", [dict(shuffle=True), dict(shuffle=False), dict(group_by_length=True),
                                     dict(packing=True, max_len=512), dict(packing=True, max_len=300, shuffle=False)])
def test_batches_equal_the_list_code_on_the_shipped_data(alpaca, options):
    listed = list(alpaca)
    for seed in (0, 7):
        kw = dict(seed=seed, **options)
        same_batches(make_batches(alpaca, 4, 151643, **kw), reference.make_batches(listed, 4, 151643, **kw))
    lengths = [len(e["input_ids"]) for e in listed]
    assert length_grouped_order(lengths, 3, seed=5) == reference.length_grouped_order(lengths, 3, seed=5)
    assert pack(alpaca, 700) == reference.pack(listed, 700)
