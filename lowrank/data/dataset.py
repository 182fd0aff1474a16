"""Instruction data: JSON / JSONL records turned into token ids and labels that train only the answers.

Record formats (one file may mix them; each record is recognised by its keys):

- alpaca: ``instruction``, ``output``, optional ``input`` (joined to the instruction by a newline),
  ``system``, and ``history`` ([user, assistant] pairs that come before);
- chat: ``messages``, a list of ``{"role", "content"}`` (system / user / assistant / tool);
- sharegpt: ``conversations``, a list of ``{"from", "value"}`` (human / gpt / system);
- pre-tokenized: ``input_ids`` with ``labels`` aligned to them (-100 = not trained), passed through.

Text records are rendered with the tokenizer's chat template. Labels equal the input ids on the
assistant turns and -100 everywhere else; the loss shifts them by one (position t predicts
labels[t + 1]). Each assistant turn is trained in the exact form the template renders it when
that turn is the newest message, i.e. the text the model writes at inference: its span starts
where the template's generation prompt ends and runs through the turn's last special token
(``<|im_end|>``, ``<｜end▁of▁sentence｜>``); what the template writes after that token (ChatML's
"\\n") is context, not trained. When a template renders an earlier turn differently once later
messages follow (Qwen3 drops the reasoning of turns before the last user message), that turn is
trained in an example that ends with it or with a later turn it renders the same in, so one
record can give several examples. Template variables (enable_thinking, tools) come in through
chat_template_kwargs.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DataError
from . import cache, fast_tokenize
from .examples import IGNORE_INDEX, Examples, ExampleWriter
from .formats import iter_records, read_records, text_example  # noqa: F401  (read_records: the public reader)

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
TRAIN_ON = ("all_turns", "last_turn")


@dataclass
class DataReport:
    """What load_dataset made of a file: examples kept, truncated at max_len, skipped."""

    path: str
    n_records: int = 0
    n_examples: int = 0
    n_truncated: int = 0  # examples cut at max_len (and kept)
    n_skipped: int = 0  # examples left with no trained token (after truncation), dropped
    n_tokens: int = 0
    n_trainable_tokens: int = 0  # labels that enter the loss (shifted: labels[1:] != -100)
    cache: str | None = None  # the token cache folder, when the load used one
    from_cache: bool = False  # mapped from an existing cache entry (not tokenized by this load)

    def summary(self) -> str:
        return (f"{self.path}: {self.n_records} records -> {self.n_examples} examples "
                f"({self.n_truncated} truncated, {self.n_skipped} skipped), "
                f"{self.n_tokens} tokens, {self.n_trainable_tokens} trained")


def load_dataset(path, tokenizer, max_len: int, *, train_on: str = "all_turns",
                 replacements: dict[str, str] | None = None, system: str | None = None,
                 cache_dir=None, chat_template_kwargs: dict | None = None) -> tuple[Examples, DataReport]:
    """Read, validate and tokenize a data file: (examples, DataReport).

    Each example is {"input_ids": [...], "labels": [...]} of at most max_len tokens; `examples`
    is a sequence of them backed by flat arrays (lowrank.data.examples).
    replacements: {"name": "Lowrank"} turns every "{{name}}" in the text into "Lowrank".
    system: a system prompt for the text records that carry none (or an empty one).
    cache_dir: keep the tokenised examples in a cache folder there (lowrank.data.cache) and map
    them on later loads; None tokenizes in memory.
    chat_template_kwargs: template variables for every text record, as apply_chat_template takes
    them: {"enable_thinking": False} (Qwen3, Qwen3.5), {"tools": [...]}.
    Any bad record raises DataError naming the file and record index, before training starts.
    """
    if train_on not in TRAIN_ON:
        raise ConfigError(f"train_on={train_on!r}: expected one of {TRAIN_ON}")
    _check_template_kwargs(chat_template_kwargs)
    if not isinstance(max_len, int) or max_len < 2:
        raise ConfigError(f"max_len={max_len!r}: expected an int >= 2")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")

    def build(writer) -> dict:
        report = tokenize_records(path, iter_records(path), tokenizer, max_len, writer, train_on=train_on,
                                  replacements=replacements, system=system,
                                  chat_template_kwargs=chat_template_kwargs)
        return dataclasses.asdict(report)

    fingerprint = cache.tokenizer_fingerprint(tokenizer) if cache_dir is not None else None
    if fingerprint is None:
        writer = ExampleWriter()
        report = DataReport(**build(writer))
        examples = writer.in_memory()
    else:
        parts = {"data": cache.file_digest(path), "suffix": path.suffix, "tokenizer": fingerprint,
                 "max_len": max_len, "train_on": train_on, "replacements": dict(sorted((replacements or {}).items())),
                 "system": system, "chat_template_kwargs": chat_template_kwargs}
        folder = Path(cache_dir) / f"{path.stem}-{cache.cache_key(parts)}"
        examples, fields, built = cache.load_or_build(folder, parts, build)
        report = DataReport(**{**fields, "path": str(path), "cache": str(folder), "from_cache": not built})
    if not len(examples):
        raise DataError(f"{path}: every example was skipped (no assistant token left within max_len={max_len}); "
                        f"{report.summary()}")
    return examples, report


# Records per encode_batch call: enough for the tokenizer's threads, few enough to stay small.
CHUNK = 2048


def tokenize_records(path, records, tokenizer, max_len: int, writer: ExampleWriter, *,
                     train_on: str = "all_turns", replacements=None, system=None,
                     chat_template_kwargs: dict | None = None) -> DataReport:
    """Tokenize `records` (an iterable of dicts, read CHUNK at a time) into `writer` (truncated at
    max_len, untrained ones dropped): the report. Memory holds one chunk, whatever the file's size."""
    report = DataReport(path=str(path))
    labeler = fast_tokenize.BatchLabeler(tokenizer) if fast_tokenize.supports(tokenizer) else None
    records = iter(records)
    while chunk := list(itertools.islice(records, CHUNK)):
        found, texts = [], []  # per record: its examples, or indices into texts (rendered, not yet encoded)
        for index, record in enumerate(chunk, start=report.n_records):
            try:
                if "input_ids" in record:
                    found.append([pretokenized_example(record, len(tokenizer))])
                elif "text" in record and not {"messages", "conversations", "instruction"} & set(record):
                    found.append([text_example(record, tokenizer, replacements)])
                else:
                    messages = record_to_messages(record, replacements, system)
                    if labeler is None:
                        found.append(tokenize_conversation(messages, tokenizer, train_on, chat_template_kwargs))
                    else:
                        spans = conversation_spans(messages, tokenizer, train_on, chat_template_kwargs)
                        found.append(list(range(len(texts), len(texts) + len(spans))))
                        texts += spans
            except DataError as e:
                raise DataError(f"{path}: record {index}: {e}") from None
        report.n_records += len(chunk)
        encoded = labeler.label(texts) if texts else []
        for examples in found:
            if not examples:
                report.n_skipped += 1
            for example in examples:
                if isinstance(example, int):
                    ids, trained, labels = *encoded[example], None
                else:
                    ids, labels = np.array(example["input_ids"]), np.array(example["labels"])
                    trained = labels != IGNORE_INDEX
                if len(ids) > max_len:
                    ids, trained = ids[:max_len], trained[:max_len]
                    labels = None if labels is None else labels[:max_len]
                    report.n_truncated += 1
                trainable = int(trained[1:].sum())  # the first position is never predicted
                if trainable == 0:
                    report.n_skipped += 1
                    continue
                writer.add(ids, trained, labels)
                report.n_examples += 1
                report.n_tokens += len(ids)
                report.n_trainable_tokens += trainable
    return report


