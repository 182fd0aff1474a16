"""lowrank.data.dataset: records to masked examples, checked against transformers' rendering and
tokenization."""

import dataclasses
import json
import random
import shutil

import pytest
from tests.conftest import DATA, FIXTURES

from lowrank.data.dataset import load_dataset, tokenize_conversation
from lowrank.errors import ConfigError, DataError
from lowrank.data.tokenizer import load_tokenizer

QWEN = FIXTURES / "tokenizers" / "qwen2.5-instruct"
TEMPLATES = FIXTURES / "chat_templates"
IDENTITY = {"name": "Lowrank", "author": "the lowrank team"}


@pytest.fixture(scope="module")
def qwen():
    return load_tokenizer(QWEN)


@pytest.fixture(scope="module")
def hf_qwen():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(QWEN)


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    """DeepSeek-R1-Distill-Qwen (config + template) on Qwen's vocabulary, and transformers' twin.

    The fixture's config lacks the added tokens of the published tokenizer.json; they are put
    back at the ids generation_config.json names (bos 151646, eos 151643), so that <｜User｜>
    and <｜Assistant｜> are single tokens as in the real model."""
    from transformers import Qwen2Tokenizer

    source = FIXTURES / "tokenizers" / "deepseek-r1-distill-qwen"
    folder = tmp_path_factory.mktemp("deepseek-r1-distill-qwen")
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(QWEN / name, folder / name)
    config = json.loads((source / "tokenizer_config.json").read_text(encoding="utf-8"))
    added = ["<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<｜begin▁of▁sentence｜>"]
    config["added_tokens_decoder"] = {str(151643 + i): {"content": t, "special": "sentence" in t}
                                      for i, t in enumerate(added)}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    tok = load_tokenizer(folder)
    generation = json.loads((source / "generation_config.json").read_text())
    assert (tok.bos_token_id, tok.eos_token_id) == (generation["bos_token_id"], generation["eos_token_id"])
    return tok, Qwen2Tokenizer.from_pretrained(folder)


def trained_segments(example, tok):
    """The runs of trained labels, decoded; labels must equal the input ids wherever trained."""
    ids, labels = example["input_ids"], example["labels"]
    assert len(ids) == len(labels)
    segments, run = [], []
    for i, label in enumerate(labels + [-100]):
        if label != -100:
            assert label == ids[i]
            run.append(label)
        elif run:
            segments.append(tok.decode(run))
            run = []
    return segments


def write(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content, ensure_ascii=False),
                    encoding="utf-8")
    return path


def alpaca_messages(record):
    query = record["instruction"] + ("\n" + record["input"] if record["input"] else "")
    return [{"role": "user", "content": query}, {"role": "assistant", "content": record["output"]}]


# ---- the sample data sets ---------------------------------------------------------------------

@pytest.mark.parametrize("name", ["identity.json", "alpaca_en_demo.json", "alpaca_zh_demo.json", "huanhuan-100.json"])
def test_sample_datasets(qwen, hf_qwen, name):
    records = json.loads((DATA / name).read_text(encoding="utf-8"))
    replacements = IDENTITY if name == "identity.json" else None
    examples, report = load_dataset(DATA / name, qwen, max_len=1 << 15, replacements=replacements)
    assert report.n_records == len(records) == report.n_examples == len(examples)
    assert report.n_truncated == report.n_skipped == 0
    assert report.n_tokens == sum(len(e["input_ids"]) for e in examples)
    assert report.n_trainable_tokens == sum(sum(label != -100 for label in e["labels"][1:]) for e in examples)

    for index in random.Random(0).sample(range(len(records)), 12):
        record = dict(records[index])
        for key, value in (replacements or {}).items():
            record = {k: v.replace("{{" + key + "}}", value) for k, v in record.items()}
        messages = alpaca_messages(record)
        ids = hf_qwen.apply_chat_template(messages, tokenize=True, return_dict=False)
        assert examples[index]["input_ids"] == ids
        # the answer and its <|im_end|> are trained; the "\n" after it and everything before are not
        assert trained_segments(examples[index], qwen) == [record["output"] + "<|im_end|>"]
        assert "{{" not in qwen.decode(ids)


