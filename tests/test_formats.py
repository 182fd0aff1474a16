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
