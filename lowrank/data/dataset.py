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

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, DataError

# The label of a position that is not trained (what torch's cross_entropy ignores by default).
IGNORE_INDEX = -100

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

    def summary(self) -> str:
        return (f"{self.path}: {self.n_records} records -> {self.n_examples} examples "
                f"({self.n_truncated} truncated, {self.n_skipped} skipped), "
                f"{self.n_tokens} tokens, {self.n_trainable_tokens} trained")


def load_dataset(path, tokenizer, max_len: int, *, train_on: str = "all_turns",
                 replacements: dict[str, str] | None = None, system: str | None = None,
                 chat_template_kwargs: dict | None = None):
    """Read, validate and tokenize a data file: (examples, DataReport).

    Each example is {"input_ids": [...], "labels": [...]} of at most max_len tokens.
    replacements: {"name": "Lowrank"} turns every "{{name}}" in the text into "Lowrank".
    system: a system prompt for the text records that carry none (or an empty one).
    chat_template_kwargs: template variables for every text record, as apply_chat_template takes
    them: {"enable_thinking": False} (Qwen3, Qwen3.5), {"tools": [...]}.
    Any bad record raises DataError naming the file and record index, before training starts.
    """
    if train_on not in TRAIN_ON:
        raise ConfigError(f"train_on={train_on!r}: expected one of {TRAIN_ON}")
    _check_template_kwargs(chat_template_kwargs)
    if not isinstance(max_len, int) or max_len < 2:
        raise ConfigError(f"max_len={max_len!r}: expected an int >= 2")
    records = read_records(path)
    report = DataReport(path=str(path), n_records=len(records))
    examples = []
    for index, record in enumerate(records):
        try:
            if "input_ids" in record:
                found = [pretokenized_example(record, len(tokenizer))]
            else:
                messages = record_to_messages(record, replacements, system)
                found = tokenize_conversation(messages, tokenizer, train_on, chat_template_kwargs)
        except DataError as e:
            raise DataError(f"{path}: record {index}: {e}") from None
        if not found:
            report.n_skipped += 1
        for example in found:
            if len(example["input_ids"]) > max_len:
                example = {key: value[:max_len] for key, value in example.items()}
                report.n_truncated += 1
            trainable = count_trainable(example["labels"])
            if trainable == 0:
                report.n_skipped += 1
                continue
            examples.append(example)
            report.n_tokens += len(example["input_ids"])
            report.n_trainable_tokens += trainable
    report.n_examples = len(examples)
    if not examples:
        raise DataError(f"{path}: every example was skipped (no assistant token left within max_len={max_len}); "
                        f"{report.summary()}")
    return examples, report


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


# ---- reading files -------------------------------------------------------------------------

def read_records(path) -> list[dict]:
    """The records of a JSON array or a JSON Lines file (.jsonl, or a .json holding lines)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
    if not text.strip():
        raise DataError(f"{path}: the file is empty")
    records = None
    if path.suffix != ".jsonl":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            # "Extra data" after a first complete value: one record per line (JSON Lines).
            if e.msg != "Extra data":
                raise DataError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
        if records is not None and not isinstance(records, list):
            raise DataError(f"{path}: expected a JSON array of records, found a {type(records).__name__}")
    if records is None:
        records = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: line {lineno}: invalid JSON at column {e.colno}: {e.msg}") from None
    if not records:
        raise DataError(f"{path}: holds no records")
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataError(f"{path}: record {index}: expected a JSON object, found {type(record).__name__}")
    return records


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
    none when the conversation has no assistant message. chat_template_kwargs reach the template.
    """
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
    return [_label_spans(text, spans[text], tokenizer) for text in texts if spans[text]]


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
