"""lowrank/data/formats.py: CSV, TSV and Parquet files give the same examples as the equivalent
JSON; {"text": ...} records train every token; bad files fail with a message naming what to fix."""

import csv
import json
import sys

import pytest

from lowrank.data.dataset import load_dataset
from lowrank.data.formats import read_records
from lowrank.data.tokenizer import load_tokenizer
from lowrank.errors import DataError
from tests.conftest import DATA, FIXTURES


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(FIXTURES / "tokenizers" / "qwen2.5-instruct")


@pytest.fixture(scope="module")
def alpaca():
    records = json.loads((DATA / "alpaca_zh_demo.json").read_text(encoding="utf-8"))[5:16]
    return [{"instruction": r["instruction"], "input": r["input"], "output": r["output"]} for r in records]


@pytest.fixture(scope="module")
def chats():
    records = json.loads((DATA / "identity.json").read_text(encoding="utf-8"))[:7]
    return [{"messages": [{"role": "system", "content": "Be brief, \"quoted\", x,y"},
                          {"role": "user", "content": r["instruction"]},
                          {"role": "assistant", "content": r["output"]}]} for r in records]


def _write_table(path, records, delimiter):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows({k: json.dumps(v, ensure_ascii=False) if isinstance(v, list) else v for k, v in r.items()}
                         for r in records)


def _write_parquet(path, records):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), path)


def _same_examples(tmp_path, tok, records, path):
    reference = tmp_path / "reference.json"
    reference.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    want, want_report = load_dataset(reference, tok, 512)
    got, got_report = load_dataset(path, tok, 512)
    assert got == want and got_report.n_examples == want_report.n_examples == len(records)


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".parquet"])
@pytest.mark.parametrize("layout", ["alpaca", "chats"])
def test_tables_give_the_examples_of_the_same_json(tmp_path, tok, request, suffix, layout):
    records = request.getfixturevalue(layout)
    path = tmp_path / f"data{suffix}"
    if suffix == ".parquet":
        _write_parquet(path, records)
    else:
        _write_table(path, records, "\t" if suffix == ".tsv" else ",")
    _same_examples(tmp_path, tok, records, path)


def test_text_records_train_every_token_and_end_with_eos(tmp_path, tok):
    texts = ["The first document.\nIt has two lines.", "第二篇 {{name}}", "x"]
    path = tmp_path / "lm.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in texts), encoding="utf-8")
    examples, report = load_dataset(path, tok, 512, replacements={"name": "lowrank"})
    for text, example in zip([texts[0], "第二篇 lowrank", "x"], examples):
        ids = tok.encode(text) + [tok.eos_token_id]
        assert example == {"input_ids": ids, "labels": ids}
    assert report.n_trainable_tokens == sum(len(e["input_ids"]) - 1 for e in examples)
    csv_path = tmp_path / "lm.csv"
    _write_table(csv_path, [{"text": t} for t in texts], ",")
    assert load_dataset(csv_path, tok, 512, replacements={"name": "lowrank"})[0] == examples


