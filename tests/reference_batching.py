"""The batching code as it was before the token cache (issue 15), kept verbatim as the reference
the lazy, array-backed batches must reproduce: same batches, same order, for the same seed."""

from __future__ import annotations

import torch

from lowrank.data.batching import collate, collate_packed


def pack(examples: list[dict], max_len: int) -> list[list[int]]:
    rows, free = [], []
    for index, e in enumerate(examples):
        n = len(e["input_ids"])
        row = next((r for r, room in enumerate(free) if room >= n), None)
        if row is None:
            rows.append([])
            free.append(max_len)
            row = len(rows) - 1
        rows[row].append(index)
        free[row] -= n
    return rows


def length_grouped_order(lengths: list[int], batch_size: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(lengths), generator=g).tolist()
    group = 50 * batch_size
    batches = []
    for start in range(0, len(order), group):
        members = sorted(order[start:start + group], key=lambda i: lengths[i], reverse=True)
        batches += [members[i:i + batch_size] for i in range(0, len(members), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


def make_batches(examples, batch_size, pad_id, *, seed=0, shuffle=True, group_by_length=False, packing=False,
                 max_len=None):
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(examples), generator=g).tolist() if shuffle else list(range(len(examples)))
    if packing:
        rows = [[examples[order[i]] for i in row] for row in pack([examples[i] for i in order], max_len)]
        return [collate_packed(rows[i:i + batch_size], pad_id, max_len) for i in range(0, len(rows), batch_size)]
    if group_by_length:
        batches = length_grouped_order([len(e["input_ids"]) for e in examples], batch_size, seed)
    else:
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return [collate([examples[i] for i in batch], pad_id) for batch in batches]


def split_examples(train: list[dict], eval_split: float, seed: int):
    """train.prepare.load_examples' held-out draw."""
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:max(1, round(eval_split * len(train)))])
    return [e for i, e in enumerate(train) if i not in held], [train[i] for i in sorted(held)]


def pack_rows(examples, max_len, seed, shuffle):
    order = list(range(len(examples)))
    if shuffle:
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    return [[order[i] for i in row] for row in pack([examples[i] for i in order], max_len)]


def epoch_batches(examples, cfg, pad_id, packed_rows, epoch):
    if not cfg.packing:
        return make_batches(examples, cfg.batch_size, pad_id, seed=cfg.seed + epoch, shuffle=cfg.shuffle,
                            group_by_length=cfg.group_by_length)
    rows = [[examples[i] for i in row] for row in packed_rows]
    if cfg.shuffle:
        rows = [rows[i] for i in torch.randperm(len(rows), generator=torch.Generator().manual_seed(cfg.seed + epoch))]
    return [collate_packed(rows[i:i + cfg.batch_size], pad_id, cfg.max_len) for i in range(0, len(rows), cfg.batch_size)]
