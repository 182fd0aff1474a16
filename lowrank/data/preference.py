"""Preference data: records with a chosen and a rejected answer to one prompt, tokenized as two
sequences that share the prompt and train only their answers.

Record formats (recognised by their keys; one file may mix them):

- TRL: ``prompt``, ``chosen``, ``rejected``. Each is a string (the prompt a user turn, the
  answers assistant turns) or a list of ``{"role", "content"}`` messages; an optional
  ``messages`` list is history shared by both, before the prompt. Without ``prompt``, chosen
  and rejected are whole conversations (TRL's implicit prompt) whose last message is the answer.
- LLaMA-Factory alpaca: ``instruction``, optional ``input``, ``system``, ``history``, and the
  answers ``chosen`` / ``rejected`` as strings.
- LLaMA-Factory sharegpt: ``conversations`` (a list of ``{"from", "value"}`` ending with the
  user's turn) and ``chosen`` / ``rejected`` as ``{"from": "gpt", "value"}`` (or strings).
- pre-tokenized, as TRL's DPOTrainer holds a processed dataset: ``prompt_ids``, ``chosen_ids``,
  ``rejected_ids``; each side is the prompt's ids followed by its answer's, the answer trained.

Each side becomes a conversation through `dataset.record_to_messages` (system prompts and
replacements as for SFT) and is tokenized with the chat template by
`dataset.tokenize_conversation` with train_on="last_turn": labels are the answer's tokens, the
exact span the model writes at inference, and -100 on the prompt. A pair is
``{"chosen": {"input_ids", "labels"}, "rejected": {...}}``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import DataError
from .batching import collate
from .dataset import (IGNORE_INDEX, _id_list, count_trainable, read_records, record_to_messages,
                      tokenize_conversation)

SIDES = ("chosen", "rejected")


@dataclass
class PreferenceReport:
    """What load_preference_dataset made of a file."""

    path: str
    n_records: int = 0
    n_pairs: int = 0
    n_truncated: int = 0  # sequences cut at max_len (and kept)
    n_skipped: int = 0  # pairs with a side left without an answer token after truncation, dropped
    n_tokens: int = 0

    def summary(self) -> str:
        return (f"{self.path}: {self.n_records} records -> {self.n_pairs} pairs "
                f"({self.n_truncated} sequences truncated, {self.n_skipped} pairs skipped), {self.n_tokens} tokens")


def load_preference_dataset(path, tokenizer, max_len: int, *, replacements: dict[str, str] | None = None,
                            system: str | None = None) -> tuple[list[dict], PreferenceReport]:
    """Read, validate and tokenize a preference file: (pairs, PreferenceReport).

    Sequences longer than max_len are cut at the end (the prompt is kept, the answer shortened);
    a pair one of whose answers is cut away entirely is skipped. Any bad record raises a
    DataError naming the file and the record index.
    """
    records = read_records(path)
    report = PreferenceReport(path=str(path), n_records=len(records))
    pairs = []
    for index, record in enumerate(records):
        try:
            if "prompt_ids" in record:
                pair = pretokenized_pair(record, len(tokenizer))
            else:
                pair = {side: tokenize_side(messages, tokenizer, side)
                        for side, messages in zip(SIDES, preference_messages(record, replacements, system))}
        except DataError as e:
            raise DataError(f"{path}: record {index}: {e}") from None
        for side, example in pair.items():
            if len(example["input_ids"]) > max_len:
                pair[side] = {key: value[:max_len] for key, value in example.items()}
                report.n_truncated += 1
        if any(count_trainable(e["labels"]) == 0 for e in pair.values()):
            report.n_skipped += 1
            continue
        pairs.append(pair)
        report.n_tokens += sum(len(e["input_ids"]) for e in pair.values())
    report.n_pairs = len(pairs)
    if not pairs:
        raise DataError(f"{path}: every pair was skipped (an answer left no token within max_len={max_len}); "
                        f"{report.summary()}")
    return pairs, report


def preference_messages(record: dict, replacements=None, system=None) -> tuple[list[dict], list[dict]]:
    """(chosen conversation, rejected conversation) of one record, each ending with its answer."""
    for side in SIDES:
        if side not in record:
            raise DataError(f"missing field {side!r}: a preference record needs both 'chosen' and 'rejected'")
    rest = {key: value for key, value in record.items() if key not in SIDES}
    if "conversations" in record:  # LLaMA-Factory sharegpt
        sides = [_sharegpt_turns(record, side) for side in SIDES]
        records = [dict(rest, conversations=record["conversations"] + turns) for turns in sides]
    elif "instruction" in record:  # LLaMA-Factory alpaca
        records = [dict(rest, output=_answer_text(record, side)) for side in SIDES]
    elif "prompt" in record or all(isinstance(record[side], list) for side in SIDES):  # TRL
        rest.pop("prompt", None)
        history = _list(record, "messages") + _turns(record, "prompt", "user")
        records = [dict(rest, messages=history + _turns(record, side, "assistant")) for side in SIDES]
    else:
        raise DataError(f"unknown preference record with keys {sorted(record)}; expected 'prompt' + 'chosen' + "
                        "'rejected' (TRL), 'instruction' + 'chosen' + 'rejected' (alpaca) or 'conversations' + "
                        "'chosen' + 'rejected' (sharegpt)")
    out = tuple(record_to_messages(r, replacements, system) for r in records)
    for side, messages in zip(SIDES, out):
        last = messages[-1]
        if last["role"] != "assistant":
            raise DataError(f"{side!r}: the conversation must end with the assistant's answer, "
                            f"it ends with a {last['role']!r} message")
        if not last["content"].strip():
            raise DataError(f"{side!r}: the answer is empty")
    return out


def _answer_text(record: dict, side: str) -> str:
    value = record[side]
    if not isinstance(value, str):
        raise DataError(f"field {side!r} must be a string, found {type(value).__name__}")
    return value


def _sharegpt_turns(record: dict, side: str) -> list[dict]:
    value = record[side]
    if isinstance(value, str):
        return [{"from": "gpt", "value": value}]
    if isinstance(value, dict):
        return [value]
    raise DataError(f"field {side!r} must be a {{'from', 'value'}} object or a string, found {type(value).__name__}")


def _turns(record: dict, key: str, role: str) -> list:
    """A TRL field as messages: a string is one message of `role`, a list is taken as it is."""
    value = record.get(key, [])
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list):
        return list(value)
    raise DataError(f"field {key!r} must be a string or a list of messages, found {type(value).__name__}")


def _list(record: dict, key: str) -> list:
    value = record.get(key, [])
    if not isinstance(value, list):
        raise DataError(f"field {key!r} must be a list of messages, found {type(value).__name__}")
    return list(value)


def tokenize_side(messages: list[dict], tokenizer, side: str) -> dict:
    """One side of a pair: its last assistant turn trained, everything before it context."""
    found = tokenize_conversation(messages, tokenizer, train_on="last_turn")
    if len(found) != 1:  # last_turn trains one turn, hence one example
        raise DataError(f"{side!r}: expected one trained answer, found {len(found)}")
    return found[0]


def pretokenized_pair(record: dict, vocab_size: int) -> dict:
    """A record of TRL's token columns: prompt_ids (may be empty), chosen_ids, rejected_ids."""
    prompt = record["prompt_ids"]
    if not isinstance(prompt, list):
        raise DataError("'prompt_ids' must be a list of token ids")
    prompt = _id_list({"prompt_ids": prompt}, "prompt_ids", vocab_size) if prompt else []
    pair = {}
    for side in SIDES:
        key = f"{side}_ids"
        if key not in record:
            raise DataError(f"missing field {key!r}: a pre-tokenized pair needs 'chosen_ids' and 'rejected_ids'")
        answer = _id_list(record, key, vocab_size)
        pair[side] = {"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer}
    return pair


# ---- batches ------------------------------------------------------------------------------------

def collate_pairs(pairs: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """B pairs as one padded batch of 2B rows, the chosen sequences first, then the rejected
    ones in the same order (TRL's concatenated forward): the prompt is read in one pass."""
    return collate([p["chosen"] for p in pairs] + [p["rejected"] for p in pairs], pad_id)


def make_pair_batches(pairs: list[dict], batch_size: int, pad_id: int, *, seed: int = 0,
                      shuffle: bool = True, ref_logps: torch.Tensor | None = None) -> list[dict]:
    """The pair batches of one epoch: batch_size pairs (2 * batch_size rows) each. Every batch
    carries ``pair_index`` [B], the pairs' positions in `pairs`; with ref_logps [n_pairs, 2]
    (precomputed reference log-probabilities), also their ``ref_logps`` [2B] in row order."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(pairs), generator=g).tolist() if shuffle else list(range(len(pairs)))
    batches = []
    for start in range(0, len(order), batch_size):
        members = order[start:start + batch_size]
        batch = collate_pairs([pairs[i] for i in members], pad_id)
        batch["pair_index"] = torch.tensor(members, dtype=torch.long)
        if ref_logps is not None:
            batch["ref_logps"] = ref_logps[members].t().reshape(-1)  # chosen of each pair, then rejected
        batches.append(batch)
    return batches