def _check_template_kwargs(kwargs) -> None:
    if kwargs is None:
        return
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise ConfigError(f"chat_template_kwargs={kwargs!r:.80}: expected a dict of template variables")
    taken = sorted({"messages", "add_generation_prompt", "tokenize"} & set(kwargs))
    if taken:
        raise ConfigError(f"chat_template_kwargs: {', '.join(taken)} cannot be set; lowrank renders each turn itself")


def count_trainable(labels: list[int]) -> int:
    """Labels the loss uses: the first position is never predicted (the loss shifts by one)."""
    return sum(1 for label in labels[1:] if label != IGNORE_INDEX)


# ---- records to conversations ----------------------------------------------------------------

def record_to_messages(record: dict, replacements: dict[str, str] | None = None,
                       system: str | None = None) -> list[dict]:
    """An alpaca, chat or sharegpt record as a list of {"role", "content"} messages."""
    if "messages" in record:
        messages = [_chat_message(m, j) for j, m in enumerate(_list_field(record, "messages"))]
    elif "conversations" in record:
        messages = [_sharegpt_message(m, j) for j, m in enumerate(_list_field(record, "conversations"))]
    elif "instruction" in record:
        messages = _alpaca_messages(record)
    else:
        raise DataError(f"unknown record format with keys {sorted(record)}; expected 'instruction' + 'output' "
                        "(alpaca), 'messages' (chat), 'conversations' (sharegpt) or 'input_ids' (pre-tokenized)")
    # An empty "system" field means none, as LLaMA-Factory reads it: the template's default stays.
    system = _str_field(record, "system", "") or system
    if system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    first = next((m["role"] for m in messages if m["role"] != "system"), None)
    if first not in ("user", None):
        raise DataError(f"the conversation opens with a {first!r} message; the first one must be from the user")
    for key, value in (replacements or {}).items():
        for m in messages:
            m["content"] = m["content"].replace("{{" + key + "}}", value)
    return messages


