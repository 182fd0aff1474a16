"""Data files to records: JSON, JSON Lines, CSV / TSV and Parquet, and the plain-text record.

Every reader returns a list of dicts that `dataset.py` turns into examples, so a format is one
function here and the record layouts (alpaca, messages, sharegpt, pre-tokenized, text) are the
same in all of them:

- ``.json`` / ``.jsonl``: a JSON array of objects, or one object per line;
- ``.csv`` / ``.tsv``: a header row naming the fields (``instruction,input,output``, ``text``, ...);
  a cell of a list field (``messages``, ``conversations``, ``history``, ``input_ids``, ``labels``)
  holds that list as JSON; an empty cell is an empty string;
- ``.parquet``: columns named as the fields, lists of structs for ``messages`` (read with pyarrow,
  an optional dependency); a null cell is a field left out.

A record ``{"text": ...}`` is plain language-model data: the text is tokenized as it is (with the
bos the tokenizer adds, and its eos appended), and every token is trained.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from ..errors import DataError

# Fields whose value is a list: a CSV cell holds them as JSON text.
LIST_FIELDS = ("messages", "conversations", "history", "input_ids", "labels", "attention_mask")
TABLE_SUFFIXES = {".csv": ",", ".tsv": "\t"}


def read_records(path) -> list[dict]:
    """The records of a data file, by its suffix: .csv, .tsv, .parquet, else JSON / JSON Lines."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        records = _read_parquet(path)
    else:
        text = _read_text(path)
        records = _read_table(path, text, TABLE_SUFFIXES[suffix]) if suffix in TABLE_SUFFIXES else \
            _read_json(path, text)
    if not records:
        raise DataError(f"{path}: holds no records")
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataError(f"{path}: record {index}: expected a JSON object, found {type(record).__name__}")
    return records


def _read_text(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
    if not text.strip():
        raise DataError(f"{path}: the file is empty")
    return text


# ---- JSON ----------------------------------------------------------------------------------------

def _read_json(path: Path, text: str) -> list:
    records = None
    if path.suffix != ".jsonl":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            # "Extra data" after a first complete value: one record per line (JSON Lines).
            if e.msg != "Extra data" or _looks_like_table(text):
                raise DataError(f"{path}: {_why_invalid(text, e)}") from None
        if records is not None and not isinstance(records, list):
            raise DataError(f"{path}: expected a JSON array of records, found a {type(records).__name__}")
    if records is None:
        records = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    if lineno == 1 and _looks_like_table(text):
                        raise DataError(f"{path}: {_why_invalid(text, e)}") from None
                    raise DataError(f"{path}: line {lineno}: {_why_invalid(line, e, column_only=True)}") from None
    return records


def _looks_like_table(text: str) -> bool:
    first = text.lstrip().split("\n", 1)[0]
    return not first.startswith(("{", "[")) and ("," in first or "\t" in first)


def _why_invalid(text: str, e: json.JSONDecodeError, column_only: bool = False) -> str:
    """The JSON error as a user can act on it: a CSV file, a trailing comma, or where it broke."""
    if e.lineno == 1 and _looks_like_table(text):
        first = text.lstrip().split("\n", 1)[0]
        kind = "TSV" if "\t" in first and "," not in first else "CSV"
        return (f"not JSON: it looks like {kind} (first line {first[:60]!r}); name the file "
                f".{kind.lower()} to read it as a table with a header row")
    before = text[:e.pos].rstrip()
    if before.endswith(",") and text[e.pos:e.pos + 1] in ("}", "]"):
        comma = len(before) - 1
        line = text.count("\n", 0, comma) + 1
        column = comma - (text.rfind("\n", 0, comma) + 1) + 1
        where = f"column {column}" if column_only else f"line {line}, column {column}"
        return f"trailing comma at {where}, before {text[e.pos]!r}: JSON allows no comma after the last item"
    where = f"column {e.colno}" if column_only else f"line {e.lineno}, column {e.colno}"
    return f"invalid JSON at {where}: {e.msg}"


# ---- tables ----------------------------------------------------------------------------------------

def _read_table(path: Path, text: str, delimiter: str) -> list[dict]:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        rows = list(reader)
    except csv.Error as e:
        raise DataError(f"{path}: line {reader.line_num}: not valid {path.suffix[1:].upper()} ({e})") from None
    header, records = rows[0], []
    if len(set(header)) != len(header) or not all(h.strip() for h in header):
        raise DataError(f"{path}: line 1: the header {header!r} must name each column once")
    header = [h.strip() for h in header]
    for number, row in enumerate(rows[1:], start=2):
        if not row:
            continue  # a blank line
        if len(row) != len(header):
            raise DataError(f"{path}: line {number}: {len(row)} fields, the header has {len(header)}")
        record = dict(zip(header, row))
        for key in LIST_FIELDS:
            if key in record:
                try:
                    record[key] = json.loads(record[key])
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: line {number}: column {key!r} must hold a JSON list "
                                    f"({e.msg} at character {e.pos + 1})") from None
        records.append(record)
    return records


def _read_parquet(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow, which is not installed "
                        "(pip install 'lowrank[parquet]' or pip install pyarrow)") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow's errors have no common base beyond ArrowException / OSError
        raise DataError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None
    return [{k: v for k, v in row.items() if v is not None} for row in rows]


# ---- the plain-text record ----------------------------------------------------------------------

def text_example(record: dict, tokenizer, replacements: dict[str, str] | None = None) -> dict:
    """{"text": ...} as an example whose every token is trained: the text's ids (with the bos the
    tokenizer adds) and its eos, so the model learns where a document ends."""
    text = record["text"]
    if not isinstance(text, str) or not text:
        raise DataError(f"field 'text' must be a non-empty string, found {text!r:.80}")
    for key, value in (replacements or {}).items():
        text = text.replace("{{" + key + "}}", value)
    ids = tokenizer.encode(text, add_special_tokens=True)
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    return {"input_ids": ids, "labels": list(ids)}
