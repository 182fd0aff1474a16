"""lowrank/data/text_stream.py: streamed pieces join to the decoded text, characters split across
byte tokens are never written half, and a stop string ends the text without being written."""

import pytest

from lowrank.data.text_stream import TextStream
from lowrank.data.tokenizer import load_tokenizer
from tests.conftest import FIXTURES

TEXT = "I am 小助手 🤖, nice to meet you.\nHuman: and again? Assistant: ok"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(FIXTURES / "tokenizers" / "qwen2.5-instruct")


def _run(tok, ids, stop):
    pieces = []
    stream = TextStream(tok, stop, write=pieces.append)
    stopped_at = next((i for i, t in enumerate(ids) if stream.push(t)), None)
    return stream, pieces, stopped_at


def test_pieces_join_to_the_decoded_text_without_broken_characters(tok):
    ids = tok.encode(TEXT) + [tok.eos_token_id]
    assert any("\ufffd" in tok.decode(ids[:i]) for i in range(len(ids)))  # the emoji spans tokens
    stream, pieces, stopped = _run(tok, ids, [])
    assert stopped is None and stream.close() == TEXT
    assert "".join(pieces) == TEXT and not any("\ufffd" in p for p in pieces)


@pytest.mark.parametrize("stop", [["Human:"], ["Assistant:", "Human:"], ["\nHu"]])
def test_stop_string_ends_the_text_and_is_never_written(tok, stop):
    ids = tok.encode(TEXT)
    stream, pieces, stopped = _run(tok, ids, stop)
    cut = min(TEXT.find(s) for s in stop)
    assert stopped is not None and stream.text == TEXT[:cut] and "".join(pieces) == TEXT[:cut]
    assert stream.close() == TEXT[:cut] and stream.push(ids[0])  # stays stopped
    first = next(i for i in range(len(ids)) if any(s in tok.decode(ids[:i + 1]) for s in stop))
    assert stopped == first  # stopped at the token that completed the stop string
