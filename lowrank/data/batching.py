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

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ConfigError, DataError
from .examples import IGNORE_INDEX, example_lengths


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


def pack(examples, max_len: int) -> list[list[int]]:
    """Group example indices into rows of at most max_len tokens, first fit in the given order."""
    return pack_lengths(example_lengths(examples), max_len).tolist()


def pack_lengths(lengths, max_len: int) -> "IndexGroups":
    """First fit from the lengths alone: each example goes to the first row with room for it.

    A max-tree over the rooms of n rows (every unopened row counts as an empty one) finds the
    first row with room >= n in log(rows) steps instead of a scan over every open row.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    too_long = np.flatnonzero(lengths > max_len)
    if len(too_long):
        index = int(too_long[0])
        raise DataError(f"example {index} has {lengths[index]} tokens, more than max_len={max_len}; "
                        "load it with max_len")
    size = 1 << max(0, (len(lengths) - 1).bit_length())
    room = [max_len] * (2 * size)  # room[size + r]: free tokens of row r; room[node]: max below node
    row_of = np.empty(len(lengths), dtype=np.int64)
    for index, n in enumerate(lengths.tolist()):
        node = 1
        while node < size:
            node = 2 * node if room[2 * node] >= n else 2 * node + 1
        row_of[index] = node - size
        room[node] -= n
        node //= 2
        while node and room[node] != max(room[2 * node], room[2 * node + 1]):
            room[node] = max(room[2 * node], room[2 * node + 1])
            node //= 2
    n_rows = int(row_of.max()) + 1 if len(row_of) else 0
    bounds = np.concatenate([[0], np.cumsum(np.bincount(row_of, minlength=n_rows))])
    return IndexGroups(np.argsort(row_of, kind="stable"), bounds)


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


def length_grouped_order(lengths, batch_size: int, seed: int = 0) -> list[list[int]]:
    """Batches of indices with similar lengths (less padding), in a shuffled order.

    The indices are shuffled, cut into groups of 50 batches, each group sorted by length and
    cut into batches, and the batches shuffled: batches stay random across the epoch while
    their members are close in length. The same seed gives the same batches.
    """
    return _length_grouped(np.asarray(lengths, dtype=np.int64), batch_size, seed).tolist()


def _length_grouped(lengths: np.ndarray, batch_size: int, seed: int) -> "IndexGroups":
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(lengths), generator=g).numpy()
    group = 50 * batch_size
    parts, starts, ends = [], [], []
    for start in range(0, len(order), group):
        members = order[start:start + group]
        # Longest first; a stable sort keeps equal lengths in their shuffled order.
        parts.append(members[np.argsort(-lengths[members], kind="stable")])
        cuts = np.arange(start, start + len(members), batch_size)
        starts.append(cuts)
        ends.append(np.minimum(cuts + batch_size, start + len(members)))
    grouped = np.concatenate(parts) if parts else order
    starts, ends = (np.concatenate(x) if x else np.zeros(0, np.int64) for x in (starts, ends))
    perm = torch.randperm(len(starts), generator=g).numpy()
    return IndexGroups.gather(grouped, starts[perm], ends[perm])


@dataclass
class IndexGroups:
    """Groups of example indices (the batches of an epoch, packed rows) as one flat array and
    where each group starts: 8 bytes per example rather than a Python list per group."""

    flat: np.ndarray
    bounds: np.ndarray  # group i is flat[bounds[i]:bounds[i + 1]]

    @classmethod
    def chunks(cls, flat, size: int) -> "IndexGroups":
        flat = np.asarray(flat, dtype=np.int64)
        return cls(flat, np.append(np.arange(0, len(flat), size), len(flat)))

    @classmethod
    def gather(cls, flat: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> "IndexGroups":
        """The groups flat[starts[i]:ends[i]], in that order."""
        sizes = ends - starts
        bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        return cls(flat[np.repeat(starts - bounds[:-1], sizes) + np.arange(bounds[-1])], bounds)

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.flat[self.bounds[i]:self.bounds[i + 1]]

    def tolist(self) -> list[list[int]]:
        return [self[i].tolist() for i in range(len(self))]


class Batches(Sequence):
    """The batches of an epoch, collated when indexed: only the plan (example indices) is held,
    so an epoch costs 8 bytes per example and one step's tensors at a time.

    groups: example indices per batch; with `rows` (packing): row indices per batch, each row a
    group of example indices, collated to `width` tokens.
    """

    def __init__(self, examples, groups: IndexGroups, pad_id: int, rows: IndexGroups | None = None,
                 width: int | None = None):
        self.examples, self.groups, self.pad_id, self.rows, self.width = examples, groups, pad_id, rows, width

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(f"batch {i} of {len(self)}")
        group = self.groups[i % len(self)].tolist()
        if self.rows is None:
            return collate([self.examples[j] for j in group], self.pad_id)
        rows = [[self.examples[j] for j in self.rows[r].tolist()] for r in group]
        return collate_packed(rows, self.pad_id, self.width)


def batch_sequence(examples, batch_size: int, pad_id: int, *, seed: int = 0, shuffle: bool = True,
                   group_by_length: bool = False, packing: bool = False, max_len: int | None = None) -> Batches:
    """The batches of one epoch, as the training loop consumes them, made when indexed.

    packing: rows of max_len tokens holding several examples each (batch_size rows per batch).
    group_by_length: batches of examples of similar length (ignored with packing).
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size}: expected >= 1")
    lengths = example_lengths(examples)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(lengths), generator=g).numpy() if shuffle else np.arange(len(lengths))
    if packing:
        if max_len is None:
            raise ConfigError("packing needs max_len, the length of a packed row")
        rows = pack_lengths(lengths[order], max_len)
        rows = IndexGroups(order[rows.flat], rows.bounds)
        return Batches(examples, IndexGroups.chunks(np.arange(len(rows)), batch_size), pad_id, rows, max_len)
    if group_by_length:
        return Batches(examples, _length_grouped(lengths, batch_size, seed), pad_id)
    return Batches(examples, IndexGroups.chunks(order, batch_size), pad_id)


def make_batches(examples, batch_size: int, pad_id: int, *, seed: int = 0, shuffle: bool = True,
                 group_by_length: bool = False, packing: bool = False, max_len: int | None = None) -> list[dict]:
    """The batches of one epoch as a list (`batch_sequence` makes them one at a time)."""
    return list(batch_sequence(examples, batch_size, pad_id, seed=seed, shuffle=shuffle,
                               group_by_length=group_by_length, packing=packing, max_len=max_len))
