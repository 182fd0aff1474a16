"""lowrank.data.tokenizer against llama.cpp's reference tokenizations and transformers' tokenizers."""

import io
import json
import random
import shutil
import unicodedata

import pytest
from tests.conftest import DATA, FIXTURES

from lowrank.errors import CheckpointError
from lowrank.data.tokenizer import load_tokenizer

TOKENIZERS = FIXTURES / "tokenizers"
QWEN_SLOW = TOKENIZERS / "qwen2.5-instruct"
QWEN_JSON = TOKENIZERS / "qwen2.5-instruct-tokenizer-json"
CASES = FIXTURES / "tokenizer_tests"


@pytest.fixture(scope="module")
def qwen():
    return {"slow": load_tokenizer(QWEN_SLOW), "json": load_tokenizer(QWEN_JSON)}


@pytest.fixture(scope="module")
def hf_qwen():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(QWEN_SLOW)


def sample_texts(n_per_file=25, seed=0):
    """Texts from every sample data set, plus the same records rendered as ChatML with special tokens."""
    rng = random.Random(seed)
    texts = []
    for name in ("identity.json", "alpaca_en_demo.json", "alpaca_zh_demo.json", "huanhuan-100.json"):
        records = json.loads((DATA / name).read_text(encoding="utf-8"))
        for r in rng.sample(records, n_per_file):
            texts += [r["instruction"], r["output"],
                      f"<|im_start|>user\n{r['instruction']}\n{r['input']}<|im_end|>\n<|im_start|>assistant\n"
                      f"{r['output']}<|im_end|>\n"]
    return texts


def test_slow_files_build_the_pipeline_of_tokenizer_json(qwen):
    slow = json.loads(qwen["slow"].backend.tok.to_str())
    fast = json.loads(qwen["json"].backend.tok.to_str())
    for key in ("normalizer", "pre_tokenizer", "decoder", "post_processor", "added_tokens"):
        assert slow[key] == fast[key], key
    assert slow["model"] == fast["model"]


@pytest.mark.parametrize("form", ["slow", "json"])
def test_llama_cpp_reference_cases(qwen, form):
    cases = json.loads((CASES / "ggml-vocab-qwen2.cases.json").read_text(encoding="utf-8"))
    assert len(cases) == 46
    tok = qwen[form]
    for case in cases:
        assert tok.encode(case["text"], add_special_tokens=False) == case["ids"], repr(case["text"])
        # byte-level BPE loses nothing but the NFC normalisation
        assert tok.decode(case["ids"]) == unicodedata.normalize("NFC", case["text"])


@pytest.mark.parametrize("form", ["slow", "json"])
def test_sample_data_matches_transformers(qwen, hf_qwen, form):
    tok = qwen[form]
    for text in sample_texts():
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == hf_qwen(text, add_special_tokens=False)["input_ids"], text[:60]
        assert tok.encode(text) == hf_qwen(text)["input_ids"]
        assert tok.decode(ids) == text
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == hf_qwen.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("form", ["slow", "json"])
def test_special_and_added_tokens(qwen, hf_qwen, form):
    tok = qwen[form]
    assert len(tok) == len(hf_qwen)
    assert tok.vocab_size == hf_qwen.vocab_size
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
        hf_qwen.bos_token_id, hf_qwen.eos_token_id, hf_qwen.pad_token_id)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    # every added token is one id wherever it stands, even glued to text
    for content, token_id in hf_qwen.get_added_vocab().items():
        ids = tok.encode(f"a{content}b", add_special_tokens=False)
        assert ids == hf_qwen(f"a{content}b", add_special_tokens=False)["input_ids"]
        assert token_id in ids
    assert tok.special_tokens == set(hf_qwen.all_special_tokens) | {"<|endoftext|>"}


def test_deepseek_r1_distill_qwen_config_on_qwen_vocabulary(tmp_path):
    # The folder carries only DeepSeek's tokenizer_config; its vocabulary is Qwen's. Its config
    # names LlamaTokenizerFast, which in transformers 5 ignores vocab.json, so the oracle is
    # Qwen2Tokenizer on the same folder.
    from transformers import Qwen2Tokenizer

    for name in ("vocab.json", "merges.txt"):
        shutil.copy(QWEN_SLOW / name, tmp_path / name)
    shutil.copy(TOKENIZERS / "deepseek-r1-distill-qwen" / "tokenizer_config.json", tmp_path)
    tok, hf = load_tokenizer(tmp_path), Qwen2Tokenizer.from_pretrained(tmp_path)
    assert tok.bos_token == "<｜begin▁of▁sentence｜>" and tok.eos_token == "<｜end▁of▁sentence｜>"
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (hf.bos_token_id, hf.eos_token_id,
                                                                      hf.pad_token_id)
    assert len(tok) == len(hf)
    for token in (tok.bos_token, tok.eos_token):
        assert tok.encode(token, add_special_tokens=False) == [tok.token_to_id(token)]
    text = "<｜begin▁of▁sentence｜>You are helpful.<｜User｜>1+1=?<｜Assistant｜>2<｜end▁of▁sentence｜>"
    for add in (False, True):
        assert tok.encode(text, add_special_tokens=add) == hf(text, add_special_tokens=add)["input_ids"]
    # add_bos_token is true in DeepSeek's config: encode() starts with the bos, as transformers'
    assert tok.encode("hi")[0] == tok.bos_token_id
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == hf.decode(hf(text)["input_ids"],
                                                                               skip_special_tokens=True)