def test_max_len_truncates_prompt_then_answer_and_skips(qwen, tmp_path):
    long_answer = {"instruction": "Count.", "input": "", "output": " ".join(str(i) for i in range(200))}
    (whole,) = tokenize_conversation(alpaca_messages(long_answer), qwen)
    max_len = len(whole["input_ids"]) - 50
    assert sum(label != -100 for label in whole["labels"][:max_len]) > 0
    records = [long_answer,
               {"instruction": "word " * max_len, "input": "", "output": "ok"},  # only prompt fits
               {"instruction": "hi", "input": "", "output": "hello"}]
    examples, report = load_dataset(write(tmp_path, "d.json", records), qwen, max_len)
    assert (report.n_records, report.n_examples, report.n_truncated, report.n_skipped) == (3, 2, 2, 1)
    assert examples[0] == {key: value[:max_len] for key, value in whole.items()}
    assert examples[1] == tokenize_conversation(alpaca_messages(records[2]), qwen)[0]
    assert "1 skipped" in report.summary()


# ---- chat formats and masking -------------------------------------------------------------------

CHAT = [
    {"role": "system", "content": "You are a careful assistant."},
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hi there"},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "\n4, as\n\nalways."},
    {"role": "user", "content": "Thanks"},
    {"role": "assistant", "content": "You're welcome 😊"},
]


def test_multi_turn_chat_all_turns_and_last_turn(qwen, hf_qwen, tmp_path):
    path = write(tmp_path, "chat.jsonl", json.dumps({"messages": CHAT}) + "\n")
    ids = hf_qwen.apply_chat_template(CHAT, tokenize=True, return_dict=False)
    answers = [m["content"] + "<|im_end|>" for m in CHAT if m["role"] == "assistant"]
    # The second answer opens with "\n": BPE merges it with the "\n" closing the prompt into one
    # token "\n\n", which straddles the boundary and is trained.
    answers[1] = "\n" + answers[1]

    (example,), report = load_dataset(path, qwen, 4096)
    assert example["input_ids"] == ids
    assert trained_segments(example, qwen) == answers
    assert report.n_trainable_tokens == sum(label != -100 for label in example["labels"])

    (last,), _ = load_dataset(path, qwen, 4096, train_on="last_turn")
    assert last["input_ids"] == ids and trained_segments(last, qwen) == answers[-1:]

    sharegpt = [{"from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]), "value": m["content"]}
                for m in CHAT]
    (same,), _ = load_dataset(write(tmp_path, "sharegpt.json", [{"conversations": sharegpt}]), qwen, 4096)
    assert same == example

    with pytest.raises(ConfigError, match="train_on"):
        load_dataset(path, qwen, 4096, train_on="first_turn")


def test_alpaca_history_and_system_are_a_chat(qwen, tmp_path):
    record = {"system": CHAT[0]["content"], "instruction": "Thanks", "input": "", "output": CHAT[6]["content"],
              "history": [[CHAT[1]["content"], CHAT[2]["content"]], [CHAT[3]["content"], CHAT[4]["content"]]]}
    (alpaca,), _ = load_dataset(write(tmp_path, "a.json", [record]), qwen, 4096)
    (chat,), _ = load_dataset(write(tmp_path, "c.json", [{"messages": CHAT}]), qwen, 4096)
    assert alpaca == chat
    (with_system,), _ = load_dataset(write(tmp_path, "s.json", [{"messages": CHAT[1:]}]), qwen, 4096,
                                     system=CHAT[0]["content"])
    assert with_system == chat
    # an empty "system" field is no system message: the template's default one stays
    (empty,), _ = load_dataset(write(tmp_path, "e.json", [dict(OK, system="")]), qwen, 4096)
    (none,), _ = load_dataset(write(tmp_path, "n.json", [OK]), qwen, 4096)
    assert empty == none and "You are Qwen" in qwen.decode(none["input_ids"])


def test_deepseek_r1_template(deepseek, tmp_path):
    tok, hf = deepseek
    chat = [{"role": "user", "content": "1+1?"},
            {"role": "assistant", "content": "<think>\nOne plus one.\n</think>\n\n2"},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "<think>Two and two.</think>4"}]
    (example,), _ = load_dataset(write(tmp_path, "r1.json", [{"messages": chat}]), tok, 4096)
    assert example["input_ids"] == hf.apply_chat_template(chat, tokenize=True, return_dict=False)
    assert example["input_ids"][0] == tok.bos_token_id
    # The January 2025 template drops everything up to </think> from every assistant turn:
    # what is trained is the answer after it, with the end-of-sentence token.
    assert trained_segments(example, tok) == ["\n\n2<｜end▁of▁sentence｜>", "4<｜end▁of▁sentence｜>"]


