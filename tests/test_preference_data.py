"""lowrank.data.preference: every record format gives the pair that transformers' chat template
rendering of the same conversation gives, answers only trained, and bad records fail with a
DataError naming the file and the record."""

import json

import pytest

from lowrank.data.preference import collate_pairs, load_preference_dataset, make_pair_batches
from lowrank.data.tokenizer import load_tokenizer
from lowrank.errors import DataError
from tests.train_helpers import tiny_chat_model_dir, write_preference_records


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_chat_model_dir(tmp_path_factory.mktemp("chat") / "model")


def expected_side(hf_tok, history, answer):
    """transformers' rendering: ids of history + answer, labels on the answer through <|im_end|>."""
    prompt = hf_tok.apply_chat_template(history, add_generation_prompt=True, tokenize=False)
    full = hf_tok.apply_chat_template(history + [{"role": "assistant", "content": answer}], tokenize=False)
    answer_text = full[len(prompt):full.rindex("<|im_end|>") + len("<|im_end|>")]
    p, a = hf_tok.encode(prompt, add_special_tokens=False), hf_tok.encode(answer_text, add_special_tokens=False)
    rest = hf_tok.encode(full[len(prompt) + len(answer_text):], add_special_tokens=False)
    return {"input_ids": p + a + rest, "labels": [-100] * len(p) + a + [-100] * len(rest)}


@pytest.mark.parametrize("fmt", ["trl", "trl_messages", "alpaca", "sharegpt"])
def test_formats_give_the_template_rendering(folder, tmp_path, fmt):
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(folder)
    path = write_preference_records(tmp_path / "p.jsonl", 5, seed=11, fmt=fmt)
    plain = [json.loads(line) for line in write_preference_records(tmp_path / "t.jsonl", 5, seed=11).read_text()
             .splitlines()]
    pairs, report = load_preference_dataset(path, load_tokenizer(folder), max_len=512)
    assert report.n_pairs == len(pairs) == 5
    for pair, record in zip(pairs, plain):
        history = [{"role": "user", "content": record["prompt"]}]
        for side in ("chosen", "rejected"):
            assert pair[side] == expected_side(hf_tok, history, record[side]), side


def test_shared_history_system_and_implicit_prompt(folder, tmp_path):
    tok = load_tokenizer(folder)
    history = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi who are you"}]
    records = [
        {"messages": history, "system": "you are the model", "prompt": "what is your name",
         "chosen": "I am lowrank", "rejected": "no"},
        # TRL's implicit prompt: whole conversations, the last message the answer
        {"chosen": [{"role": "system", "content": "you are the model"}, *history,
                    {"role": "user", "content": "what is your name"}, {"role": "assistant", "content": "I am lowrank"}],
         "rejected": [{"role": "system", "content": "you are the model"}, *history,
                      {"role": "user", "content": "what is your name"}, {"role": "assistant", "content": "no"}]},
    ]
    path = tmp_path / "h.json"
    path.write_text(json.dumps(records))
    (a, b), _ = load_preference_dataset(path, tok, max_len=512)
    assert a == b
    # Only the last answer is trained; the earlier assistant turn is context.
    trained = tok.decode([t for t in a["chosen"]["labels"] if t != -100])
    assert trained == "I am lowrank<|im_end|>"


def test_truncation_keeps_pairs_with_an_answer_left(folder, tmp_path):
    tok = load_tokenizer(folder)
    path = tmp_path / "long.json"
    long = " ".join(["the model answer"] * 40)
    path.write_text(json.dumps([{"prompt": "hi", "chosen": long, "rejected": "no"},
                                {"prompt": " ".join(["hello"] * 60), "chosen": "yes", "rejected": "no"}]))
    pairs, report = load_preference_dataset(path, tok, max_len=30)
    assert report.n_pairs == 1 and report.n_skipped == 1 and report.n_truncated >= 1
    assert len(pairs[0]["chosen"]["input_ids"]) == 30


BAD = {
    "no rejected": ({"prompt": "hi", "chosen": "yes"}, "record 1: missing field 'rejected'"),
    "empty answer": ({"prompt": "hi", "chosen": "  ", "rejected": "no"}, "record 1: 'chosen': the answer is empty"),
    "unknown": ({"question": "hi", "chosen": "a", "rejected": "b"}, "record 1: unknown preference record"),
    "alpaca list": ({"instruction": "hi", "chosen": ["a"], "rejected": "b"}, "record 1: field 'chosen' must be a string"),
    "ends with user": ({"prompt": "hi", "chosen": [{"role": "user", "content": "x"}], "rejected": "b"},
                       "record 1: 'chosen': the conversation must end with the assistant's answer"),
    "sharegpt role": ({"conversations": [{"from": "human", "value": "hi"}], "chosen": {"from": "bot", "value": "a"},
                       "rejected": "b"}, "record 1: 'conversations'\\[1\\]: unknown role 'bot'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_records_name_the_file_and_record(folder, tmp_path, case):
    record, message = BAD[case]
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "ok", "chosen": "a", "rejected": "b"}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError, match=f"{path}: {message}"):
        load_preference_dataset(path, load_tokenizer(folder), max_len=64)


def test_pair_batches_put_chosen_then_rejected(folder, tmp_path):
    import torch

    pairs, _ = load_preference_dataset(write_preference_records(tmp_path / "p.jsonl", 5, seed=3),
                                       load_tokenizer(folder), max_len=512)
    table = torch.randn(5, 2)
    batches = make_pair_batches(pairs, 2, pad_id=0, seed=1, ref_logps=table)
    assert sorted(i for b in batches for i in b["pair_index"].tolist()) == list(range(5))
    for b in batches:
        index = b["pair_index"].tolist()
        n = len(index)
        assert b["input_ids"].shape[0] == 2 * n
        for row, i in enumerate(index):
            for side, offset in (("chosen", 0), ("rejected", n)):
                ids = pairs[i][side]["input_ids"]
                assert b["input_ids"][offset + row, :len(ids)].tolist() == ids
        assert torch.equal(b["ref_logps"], torch.cat([table[index, 0], table[index, 1]]))
    assert collate_pairs(pairs[:2], 0)["labels"].shape[0] == 4


def test_pretokenized_pairs(folder, tmp_path):
    path = tmp_path / "ids.jsonl"
    path.write_text(json.dumps({"prompt_ids": [5, 9, 2], "chosen_ids": [7, 7], "rejected_ids": [3]}) + "\n")
    (pair,), _ = load_preference_dataset(path, load_tokenizer(folder), max_len=64)
    assert pair == {"chosen": {"input_ids": [5, 9, 2, 7, 7], "labels": [-100, -100, -100, 7, 7]},
                    "rejected": {"input_ids": [5, 9, 2, 3], "labels": [-100, -100, -100, 3]}}
    path.write_text(json.dumps({"prompt_ids": [5], "chosen_ids": [7], "rejected_ids": [99999]}) + "\n")
    with pytest.raises(DataError, match=r"record 0: 'rejected_ids'\[0\] = 99999: expected a token id"):
        load_preference_dataset(path, load_tokenizer(folder), max_len=64)