def test_deepseek_llm_and_coder_cases():
    pytest.skip("deepseek-llm / deepseek-coder come as llama.cpp vocab-only GGUF files without a tokenizer.json; "
                "lowrank does not parse GGUF (their pre-tokenizer regexes would have to be transcribed too)")


def test_pad_token_falls_back_to_endoftext_then_eos(tmp_path):
    qwen_base = tmp_path / "qwen-base"
    qwen_base.mkdir()
    for name in ("vocab.json", "merges.txt", "added_tokens.json"):
        shutil.copy(QWEN_SLOW / name, qwen_base / name)
    (qwen_base / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    tok = load_tokenizer(qwen_base)
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == 151643

    no_endoftext = tmp_path / "no-endoftext"
    no_endoftext.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(QWEN_SLOW / name, no_endoftext / name)
    (no_endoftext / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|my_eos|>"}))
    tok = load_tokenizer(no_endoftext)
    assert tok.pad_token == "<|my_eos|>" and tok.pad_token_id == tok.eos_token_id == len(tok) - 1


@pytest.fixture(scope="module")
def sentencepiece_folder(tmp_path_factory):
    import sentencepiece as spm

    records = json.loads((DATA / "alpaca_en_demo.json").read_text(encoding="utf-8"))[:300]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(r["output"] for r in records), model_writer=model,
                                   vocab_size=300, model_type="bpe", minloglevel=2)
    folder = tmp_path_factory.mktemp("sp")
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"added_tokens_decoder": {"300": {"content": "<|user|>", "special": True}}}))
    return folder


def test_sentencepiece_model(sentencepiece_folder):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sentencepiece_folder / "tokenizer.model"))
    tok = load_tokenizer(sentencepiece_folder)
    assert len(tok) == 301 and tok.vocab_size == 300
    assert (tok.bos_token, tok.eos_token) == ("<s>", "</s>")
    text = "Making crepes is an easy process."
    assert tok.encode(text, add_special_tokens=False) == sp.encode(text)
    assert tok.encode(text) == [sp.bos_id()] + sp.encode(text)  # add_bos_token defaults to true
    ids = tok.encode(f"<|user|>{text}<|user|>", add_special_tokens=False)
    assert ids == [300] + sp.encode(text) + [300]
    assert tok.decode(ids) == f"<|user|>{text}<|user|>"
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_bad_tokenizer_folders(tmp_path):
    with pytest.raises(CheckpointError, match="missing: no such tokenizer folder$"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="lowrank reads local folders and never downloads"):
        load_tokenizer("Qwen/Qwen2.5-0.5B-Instruct")
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        load_tokenizer(tmp_path)
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(CheckpointError, match="merges.txt"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": 3}')
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="tokenizer_config.json"):
        load_tokenizer(tmp_path)

    gap = tmp_path / "gap"
    gap.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(QWEN_SLOW / name, gap / name)
    (gap / "added_tokens.json").write_text(json.dumps({"<|x|>": 151700}))
    with pytest.raises(CheckpointError, match=r"gap: added token '<\|x\|>': the folder gives id 151700"):
        load_tokenizer(gap)


# ---- Qwen3.5: Qwen2's split regex with combining marks counted as letters ----------------------

# Words whose combining marks (\p{M}) NFC leaves in place: Devanagari vowel signs and virama, Thai
# vowel and tone marks, Arabic harakat, Hebrew points, Latin letters with marks that have no
# precomposed form, marks after punctuation and an enclosing mark.
MARKED_TEXTS = ["नमस्ते दुनिया, हिन्दी विकिपीडिया", "ภาษาไทย ที่นี่ น้ำ", "مَرْحَبًا بِكُمْ", "שָׁלוֹם עוֹלָם",
                "x\u0301 q\u0323\u0302 n\u0303o", "(\u0301) a\u20dd!"]


def _split(pattern, text):
    from tokenizers import Regex, pre_tokenizers

    return [piece for piece, _ in pre_tokenizers.Split(Regex(pattern), "isolated").pre_tokenize_str(text)]