def test_qwen3_turns_with_reasoning_get_their_own_examples(qwen, hf_qwen, tmp_path):
    source = (TEMPLATES / "Qwen3-0.6B.jinja").read_text(encoding="utf-8")
    qwen3 = dataclasses.replace(qwen, chat_template=source)
    chat = [{"role": "user", "content": "1+1?"},
            {"role": "assistant", "content": "<think>\nsmall sum\n</think>\n\n2"},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "<think>add</think>4"}]
    examples, report = load_dataset(write(tmp_path, "q3.json", [{"messages": chat}]), qwen3, 4096)
    assert (report.n_records, report.n_examples) == (1, 2)
    # Qwen3 strips the first turn's reasoning once a later user message follows, so the first
    # turn is trained where it is the newest message, with its reasoning, as the model writes it.
    full, first = examples
    assert full["input_ids"] == hf_qwen.apply_chat_template(chat, chat_template=source, return_dict=False)
    assert trained_segments(full, qwen) == ["<think>\nadd\n</think>\n\n4<|im_end|>"]
    assert first["input_ids"] == hf_qwen.apply_chat_template(chat[:2], chat_template=source, return_dict=False)
    assert trained_segments(first, qwen) == ["<think>\nsmall sum\n</think>\n\n2<|im_end|>"]


# Qwen3.5: thinking on by default (the generation prompt opens "<think>\n"), XML tool calls, the
# reasoning of turns before the last user query dropped, and a turn without reasoning rendered
# without any <think> block.
QWEN35_TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Today's weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
                   "required": ["city"]}}}]
QWEN35_CHAT = [
    {"role": "system", "content": "You are a weather bot."},
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "assistant", "content": "", "reasoning_content": "Two cities: two calls.", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome", "unit": "C"}}}]},
    {"role": "tool", "content": '{"temp": 20}'},
    {"role": "tool", "content": '{"temp": 25}'},
    {"role": "assistant", "content": "Paris 20 °C, Rome 25 °C.", "reasoning_content": "Rome is warmer."},
    {"role": "user", "content": "Umbrella?"},
    {"role": "assistant", "content": "No, both are dry.", "reasoning_content": "No rain in either."},
    {"role": "user", "content": "Thanks"},
    {"role": "assistant", "content": "<3 glad to help"},  # no reasoning; opens with "<" as <think> does
]


@pytest.fixture(scope="module")
def qwen35(qwen):
    """Qwen3.5's template on Qwen2.5's vocabulary (no Qwen3.5 tokenizer is on this disk)."""
    return dataclasses.replace(qwen, chat_template=(TEMPLATES / "Qwen3.5.jinja").read_text(encoding="utf-8"))


