"""lowrank/data/encoding.py: `tok(texts, ...)`, `batch_decode` and `apply_chat_template(return_dict=...)`
against transformers' tokenizer on the same Qwen2.5 files."""

import pytest
import torch

from lowrank.data.tokenizer import load_tokenizer
from lowrank.errors import ConfigError
from tests.conftest import FIXTURES

QWEN = FIXTURES / "tokenizers" / "qwen2.5-instruct-tokenizer-json"
TEXTS = ["Hello there, how are you?", "你是谁?", "a", "Tabs\tand <|im_end|> special tokens\n\n end"]


@pytest.fixture(scope="module")
def toks():
    from transformers import AutoTokenizer

    return load_tokenizer(QWEN), AutoTokenizer.from_pretrained(QWEN)


def _plain(enc):
    return {k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in enc.items()}


@pytest.mark.parametrize("kw", [
    {}, {"padding": True}, {"padding": "longest", "padding_side": "left"}, {"padding": True, "return_tensors": "pt"},
    {"padding": "max_length", "max_length": 9}, {"truncation": True, "max_length": 3},
    {"padding": True, "truncation": True, "max_length": 4, "return_tensors": "pt", "padding_side": "left"},
])
def test_call_on_a_batch_equals_transformers(toks, kw):
    ours, ref = toks
    a, b = ours(TEXTS, **kw), ref(TEXTS, **kw)
    assert set(a) == {"input_ids", "attention_mask"}
    assert _plain(a) == _plain(b)
    if kw.get("return_tensors"):
        assert a.input_ids.dtype == b["input_ids"].dtype and a.to("cpu").attention_mask.shape == b["attention_mask"].shape


def test_single_text_batch_decode_and_chat_template_dict(toks):
    ours, ref = toks
    assert _plain(ours(TEXTS[1])) == _plain(ref(TEXTS[1]))
    assert _plain(ours(TEXTS[0], return_tensors="pt")) == _plain(ref(TEXTS[0], return_tensors="pt"))
    ids = ref(TEXTS, padding=True, return_tensors="pt")["input_ids"]
    for skip in (False, True):
        assert ours.batch_decode(ids, skip_special_tokens=skip) == ref.batch_decode(ids, skip_special_tokens=skip)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}, {"role": "user", "content": "?"}]
    kw = dict(add_generation_prompt=True, tokenize=True, return_dict=True)
    assert _plain(ours.apply_chat_template(messages, **kw)) == _plain(ref.apply_chat_template(messages, **kw))
    pt = ours.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    assert pt.tolist() == ref.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                  return_dict=False).tolist()


def test_tensors_of_unequal_rows_need_padding(toks):
    with pytest.raises(ConfigError, match="pass padding=True"):
        toks[0](TEXTS, return_tensors="pt")
    with pytest.raises(ConfigError, match="need max_length"):
        toks[0](TEXTS, truncation=True)