@pytest.fixture(scope="module")
def qwen35(tmp_path_factory):
    """Qwen2.5's vocabulary laid out as Qwen3.5 folders (no Qwen3.5 tokenizer is on this disk), each
    with the hub's tokenizer_config.json (it names Qwen2Tokenizer) and a config.json of model_type
    qwen3_5: "json", a tokenizer.json whose Split carries Qwen3.5's regex (transformers' own);
    "slow", vocab.json + merges.txt. Returns (folders, {form: lowrank tokenizer}, the regex)."""
    from transformers.models.qwen3_5.tokenization_qwen3_5 import PRETOKENIZE_REGEX

    root = tmp_path_factory.mktemp("qwen35")
    folders = {name: root / name for name in ("json", "slow")}
    for folder in folders.values():
        folder.mkdir()
    spec = json.loads((QWEN_JSON / "tokenizer.json").read_text(encoding="utf-8"))
    split = spec["pre_tokenizer"]["pretokenizers"][0]
    assert split["type"] == "Split" and split["pattern"]["Regex"] != PRETOKENIZE_REGEX
    split["pattern"]["Regex"] = PRETOKENIZE_REGEX
    (folders["json"] / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    shutil.copy(QWEN_JSON / "tokenizer_config.json", folders["json"])
    for file in QWEN_SLOW.iterdir():
        shutil.copy(file, folders["slow"])
    for folder in folders.values():
        assert json.loads((folder / "tokenizer_config.json").read_text())["tokenizer_class"] == "Qwen2Tokenizer"
        (folder / "config.json").write_text(json.dumps({"model_type": "qwen3_5"}))
    return folders, {form: load_tokenizer(folder) for form, folder in folders.items()}, PRETOKENIZE_REGEX


def test_qwen35_regex_splits_marked_words_whole(qwen35):
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2_REGEX

    regex = qwen35[2]
    for text in MARKED_TEXTS:  # the texts tell the two regexes apart, so the tests below can fail
        text = unicodedata.normalize("NFC", text)
        assert _split(regex, text) != _split(QWEN2_REGEX, text), text
    assert _split(regex, "नमस्ते दुनिया") == ["नमस्ते", " दुनिया"]


@pytest.mark.parametrize("form", ["json", "slow"])
def test_qwen35_folders_match_tokenizers_and_transformers(qwen, qwen35, form):
    from tokenizers import Tokenizer as HFTokenizer

    folders, toks, _ = qwen35
    tok = toks[form]
    reference = HFTokenizer.from_file(str(folders["json"] / "tokenizer.json"))
    oracles = [lambda text: reference.encode(text, add_special_tokens=False).ids]
    if form == "json":
        # transformers takes Qwen3_5Tokenizer by the model_type. (Its Qwen3_5Tokenizer reads no
        # vocab.json / merges.txt: on the slow folder it loads an empty vocabulary, so there the
        # oracle is the tokenizer.json above, which it agrees with here.)
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(folders[form])
        assert type(hf).__name__ == "Qwen3_5Tokenizer" and len(tok) == len(hf)
        oracles.append(lambda text: hf(text, add_special_tokens=False)["input_ids"])
    for text in MARKED_TEXTS + sample_texts(n_per_file=5):
        ids = tok.encode(text, add_special_tokens=False)
        for oracle in oracles:
            assert ids == oracle(text), text[:60]
        assert tok.decode(ids) == unicodedata.normalize("NFC", text)
    # Qwen2.5's merges give the same byte pieces either way for the Devanagari and Latin texts;
    # Thai, Arabic and Hebrew merge across their marks.
    assert sum(tok.encode(text) != qwen[form].encode(text) for text in MARKED_TEXTS) >= 3


def test_qwen35_slow_files_build_the_pipeline_of_its_tokenizer_json(qwen35):
    _, toks, _ = qwen35
    slow, fast = (toks[form].backend.tok for form in ("slow", "json"))
    for part in ("normalizer", "pre_tokenizer", "decoder"):  # the model is Qwen2.5's, tested above
        assert json.loads(getattr(slow, part).__getstate__()) == json.loads(getattr(fast, part).__getstate__()), part


def test_qwen35_folders_are_told_by_model_type_or_tokenizer_class(tmp_path):
    from lowrank.data.tokenizer import _is_qwen35

    hub = {"tokenizer_class": "Qwen2Tokenizer"}
    for model_type in ("qwen3_5", "qwen3_5_moe", "qwen3_5_text", "qwen3_5_moe_text"):
        (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
        assert _is_qwen35(tmp_path, hub)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    assert not _is_qwen35(tmp_path, hub)
    assert _is_qwen35(tmp_path, {"tokenizer_class": "Qwen3_5Tokenizer"})  # as transformers 5 saves it
    (tmp_path / "config.json").unlink()
    assert not _is_qwen35(tmp_path, hub) and not _is_qwen35(tmp_path, {})
