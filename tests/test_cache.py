"""lowrank.data.cache: a cached load gives the examples and report of an uncached one, for every
record format; each option is its own entry; a damaged entry is rebuilt; a crash mid-build leaves
nothing behind; two ranks under torchrun tokenize once."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
from tests.conftest import FIXTURES, ROOT

import lowrank.data.examples as examples_module
from lowrank.data.dataset import load_dataset
from lowrank.data.tokenizer import load_tokenizer
from lowrank.errors import DataError

QWEN = FIXTURES / "tokenizers" / "qwen2.5-instruct"
CHAT = [{"role": "user", "content": "Hello {{name}}"}, {"role": "assistant", "content": "Hi there"},
        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "\n4."}]
RECORDS = [
    {"instruction": "Name a colour.", "input": "", "output": "Blue, {{name}}."},
    {"instruction": "Add", "input": "2 and 3", "output": "5", "system": "Be brief.", "history": [["hi", "hello"]]},
    {"messages": CHAT},
    {"conversations": [{"from": "human", "value": "Ping"}, {"from": "gpt", "value": "Pong"}]},
    {"input_ids": [1, 2, 3, 4, 5], "labels": [-100, -100, 3, 9, 5]},  # a trained label that is not its token
    {"input_ids": [7, 8, 9]},
    {"messages": [{"role": "user", "content": "no answer"}]},  # skipped
    {"instruction": "Count.", "input": "", "output": " ".join(str(i) for i in range(60))},  # truncated
]


@pytest.fixture(scope="module")
def qwen():
    return load_tokenizer(QWEN)


def write(path, records, jsonl=True):
    path.write_text("\n".join(map(json.dumps, records)) if jsonl else json.dumps(records), encoding="utf-8")
    return path


def load(path, tok, cache_dir=None, **kw):
    kw = {"max_len": 64, "replacements": {"name": "Lowrank"}, **kw}
    return load_dataset(path, tok, kw.pop("max_len"), cache_dir=cache_dir, **kw)


def plain(report):
    return dataclasses.replace(report, cache=None, from_cache=False)


@pytest.mark.parametrize("jsonl", [True, False])
def test_cached_and_uncached_loads_are_the_same(qwen, tmp_path, jsonl):
    data = write(tmp_path / ("d.jsonl" if jsonl else "d.json"), RECORDS, jsonl)
    memory, report = load(data, qwen)
    assert (report.n_examples, report.n_skipped, report.n_truncated) == (7, 1, 1)
    assert memory[4] == {"input_ids": [1, 2, 3, 4, 5], "labels": [-100, -100, 3, 9, 5]}
    built, built_report = load(data, qwen, tmp_path / "cache")
    mapped, mapped_report = load(data, qwen, tmp_path / "cache")
    assert not built_report.from_cache and mapped_report.from_cache
    assert list(memory) == list(built) == list(mapped) and len(mapped) == 7
    assert plain(report) == plain(built_report) == plain(mapped_report)
    assert mapped.subset([5, 0])[1] == memory[0] and list(mapped[2:4]) == list(memory)[2:4]


def test_every_option_is_its_own_entry(qwen, tmp_path):
    data = write(tmp_path / "d.jsonl", RECORDS)
    cache = tmp_path / "cache"

    def entry(path=data, tok=qwen, **kw):
        return load(path, tok, cache, **kw)[1].cache

    base = entry()
    assert entry() == base
    changed = [entry(max_len=32), entry(train_on="last_turn"), entry(replacements={"name": "Other"}),
               entry(system="You are terse."),
               entry(tok=dataclasses.replace(qwen, chat_template=qwen.chat_template.replace("You are", "Thou art"))),
               entry(path=write(tmp_path / "e.jsonl", RECORDS[:-1]))]
    other_vocab = tmp_path / "tok"
    other_vocab.mkdir()
    for f in QWEN.iterdir():
        (other_vocab / f.name).write_bytes(f.read_bytes())
    (other_vocab / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<|im_end|>"}))
    changed.append(entry(tok=load_tokenizer(other_vocab)))
    assert len({base, *changed}) == len(changed) + 1
    assert sorted(p.name for p in cache.iterdir()) == sorted(os.path.basename(p) for p in {base, *changed})


@pytest.mark.parametrize("damage", ["truncate", "meta"])
def test_a_damaged_entry_is_rebuilt_with_a_warning(qwen, tmp_path, damage):
    data = write(tmp_path / "d.jsonl", RECORDS)
    expected, report = load(data, qwen, tmp_path / "cache")
    expected, folder = list(expected), report.cache  # read before the damage: the map is of those files
    if damage == "truncate":
        with open(os.path.join(folder, "input_ids"), "r+b") as f:
            f.truncate(os.path.getsize(f.name) - 4)
    else:
        os.remove(os.path.join(folder, "meta.json"))
    with pytest.warns(UserWarning, match="corrupt token cache"):
        again, report = load(data, qwen, tmp_path / "cache")
    assert not report.from_cache and list(again) == expected
    assert load(data, qwen, tmp_path / "cache")[1].from_cache


def test_a_failed_build_leaves_no_entry(qwen, tmp_path, monkeypatch):
    data = write(tmp_path / "d.jsonl", RECORDS)
    add = examples_module.ExampleWriter.add
    calls = []

    def crash(self, *args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # a crash mid-write
        add(self, *args)

    monkeypatch.setattr(examples_module.ExampleWriter, "add", crash)
    with pytest.raises(KeyboardInterrupt):
        load(data, qwen, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []
    monkeypatch.undo()
    bad = write(tmp_path / "bad.jsonl", RECORDS + [{"instruction": 3, "output": "x"}])
    with pytest.raises(DataError, match=r"bad\.jsonl: record 8"):
        load(bad, qwen, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []
    assert not load(data, qwen, tmp_path / "cache")[1].from_cache


def test_a_new_build_removes_left_over_builds_that_stopped_writing(qwen, tmp_path):
    from lowrank.data import cache

    left = {}
    for name, idle in (("stopped", cache.STALE_AFTER + 60), ("live", cache.STALE_AFTER - 60)):
        tmp = tmp_path / "cache" / f".d-{name}.tmp-4242-abcdef01"
        tmp.mkdir(parents=True)
        (tmp / "input_ids").write_bytes(b"\0" * 12)
        then = os.path.getmtime(tmp) - idle
        for p in (tmp / "input_ids", tmp):  # the folder last: writing its file touched it
            os.utime(p, (then, then))
        left[name] = tmp
    os.utime(left["live"] / "input_ids")  # a build still writing: its file is new, the folder old
    entry = tmp_path / "cache" / "kept-0123"  # a complete entry is never swept
    entry.mkdir()
    os.utime(entry, (0, 0))
    load(write(tmp_path / "d.jsonl", RECORDS), qwen, tmp_path / "cache")
    assert not left["stopped"].exists() and left["live"].is_dir() and entry.is_dir()
    assert load(write(tmp_path / "d.jsonl", RECORDS), qwen, tmp_path / "cache")[1].from_cache


@pytest.mark.parametrize("cached", [False, True])
def test_records_read_a_chunk_at_a_time_give_the_same_load(qwen, tmp_path, monkeypatch, cached):
    from lowrank.data import dataset

    data = write(tmp_path / "d.jsonl", RECORDS * 3)
    whole, whole_report = load(data, qwen)
    monkeypatch.setattr(dataset, "CHUNK", 3)  # chunks cut across the records, the skipped and the truncated
    got, got_report = load(data, qwen, tmp_path / "cache" if cached else None)
    assert list(got) == list(whole) and plain(got_report) == whole_report
    bad = write(tmp_path / "bad.jsonl", RECORDS * 2 + [{"instruction": "x", "output": 3}])
    with pytest.raises(DataError, match=r"bad\.jsonl: record 16: field 'output' must be a string"):
        load(bad, qwen, tmp_path / "cache" if cached else None)


RANK_SCRIPT = """
import json, sys
import torch.distributed as dist
from lowrank.data.dataset import load_dataset
from lowrank.data.tokenizer import load_tokenizer
dist.init_process_group("gloo")
examples, report = load_dataset(sys.argv[1], load_tokenizer(sys.argv[2]), 64, cache_dir=sys.argv[3])
print(json.dumps({"rank": dist.get_rank(), "from_cache": report.from_cache, "n": len(examples),
                  "first": examples[0]}))
dist.destroy_process_group()
"""


def test_two_ranks_tokenize_once(tmp_path):
    data = write(tmp_path / "d.jsonl", RECORDS)
    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(data), str(QWEN), str(tmp_path / "cache")]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    rows = sorted((json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")),
                  key=lambda r: r["rank"])
    assert [r["from_cache"] for r in rows] == [False, True]  # rank 0 built it, rank 1 mapped it
    assert rows[0]["n"] == rows[1]["n"] == 7 and rows[0]["first"] == rows[1]["first"]
    assert len(list((tmp_path / "cache").iterdir())) == 1