def _alpaca_messages(record: dict) -> list[dict]:
    query = "\n".join(q for q in (_str_field(record, "instruction"), _str_field(record, "input", "")) if q)
    messages = []
    for j, pair in enumerate(_list_field(record, "history", [])):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise DataError(f"'history'[{j}]: expected a [user, assistant] pair of strings, found {pair!r}")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return messages + [{"role": "user", "content": query},
                       {"role": "assistant", "content": _str_field(record, "output")}]


def _checked(message, j: int, field: str, role_key: str, content_key: str, roles) -> tuple[str, str]:
    """(role, content) of one message of a record's `field` list, or a DataError naming it."""
    if not isinstance(message, dict):
        raise DataError(f"{field!r}[{j}]: expected an object with {role_key!r} and {content_key!r}, found {message!r}")
    role, content = message.get(role_key), message.get(content_key)
    if role not in roles:
        raise DataError(f"{field!r}[{j}]: unknown role {role!r}; expected one of {tuple(roles)}")
    if not isinstance(content, str):
        raise DataError(f"{field!r}[{j}]: {content_key!r} must be a string, found {type(content).__name__}")
    return role, content


def _chat_message(message, j: int) -> dict:
    _checked(message, j, "messages", "role", "content", ROLES)
    return dict(message)  # other keys (tool_calls, reasoning_content) are for the template


def _sharegpt_message(message, j: int) -> dict:
    role, content = _checked(message, j, "conversations", "from", "value", SHAREGPT_ROLES)
    return {"role": SHAREGPT_ROLES[role], "content": content}


_MISSING = object()


def _str_field(record: dict, key: str, default=_MISSING) -> str:
    value = record.get(key, default)
    if value is _MISSING:
        raise DataError(f"missing required field {key!r}")
    if not isinstance(value, str):
        raise DataError(f"field {key!r} must be a string, found {type(value).__name__}")
    return value


def _list_field(record: dict, key: str, default=_MISSING) -> list:
    value = record.get(key, default)
    if value is _MISSING:
        raise DataError(f"missing required field {key!r}")
    if not isinstance(value, list) or (default is _MISSING and not value):
        raise DataError(f"field {key!r} must be a non-empty list, found {value!r:.80}")
    return value


# ---- conversations to ids and labels ---------------------------------------------------------

def tokenize_conversation(messages: list[dict], tokenizer, train_on: str = "all_turns",
                          chat_template_kwargs: dict | None = None) -> list[dict]:
    """Render and tokenize a conversation; labels keep the trained assistant tokens, -100 elsewhere.

    Returns one example, or more when the template rewrites earlier turns (see the module doc);
    none when the conversation has no assistant message. One record at a time: the reference that
    lowrank.data.fast_tokenize computes in batches, and the path of SentencePiece tokenizers.
    chat_template_kwargs reach the template.
    """
    return [_label_spans(text, spans, tokenizer)
            for text, spans in conversation_spans(messages, tokenizer, train_on, chat_template_kwargs)]


