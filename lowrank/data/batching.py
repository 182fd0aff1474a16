"""Examples to batches: right-padded collation, length-grouped batch order, and packing.

Padded batch: ``input_ids``, ``labels`` (-100 on padding), ``attention_mask`` (1 on tokens), all
[B, T] long tensors.

Packed batch: several examples share a row of max_len tokens. The row adds ``position_ids``
(restarting at 0 for each example) and ``seq_ids`` (1, 2, ... for the examples of the row, 0 on
padding). A model consuming it attends from position i to position j of a row only when

    seq_ids[i] == seq_ids[j] != 0   and   j <= i,

a block-diagonal causal mask; with rotary embeddings fed position_ids, each example sees exactly
what it would see alone. The first label of every example is -100, so the one position where the
shifted loss would ask the end of one example to predict the start of the next trains nothing.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError, DataError
from .dataset import IGNORE_INDEX


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad examples to the longest one."""
    if pad_id is None:
        raise ConfigError("collate: the tokenizer has no pad token id; pass pad_id explicitly")
    width = max(len(e["input_ids"]) for e in examples)
    batch = {"input_ids": [], "labels": [], "attention_mask": []}
    for e in examples:
        pad = width - len(e["input_ids"])
        batch["input_ids"].append(e["input_ids"] + [pad_id] * pad)
        batch["labels"].append(e["labels"] + [IGNORE_INDEX] * pad)
        batch["attention_mask"].append([1] * len(e["input_ids"]) + [0] * pad)
    return {key: torch.tensor(rows, dtype=torch.long) for key, rows in batch.items()}


def pack(examples: list[dict], max_len: int) -> list[list[int]]:
    """Group example indices into rows of at most max_len tokens, first fit in the given order."""
    rows, free = [], []
    for index, e in enumerate(examples):
        n = len(e["input_ids"])
        if n > max_len:
            raise DataError(f"example {index} has {n} tokens, more than max_len={max_len}; load it with max_len")
        row = next((r for r, room in enumerate(free) if room >= n), None)
        if row is None:
            rows.append([])
            free.append(max_len)
            row = len(rows) - 1
        rows[row].append(index)
        free[row] -= n
    return rows


def collate_packed(rows: list[list[dict]], pad_id: int, width: int | None = None) -> dict[str, torch.Tensor]:
    """Concatenate the examples of each row; pad rows to `width` (default: the longest row)."""
    if pad_id is None:
        raise ConfigError("collate_packed: the tokenizer has no pad token id; pass pad_id explicitly")
    keys = ("input_ids", "labels", "attention_mask", "position_ids", "seq_ids")
    out = {key: [] for key in keys}
    width = width or max(sum(len(e["input_ids"]) for e in row) for row in rows)
    for row in rows:
        cols = {key: [] for key in keys}
        for seq, e in enumerate(row, start=1):
            n = len(e["input_ids"])
            cols["input_ids"] += e["input_ids"]
            cols["labels"] += [IGNORE_INDEX] + e["labels"][1:]  # nothing predicts across examples
            cols["attention_mask"] += [1] * n
            cols["position_ids"] += range(n)
            cols["seq_ids"] += [seq] * n
        pad = width - len(cols["input_ids"])
        if pad < 0:
            raise DataError(f"a packed row holds {len(cols['input_ids'])} tokens, more than width={width}")
        for key, value in zip(keys, (pad_id, IGNORE_INDEX, 0, 0, 0)):
            out[key].append(cols[key] + [value] * pad)
    return {key: torch.tensor(values, dtype=torch.long) for key, values in out.items()}


def length_grouped_order(lengths: list[int], batch_size: int, seed: int = 0) -> list[list[int]]:
    """Batches of indices with similar lengths (less padding), in a shuffled order.

    The indices are shuffled, cut into groups of 50 batches, each group sorted by length and
    cut into batches, and the batches shuffled: batches stay random across the epoch while
    their members are close in length. The same seed gives the same batches.
    """
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(lengths), generator=g).tolist()
    group = 50 * batch_size
    batches = []
    for start in range(0, len(order), group):
        members = sorted(order[start:start + group], key=lambda i: lengths[i], reverse=True)
        batches += [members[i:i + batch_size] for i in range(0, len(members), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


def make_batches(examples: list[dict], batch_size: int, pad_id: int, *, seed: int = 0, shuffle: bool = True,
                 group_by_length: bool = False, packing: bool = False, max_len: int | None = None):
    """The batches of one epoch, as the training loop consumes them.

    packing: rows of max_len tokens holding several examples each (batch_size rows per batch).
    group_by_length: batches of examples of similar length (ignored with packing).
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size}: expected >= 1")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(examples), generator=g).tolist() if shuffle else list(range(len(examples)))
    if packing:
        if max_len is None:
            raise ConfigError("packing needs max_len, the length of a packed row")
        rows = [[examples[order[i]] for i in row] for row in pack([examples[i] for i in order], max_len)]
        return [collate_packed(rows[i:i + batch_size], pad_id, max_len) for i in range(0, len(rows), batch_size)]
    if group_by_length:
        batches = length_grouped_order([len(e["input_ids"]) for e in examples], batch_size, seed)
    else:
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return [collate([examples[i] for i in batch], pad_id) for batch in batches]
