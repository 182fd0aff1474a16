"""lowrank.data.fast_tokenize: the batched labels equal the reference, tokenize_conversation (one
record at a time, three encodes per answer), on the shipped data and on answers whose first or
last characters merge with the text around them."""

import dataclasses
import json
import random

import numpy as np
import pytest
from tests.conftest import DATA, FIXTURES

from lowrank.data.dataset import conversation_spans, record_to_messages, tokenize_conversation
from lowrank.data.fast_tokenize import BatchLabeler, supports
from lowrank.data.tokenizer import load_tokenizer

QWEN = FIXTURES / "tokenizers" / "qwen2.5-instruct"


@pytest.fixture(scope="module")
def qwen():
    return load_tokenizer(QWEN)


def batched(conversations, tok, anchored=True, train_on="all_turns", kwargs=None):
    labeler = BatchLabeler(tok)
    labeler.anchored = anchored
    texts = [item for messages in conversations for item in conversation_spans(messages, tok, train_on, kwargs)]
    return [{"input_ids": ids.tolist(), "labels": np.where(trained, ids, -100).tolist()}
            for ids, trained in labeler.label(texts)]


def reference(conversations, tok, train_on="all_turns", kwargs=None):
    return [e for messages in conversations for e in tokenize_conversation(messages, tok, train_on, kwargs)]


@pytest.mark.parametrize("name", ["identity.json", "alpaca_en_demo.json", "alpaca_zh_demo.json", "huanhuan-100.json"])
def test_shipped_data(qwen, name):
    records = json.loads((DATA / name).read_text(encoding="utf-8"))
    conversations = [record_to_messages(r) for r in random.Random(1).sample(records, 40)]
    assert batched(conversations, qwen) == reference(conversations, qwen)


def chat(*turns):
    roles = ["user", "assistant"] * len(turns)
    return [{"role": r, "content": c} for r, c in zip(roles, turns)]


# Answers that open or close with what BPE merges across the boundary: newlines, spaces,
# punctuation, multi-byte characters, an added token inside the answer.
EDGES = [chat("hi", "\n\nhello"), chat("hi", "  spaced  "), chat("x\n", "\n"), chat("a", "😊😊"),
         chat("问", "答：是的。"), chat("1", " <|im_end|> inside", "2", "\t tab"),
         chat("q", "ends with newline\n", "q2", "   ")]


def test_boundary_cases_and_the_unanchored_path(qwen):
    assert supports(qwen)
    assert batched(EDGES, qwen) == reference(EDGES, qwen)
    assert batched(EDGES, qwen, anchored=False) == reference(EDGES, qwen)
    assert batched(EDGES, qwen, train_on="last_turn") == reference(EDGES, qwen, train_on="last_turn")


@pytest.mark.parametrize("template", ["deepseek", "Qwen3-0.6B.jinja"])
def test_other_templates(qwen, template):
    # DeepSeek's "Assistant:" prompt has no added token before the answer: the tail is the user turn.
    source = template if template == "deepseek" else (FIXTURES / "chat_templates" / template).read_text()
    tok = dataclasses.replace(qwen, chat_template=source) if template != "deepseek" else load_tokenizer(
        QWEN, chat_template="deepseek")
    conversations = EDGES + [chat("1+1?", "<think>\nsum\n</think>\n\n2", "2+2?", "<think>add</think>4")]
    assert batched(conversations, tok) == reference(conversations, tok)


@pytest.mark.parametrize("enable_thinking", [None, True, False])
def test_qwen35_template(qwen, enable_thinking):
    # Qwen3.5's generation prompt ends with "<think>\n" that turns without reasoning lack: the
    # prompt's own tokens bound the answer's start ("<3" keeps its "<"), in the batch path too.
    from tests.test_dataset import QWEN35_CHAT, QWEN35_TOOLS

    tok = dataclasses.replace(qwen, chat_template=(FIXTURES / "chat_templates" / "Qwen3.5.jinja").read_text())
    kwargs = {"tools": QWEN35_TOOLS} if enable_thinking is None else {"tools": QWEN35_TOOLS,
                                                                      "enable_thinking": enable_thinking}
    plain = [{k: v for k, v in m.items() if k != "reasoning_content"} for m in QWEN35_CHAT]
    conversations = [QWEN35_CHAT, plain, chat("hi", "<3 thanks"), chat("hi", "<tool_call>x"), *EDGES]
    for anchored in (True, False):
        for train_on in ("all_turns", "last_turn"):
            assert (batched(conversations, tok, anchored, train_on, kwargs)
                    == reference(conversations, tok, train_on, kwargs))