def conversation_spans(messages: list[dict], tokenizer, train_on: str = "all_turns",
                       chat_template_kwargs: dict | None = None) -> list[tuple[str, list]]:
    """The texts to tokenize for a conversation, each with its trained spans: (start, end) character
    offsets and the generation prompt, whose own tokens also bound the start (see _label_spans)."""
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        return []
    messages = messages[: turns[-1] + 1]  # a trailing user message has no answer to train
    if train_on == "last_turn":
        turns = turns[-1:]
    kwargs = chat_template_kwargs or {}

    def render(msgs, add_generation_prompt):
        return tokenizer.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt, **kwargs)

    special = tokenizer.special_tokens
    full = render(messages, False)
    # rendered text -> trained spans (start, end, generation prompt). Newest turns first: a turn
    # the whole conversation renders differently joins the first later example that renders it
    # as its own newest form (Qwen3.5's tool-calling steps after one user query share one).
    spans: dict[str, list[tuple[int, int, str]]] = {full: []}
    for i in reversed(turns):
        prompt, text = render(messages[:i], True), render(messages[: i + 1], False)
        # Where the generation prompt stops matching, the answer starts: this also holds for
        # templates whose generation prompt writes a token the rendered turn lacks.
        start = len(os.path.commonprefix([prompt, text]))
        end = _end_of_turn(text, start, special)
        key = next((t for t in spans if t.startswith(text)), text)
        spans.setdefault(key, []).append((start, end, prompt))
    texts = [full] + [t for t in spans if t != full][::-1]  # the whole conversation, then turn order
    return [(text, spans[text]) for text in texts if spans[text]]


def _end_of_turn(text: str, start: int, special: set[str]) -> int:
    """End of the trained span: just after the turn's last special token, or the turn's end."""
    turn = text[start:]
    ends = [turn.rfind(token) + len(token) for token in special if token in turn]
    return start + (max(ends) if ends else len(turn))


def _label_spans(text: str, spans: list[tuple[int, int, str]], tokenizer) -> dict:
    ids = tokenizer.encode(text, add_special_tokens=False)
    labels = [IGNORE_INDEX] * len(ids)
    for start, end, prompt in spans:
        # Token positions of the character span: the tokens of the text before each end that
        # agree with the whole text's tokens. A token straddling the start (a merge across the
        # prompt / answer boundary) is trained. The generation prompt's own tokens bound the start
        # too: where it writes more than the turn's header (Qwen3.5's "<think>\n" before a turn
        # without reasoning), an answer opening with "<" shares that character with it, and the
        # "<" is the answer's.
        first = min(_shared_prefix(tokenizer.encode(text[:start], add_special_tokens=False), ids),
                    _shared_prefix(tokenizer.encode(prompt, add_special_tokens=False), ids))
        last = _shared_prefix(tokenizer.encode(text[:end], add_special_tokens=False), ids)
        labels[first:last] = ids[first:last]
    return {"input_ids": ids, "labels": labels}


def _shared_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def pretokenized_example(record: dict, vocab_size: int) -> dict:
    """A record carrying its own input_ids (and labels, which default to the input ids)."""
    ids = _id_list(record, "input_ids", vocab_size)
    labels = _id_list(record, "labels", vocab_size, allow_ignore=True) if "labels" in record else list(ids)
    if len(labels) != len(ids):
        raise DataError(f"'labels' has {len(labels)} entries, 'input_ids' {len(ids)}; they must align")
    mask = record.get("attention_mask")
    if mask is not None:
        if not isinstance(mask, list) or len(mask) != len(ids):
            raise DataError(f"'attention_mask' must be a list of {len(ids)} entries like 'input_ids'")
        if any(m != 1 for m in mask):
            raise DataError("'attention_mask' holds zeros: give records without padding, lowrank pads batches itself")
    return {"input_ids": ids, "labels": labels}


def _id_list(record: dict, key: str, vocab_size: int, allow_ignore: bool = False) -> list[int]:
    values = record[key]
    if not isinstance(values, list) or not values:
        raise DataError(f"{key!r} must be a non-empty list of token ids")
    for j, v in enumerate(values):
        if type(v) is not int or not (0 <= v < vocab_size or (allow_ignore and v == IGNORE_INDEX)):
            raise DataError(f"{key!r}[{j}] = {v!r}: expected a token id in [0, {vocab_size})"
                            + (" or -100" if allow_ignore else ""))
    return list(values)