@pytest.mark.parametrize("name,content,message", [
    ("data.json", "instruction,input,output\nhi,,yo\n", r"data.json: not JSON: it looks like CSV \(first line "
     r"'instruction,input,output'\); name the file .csv"),
    ("data.json", '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c", "output": "d"},\n]\n',
     r"data.json: trailing comma at line 3, column 38, before '\]'"),
    ("data.json", '[{"instruction": "a", "output": "b",}]', r"trailing comma at line 1, column 36, before '}'"),
    ("data.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": "b",}\n',
     r"data.jsonl: line 2: trailing comma at column 35"),
    ("data.csv", "instruction,output\nhi,yo,extra\n", r"data.csv: line 2: 3 fields, the header has 2"),
    ("data.csv", 'messages\n"[{""role"": ""user""}"\n', r"data.csv: line 2: column 'messages' must hold a JSON list"),
    ("data.parquet", "not parquet", r"data.parquet: not a readable Parquet file"),
])
def test_bad_files_name_what_to_fix(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        read_records(path)


def test_parquet_without_pyarrow_says_so(tmp_path, monkeypatch):
    path = tmp_path / "data.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import fails as when not installed
    with pytest.raises(DataError, match=r"data.parquet: reading Parquet needs pyarrow, which is not installed"):
        read_records(path)


# ---- streaming: iter_records reads as the whole-file reader does ----------------------------------

ROW = {"instruction": "第 1 题, \"quoted\"\u2028sep", "output": "b\r\nc", "history": [["x", "y"]], "n": 12345}
TEXTS = {  # name -> the file's text: valid files in every layout, and the broken ones
    "array.json": "[\n" + ",\n".join(json.dumps(dict(ROW, n=i), ensure_ascii=False) for i in range(9)) + "\n]\n",
    "compact.json": json.dumps([dict(ROW, n=i) for i in range(7)]) + " \r\n\t",
    "array_then_ff.json": json.dumps([ROW, ROW]) + "\n\x0c",
    "two_arrays.json": json.dumps([ROW]) + "\n" + json.dumps([ROW]),
    "empty_array.json": "[ \n ]",
    "trailing_comma.json": json.dumps([ROW, ROW])[:-1] + ",]",
    "number_element.json": json.dumps([ROW, ROW]).replace("}]", "}, 1234567]"),
    "unterminated.json": json.dumps([ROW, ROW])[:-3],
    "one_object.json": json.dumps(ROW),
    "pretty_object.json": json.dumps(ROW, indent=2),
    "lines.json": "\r\n".join(json.dumps(dict(ROW, n=i)) for i in range(5)) + "\n\n",
    "lines_raw_separator.json": json.dumps(ROW) + "\n" + json.dumps(ROW, ensure_ascii=False),
    "object_then_ff.json": json.dumps(ROW) + "\n\x0c\n",
    "scalar.json": "  5 ",
    "table.json": "instruction,output\nhi,yo\n",
    "bom.json": "\ufeff" + json.dumps([ROW]),
    "space.json": " \n\t ",
    "lines.jsonl": "\n" + "\r\n".join(json.dumps(dict(ROW, n=i)) for i in range(6)),
    "raw_separator.jsonl": json.dumps(ROW, ensure_ascii=False) + "\n",
    "bad_line.jsonl": json.dumps(ROW) + "\n{oops\n" + json.dumps(ROW),
    "list_line.jsonl": json.dumps(ROW) + "\n[1]\n",
    "bom.jsonl": "\ufeff" + json.dumps(ROW),
    "empty.jsonl": "",
    "quoted.csv": 'instruction,output,history\n"a\r\nb",yo,"[[""x"", ""y""]]"\r\n\r\nc,"d,e",[]\n',
    "quoted.tsv": "instruction\toutput\n\"a\tb\"\tyo\nc\td\n",
    "ragged.csv": "instruction,output\na,b\nc\n",
    "header_only.csv": "instruction,output\n",
    "twice.csv": "a,a\n1,2\n",
    "blank.csv": " \n",
    "bad_quote.csv": 'instruction,output\na,b\n"c,d\n',
}


def _outcome(read, path):
    try:
        return read(path)
    except DataError as e:
        return f"DataError: {e}"


@pytest.mark.parametrize("block", [5, 64, 1 << 20])
@pytest.mark.parametrize("name", sorted(TEXTS))
def test_streamed_records_are_the_whole_files(tmp_path, monkeypatch, name, block):
    from lowrank.data import formats

    path = tmp_path / name
    path.write_bytes(TEXTS[name].encode("utf-8"))  # bytes: the newlines stay as written
    monkeypatch.setattr(formats, "BLOCK", block)  # elements cut at block ends
    want = _outcome(formats._read_whole, path)
    assert _outcome(formats.read_records, path) == want
    if name.startswith(("trailing", "bad_line")):
        assert "comma" in want or "line 2" in want  # the whole reader's message, naming the place


def test_not_utf8_late_in_the_file_says_so(tmp_path):
    path = tmp_path / "data.jsonl"
    good, bad = (json.dumps(ROW) + "\n").encode() * 50, b'{"instruction": "\xff"}\n'
    path.write_bytes(good + bad)
    where = len(good) + bad.index(b"\xff")  # the byte's position in the file, not in a block of it
    with pytest.raises(DataError, match=rf"data.jsonl: not UTF-8 text \('utf-8' codec can't decode byte 0xff in "
                                        rf"position {where}:"):
        read_records(path)


@pytest.mark.parametrize("name", ["array.json", "compact.json", "lines.json", "lines.jsonl", "quoted.csv",
                                  "quoted.tsv", "rows.parquet"])
def test_valid_files_stream_without_reading_them_whole(tmp_path, monkeypatch, name):
    from lowrank.data import formats

    path = tmp_path / name
    if name.endswith(".parquet"):
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        rows = [dict(ROW, n=i, output=None if i % 3 == 0 else f"out {i}") for i in range(11)]
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=4)
        monkeypatch.setattr(formats, "PARQUET_ROWS", 3)
    else:
        path.write_bytes(TEXTS[name].encode("utf-8"))
    want = formats._read_whole(path)
    monkeypatch.setattr(formats, "BLOCK", 64)
    monkeypatch.setattr(formats, "_read_whole", lambda p: pytest.fail(f"{p} was read whole"))
    assert list(formats.iter_records(path)) == want