def hf_answer(hf, template, messages, i, **kwargs):
    """Assistant turn i as transformers renders it when it is the newest message: after the
    generation prompt when the turn opens with it, else after the header <|im_start|>assistant\n;
    through <|im_end|>."""
    def render(msgs, gen):
        return hf.apply_chat_template(msgs, chat_template=template, add_generation_prompt=gen, tokenize=False,
                                      **kwargs)

    text, prompt = render(messages[: i + 1], False), render(messages[:i], True)
    head = prompt if text.startswith(prompt) else render(messages[:i], False) + "<|im_start|>assistant\n"
    assert text.startswith(head)
    return text[len(head): text.rindex("<|im_end|>") + len("<|im_end|>")]


def test_qwen35_multi_turn_tool_calls_and_reasoning(qwen35, hf_qwen, tmp_path):
    template, kwargs = qwen35.chat_template, {"tools": QWEN35_TOOLS}
    turns = [i for i, m in enumerate(QWEN35_CHAT) if m["role"] == "assistant"]
    path = write(tmp_path, "q35.json", [{"messages": QWEN35_CHAT}])
    examples, report = load_dataset(path, qwen35, 4096, chat_template_kwargs=kwargs)
    # The whole conversation trains its last turn; the turns before the last user query lose their
    # reasoning there, so they are trained where they are newest: the two tool-calling steps after
    # the first query share one example, the umbrella answer has its own.
    assert report.n_examples == len(examples) == 3
    ends = [len(QWEN35_CHAT) - 1, turns[1], turns[2]]
    trained = [[turns[3]], [turns[0], turns[1]], [turns[2]]]
    for example, end, own in zip(examples, ends, trained):
        assert example["input_ids"] == hf_qwen.apply_chat_template(QWEN35_CHAT[: end + 1], chat_template=template,
                                                                   return_dict=False, **kwargs)
        assert trained_segments(example, qwen35) == [hf_answer(hf_qwen, template, QWEN35_CHAT, i, **kwargs)
                                                     for i in own]
    segments = [s for e in examples for s in trained_segments(e, qwen35)]
    assert segments[0] == "<3 glad to help<|im_end|>"  # the "<" it shares with "<think>" is trained
    assert segments[1].startswith("Two cities: two calls.\n</think>\n\n<tool_call>\n<function=get_weather>")
    assert segments[3].startswith("No rain in either.\n</think>\n\n")  # "<think>\n" is the prompt's
    assert "<tool_response>" not in "".join(segments)


@pytest.mark.parametrize("enable_thinking", [True, False])
def test_qwen35_enable_thinking_reaches_the_template(qwen35, hf_qwen, enable_thinking):
    # The turns carry no reasoning, so the whole conversation renders each one as when it is newest.
    chat = [{k: v for k, v in m.items() if k != "reasoning_content"} for m in QWEN35_CHAT]
    kwargs = {"tools": QWEN35_TOOLS, "enable_thinking": enable_thinking}
    template = qwen35.chat_template
    prompt = qwen35.apply_chat_template(chat[:2], add_generation_prompt=True, **kwargs)
    assert prompt.endswith("<think>\n\n</think>\n\n" if not enable_thinking else "<|im_start|>assistant\n<think>\n")
    (example,) = tokenize_conversation(chat, qwen35, chat_template_kwargs=kwargs)
    assert example["input_ids"] == hf_qwen.apply_chat_template(chat, chat_template=template, return_dict=False,
                                                               **kwargs)
    turns = [i for i, m in enumerate(chat) if m["role"] == "assistant"]
    assert trained_segments(example, qwen35) == [hf_answer(hf_qwen, template, chat, i, **kwargs) for i in turns]


def test_bad_chat_template_kwargs(qwen):
    for bad in (["enable_thinking"], {"add_generation_prompt": True}, {1: True}):
        with pytest.raises(ConfigError, match="chat_template_kwargs"):
            load_dataset(DATA / "identity.json", qwen, 64, chat_template_kwargs=bad)


