"""Data files to records: JSON, JSON Lines, CSV / TSV and Parquet, and the plain-text record.

`iter_records` yields the dicts that `dataset.py` turns into examples, so a format is one reader
here and the record layouts (alpaca, messages, sharegpt, pre-tokenized, text) are the same in all
of them:

- ``.json`` / ``.jsonl``: a JSON array of objects, or one object per line;
- ``.csv`` / ``.tsv``: a header row naming the fields (``instruction,input,output``, ``text``, ...);
  a cell of a list field (``messages``, ``conversations``, ``history``, ``input_ids``, ``labels``)
  holds that list as JSON; an empty cell is an empty string;
- ``.parquet``: columns named as the fields, lists of structs for ``messages`` (read with pyarrow,
  an optional dependency); a null cell is a field left out.

Records stream: JSON Lines and CSV a line at a time, a JSON array element by element
(`json.JSONDecoder.raw_decode` over a sliding block of the text), Parquet a batch of rows at a
time, so reading holds one chunk of records, not the file. Bad files raise the messages of the
whole-file reader (`_read_whole`, what lowrank did before it streamed): the stream only reads
files it can read exactly as that reader would, and at the first thing it cannot (a syntax
error, a record that is not an object, bytes that are not UTF-8, an empty file) it hands the file
to `_read_whole`, which raises its error naming the file and line, or gives the records the
stream had not yet yielded. The one difference: records before a syntax error are yielded (and
may fail their own checks) before the syntax error is found.

A record ``{"text": ...}`` is plain language-model data: the text is tokenized as it is (with the
bos the tokenizer adds, and its eos appended), and every token is trained.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import re
from collections.abc import Iterator
from pathlib import Path

from ..errors import DataError

# Fields whose value is a list: a CSV cell holds them as JSON text.
LIST_FIELDS = ("messages", "conversations", "history", "input_ids", "labels", "attention_mask")
TABLE_SUFFIXES = {".csv": ",", ".tsv": "\t"}
BLOCK = 1 << 20  # characters of a JSON array read at a time
PARQUET_ROWS = 2048  # rows of a Parquet file converted to dicts at a time


def read_records(path) -> list[dict]:
    """The records of a data file, by its suffix: .csv, .tsv, .parquet, else JSON / JSON Lines."""
    return list(iter_records(path))


def iter_records(path) -> Iterator[dict]:
    """The records of a data file one at a time, as read_records lists them (see the module doc)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        stream = _stream_parquet(path)
    elif suffix in TABLE_SUFFIXES:
        stream = _stream_table(path, TABLE_SUFFIXES[suffix])
    else:
        stream = _stream_json(path)
    n = 0
    try:
        for record in stream:
            if not isinstance(record, dict):
                raise _Unsure
            yield record
            n += 1
        if n:
            return
    except (_Unsure, UnicodeDecodeError):
        pass
    # No record, or something only the whole-file reader words right: it raises its error, or
    # (a file it reads another way) gives the records after those already yielded.
    yield from itertools.islice(_read_whole(path), n, None)


class _Unsure(Exception):
    """The stream met what it does not read exactly as _read_whole does."""


def _read_whole(path: Path) -> list[dict]:
    """The records of the file read whole: the reference of the streams, and their error messages."""
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


JSON_SPACE = re.compile(r"[ \t\n\r]*")  # what the json module skips between tokens


def _stream_json(path: Path) -> Iterator:
    with open(path, encoding="utf-8") as f:
        if path.suffix == ".jsonl":
            yield from _stream_lines(f)
            return
        head, start = "", 0
        while start == len(head):  # to the first character of the first value
            block = f.read(BLOCK)
            if not block:
                raise _Unsure  # an empty file
            head = block
            start = JSON_SPACE.match(head).end()
        if head[start] == "[":
            yield from _stream_array(f, head, start + 1)
            return
        if head[start] != "{":
            raise _Unsure
        # Objects one per line, as json.loads of the whole text reads them: a first line that is a
        # whole object followed by more ("Extra data"). One object alone is an error: _read_whole's.
        f.seek(0)
        lines = _stream_lines(f)
        first, second = next(lines, None), next(lines, None)
        if second is None:
            raise _Unsure
        yield first
        yield second
        yield from lines


def _stream_lines(f) -> Iterator:
    for line in f:
        for piece in line.splitlines():  # str.splitlines cuts at more than "\n", as _read_json does
            if piece.strip():
                try:
                    yield json.loads(piece)
                except json.JSONDecodeError:
                    raise _Unsure from None


def _stream_array(f, buf: str, pos: int) -> Iterator:
    """The elements of the JSON array whose "[" ends at buf[pos - 1]; the file's rest follows buf."""
    decode = json.JSONDecoder().raw_decode
    size = BLOCK
    while True:
        pos = JSON_SPACE.match(buf, pos).end()
        try:
            value, pos = decode(buf, pos)
        except json.JSONDecodeError:
            # The block ends inside this element (or the file is broken: then it ends too).
            block = f.read(size)
            if not block:
                raise _Unsure from None
            buf, pos, size = buf[pos:] + block, 0, size * 2
            continue
        # A complete object is right whatever follows; a number cut at the block's end is not,
        # but it is no record either, and iter_records hands a non-object to _read_whole.
        yield value
        size = BLOCK
        pos = JSON_SPACE.match(buf, pos).end()
        while pos == len(buf):
            buf = f.read(BLOCK)
            if not buf:
                raise _Unsure
            pos = JSON_SPACE.match(buf).end()
        if buf[pos] == "]":
            rest = buf[pos + 1:]
            while rest:  # only whitespace may follow the array
                if JSON_SPACE.fullmatch(rest) is None:
                    raise _Unsure
                rest = f.read(BLOCK)
            return
        if buf[pos] != ",":
            raise _Unsure
        pos += 1


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
    return list(_table_records(path, iter(rows)))


def _stream_table(path: Path, delimiter: str) -> Iterator[dict]:
    # Newlines translated as Path.read_text does for _read_table, so cells read the same.
    with open(path, encoding="utf-8") as f:
        try:
            yield from _table_records(path, csv.reader(f, delimiter=delimiter))
        except (csv.Error, DataError):
            raise _Unsure from None


def _table_records(path: Path, rows) -> Iterator[dict]:
    """Records of table rows, the first of which is the header."""
    header = next(rows, None)
    if header is None:
        raise DataError(f"{path}: the file is empty")
    if len(set(header)) != len(header) or not all(h.strip() for h in header):
        raise DataError(f"{path}: line 1: the header {header!r} must name each column once")
    header = [h.strip() for h in header]
    for number, row in enumerate(rows, start=2):
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
        yield record


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
    return _without_nulls(rows)


def _stream_parquet(path: Path) -> Iterator[dict]:
    """A row group's batches at a time; any trouble (no pyarrow, a broken file) is _read_whole's to word."""
    try:
        import pyarrow.parquet as pq

        batches = pq.ParquetFile(path).iter_batches(batch_size=PARQUET_ROWS)
        while (batch := next(batches, None)) is not None:
            yield from _without_nulls(batch.to_pylist())
    except Exception:  # as _read_parquet: pyarrow's errors share no narrower base
        raise _Unsure from None


def _without_nulls(rows: list[dict]) -> list[dict]:
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