def test_pretokenized_records_pass_through(qwen, tmp_path):
    records = [{"input_ids": [1, 2, 3, 4], "labels": [-100, -100, 3, 4]},
               {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "attention_mask": [1, 1, 1]},
               {"input_ids": [8, 9]}]
    path = write(tmp_path, "tok.jsonl", "\n".join(json.dumps(r) for r in records) + "\n\n")
    examples, report = load_dataset(path, qwen, 16)
    assert examples == [{"input_ids": r["input_ids"], "labels": r.get("labels", r["input_ids"])} for r in records]
    assert report.n_trainable_tokens == 2 + 2 + 1


def test_replacements_fill_identity_placeholders(qwen):
    examples, _ = load_dataset(DATA / "identity.json", qwen, 4096, replacements=IDENTITY)
    text = "".join(qwen.decode(e["input_ids"]) for e in examples)
    assert "{{" not in text and IDENTITY["name"] in text and IDENTITY["author"] in text


# ---- bad input: a DataError naming the file and the record, at load time ---------------------------

OK = {"instruction": "a", "input": "", "output": "b"}
BAD_INPUTS = {
    "invalid_json": ("bad.json", '[{"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}]',
                     r"bad\.json: invalid JSON at line 2, column 22"),
    "invalid_jsonl": ("bad.jsonl", json.dumps(OK) + "\n" + json.dumps(OK) + "\n{oops\n",
                      r"bad\.jsonl: line 3: invalid JSON at column 2"),
    "missing_field": ("bad.json", [OK, {"instruction": "a", "input": ""}],
                      r"bad\.json: record 1: missing required field 'output'"),
    "wrong_type": ("bad.json", [{"instruction": "a", "input": "", "output": 3}],
                   r"bad\.json: record 0: field 'output' must be a string, found int"),
    "bad_history": ("bad.json", [dict(OK, history=[["only one"]])], r"bad\.json: record 0: 'history'\[0\]"),
    "unknown_role": ("bad.json", [{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}],
                     r"bad\.json: record 0: 'messages'\[1\]: unknown role 'bot'"),
    "unknown_sharegpt_role": ("bad.json", [{"conversations": [{"from": "robot", "value": "a"}]}],
                              r"bad\.json: record 0: 'conversations'\[0\]: unknown role 'robot'"),
    "content_not_string": ("bad.json", [{"messages": [{"role": "user", "content": ["a"]}]}],
                           r"record 0: 'messages'\[0\]: 'content' must be a string"),
    "assistant_first": ("bad.json", [{"messages": [{"role": "assistant", "content": "a"}]}],
                        r"record 0: the conversation opens with a 'assistant' message"),
    "unknown_format": ("bad.json", [OK, {"prompt": "x"}], r"bad\.json: record 1: unknown record format"),
    "not_an_object": ("bad.json", [OK, [1, 2]], r"bad\.json: record 1: expected a JSON object"),
    "bad_token_id": ("bad.json", [{"input_ids": [1, 10**9]}], r"record 0: 'input_ids'\[1\] = 1000000000"),
    "misaligned_labels": ("bad.json", [{"input_ids": [1, 2], "labels": [2]}], r"record 0: 'labels' has 1 entries"),
    "padded": ("bad.json", [{"input_ids": [1, 2], "attention_mask": [1, 0]}],
               r"record 0: 'attention_mask' holds zeros"),
    "empty_file": ("bad.json", "  \n", r"bad\.json: the file is empty"),
    "no_records": ("bad.json", "[]", r"bad\.json: holds no records"),
    "not_an_array": ("bad.json", {"instruction": "a"}, r"bad\.json: expected a JSON array"),
    "all_skipped": ("bad.json", [{"messages": [{"role": "user", "content": "a"}]}] * 2,
                    r"bad\.json: every example was skipped"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_raises_data_error(qwen, tmp_path, case):
    name, content, message = BAD_INPUTS[case]
    with pytest.raises(DataError, match=message):
        load_dataset(write(tmp_path, name, content), qwen, 64)


def test_missing_file_and_bad_settings(qwen, tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_dataset(tmp_path / "nope.json", qwen, 64)
    with pytest.raises(ConfigError, match="max_len"):
        load_dataset(DATA / "identity.json", qwen, 1)
