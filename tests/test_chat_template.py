"""Chat templates render exactly as transformers' apply_chat_template renders them."""

import json
import shutil

import pytest
from tests.conftest import FIXTURES

from lowrank.data.chat_template import CHATML_TEMPLATE, DEEPSEEK_TEMPLATE, render_chat
from lowrank.errors import ConfigError, DataError
from lowrank.data.tokenizer import load_tokenizer

TOKENIZERS = FIXTURES / "tokenizers"
TEMPLATES = FIXTURES / "chat_templates"

CONVERSATIONS = {
    # transformers drops None-valued keys before rendering
    "single": [{"role": "user", "content": "Hello"},
               {"role": "assistant", "content": "Hi there", "tool_calls": None, "reasoning_content": None}],
    "system_multi_turn": [
        {"role": "system", "content": "你是甄嬛。"},
        {"role": "user", "content": "Who are you?"},
        {"role": "assistant", "content": "   I am an assistant   "},
        {"role": "user", "content": "你好 👋 <b>&</b>"},
        {"role": "assistant", "content": "Line one.\n\nLine two."},
    ],
    "reasoning": [
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "<think>\nsmall sum\n</think>\n\n2"},
        {"role": "user", "content": "and 2+2?"},
        {"role": "assistant", "content": "<think>add</think>4"},
    ],
    "ends_with_user": [
        {"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"},
        {"role": "user", "content": "Another question"},
    ],
}


@pytest.fixture(scope="module")
def deepseek_folder(tmp_path_factory):
    """DeepSeek-R1-Distill-Qwen's config on Qwen's vocabulary files (the fixture has only the config)."""
    folder = tmp_path_factory.mktemp("deepseek-r1-distill-qwen")
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(TOKENIZERS / "qwen2.5-instruct" / name, folder / name)
    shutil.copy(TOKENIZERS / "deepseek-r1-distill-qwen" / "tokenizer_config.json", folder)
    return folder


@pytest.fixture(scope="module")
def pairs(deepseek_folder):
    """(lowrank, transformers) tokenizers of every fixture folder."""
    from transformers import AutoTokenizer, Qwen2Tokenizer

    out = {}
    for name in ("qwen2.5-instruct", "qwen2.5-instruct-tokenizer-json"):
        out[name] = (load_tokenizer(TOKENIZERS / name), AutoTokenizer.from_pretrained(TOKENIZERS / name))
    # Its config names LlamaTokenizerFast, which in transformers 5 ignores vocab.json.
    out["deepseek-r1-distill-qwen"] = (load_tokenizer(deepseek_folder), Qwen2Tokenizer.from_pretrained(deepseek_folder))
    return out


@pytest.mark.parametrize("folder", ["qwen2.5-instruct", "qwen2.5-instruct-tokenizer-json", "deepseek-r1-distill-qwen"])
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_folder_template_matches_transformers(pairs, folder, conversation, add_generation_prompt):
    tok, hf = pairs[folder]
    messages = CONVERSATIONS[conversation]
    expected = hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    assert tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected
    ids = hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                 return_dict=False)
    assert tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True) == ids


@pytest.mark.parametrize("template", ["Qwen2.5-Instruct", "Qwen3-0.6B", "Qwen3.5", "DeepSeek-R1-Distill-Qwen",
                                      "DeepSeek-V3"])
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
def test_template_files_match_transformers(pairs, template, conversation):
    source = (TEMPLATES / f"{template}.jinja").read_text(encoding="utf-8")
    tok, hf = pairs["deepseek-r1-distill-qwen"]  # a bos token, so {{ bos_token }} shows
    messages = CONVERSATIONS[conversation]
    for kwargs in ({"add_generation_prompt": False}, {"add_generation_prompt": True},
                   {"add_generation_prompt": True, "enable_thinking": False}):
        expected = hf.apply_chat_template(messages, chat_template=source, tokenize=False, **kwargs)
        gen = kwargs.pop("add_generation_prompt")
        assert render_chat(source, messages, gen, **tok.template_tokens, **kwargs) == expected


QWEN35_TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                                   "parameters": {"type": "object",
                                                                  "properties": {"city": {"type": "string"}}}}}]
QWEN35_AGENT = [
    {"role": "system", "content": "You are a weather bot."},
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "assistant", "content": "Checking.", "reasoning_content": "Two calls.", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}},
        {"function": {"name": "get_weather", "arguments": {"city": "Rome", "opts": {"unit": "C"}, "hours": [1, 2]}}}]},
    {"role": "tool", "content": '{"temp": 20}'},
    {"role": "tool", "content": '{"temp": 25}'},
    {"role": "assistant", "content": "<think>\nRome is warmer.\n</think>\n\nParis 20, Rome 25."},
    {"role": "user", "content": "<tool_response>\nnot a query\n</tool_response>"},
    {"role": "assistant", "content": "Noted.", "thinking": "A tool response from the user."},
]


def test_qwen35_template_tools_and_thinking_match_transformers(pairs):
    # Qwen3.5: tools in the system prompt, XML tool calls, tool responses folded into user turns,
    # reasoning from reasoning_content / thinking / <think> in the content, kept after the last
    # real user query only; enable_thinking switches the generation prompt.
    source = (TEMPLATES / "Qwen3.5.jinja").read_text(encoding="utf-8")
    tok, hf = pairs["qwen2.5-instruct"]
    for end in range(2, len(QWEN35_AGENT) + 1):
        for kwargs in ({}, {"tools": QWEN35_TOOLS}, {"enable_thinking": False}, {"enable_thinking": True},
                       {"tools": QWEN35_TOOLS, "enable_thinking": False}):
            for gen in (False, True):
                messages = QWEN35_AGENT[:end]
                expected = hf.apply_chat_template(messages, chat_template=source, tokenize=False,
                                                  add_generation_prompt=gen, **kwargs)
                assert render_chat(source, messages, gen, **tok.template_tokens, **kwargs) == expected, (end, kwargs)
    with pytest.raises(DataError, match="No user query found"):
        render_chat(source, [{"role": "system", "content": "x"}])


def test_folder_templates_are_the_published_ones(pairs):
    qwen25 = (TEMPLATES / "Qwen2.5-Instruct.jinja").read_text(encoding="utf-8")
    assert pairs["qwen2.5-instruct"][0].chat_template == qwen25
    assert pairs["qwen2.5-instruct-tokenizer-json"][0].chat_template == qwen25
    r1 = (TEMPLATES / "DeepSeek-R1-Distill-Qwen.jinja").read_text(encoding="utf-8")
    assert pairs["deepseek-r1-distill-qwen"][0].chat_template == r1


def test_llama_cpp_deepseek_cases():
    cases = json.loads((TEMPLATES / "deepseek-llm-chat.cases.json").read_text(encoding="utf-8"))
    for case in cases["cases"]:
        tokens = {"bos_token": case.get("bos_token", ""), "eos_token": case.get("eos_token", "")}
        rendered = render_chat(case["template_str"], cases["conversation"], cases["add_generation_prompt"], **tokens)
        assert rendered == case["expected_output"], case["name"]
    # The built-in DeepSeek format is DeepSeek-LLM / V2's template.
    v2 = next(c for c in cases["cases"] if c["name"] == "DeepSeek-V2")
    assert render_chat(DEEPSEEK_TEMPLATE, cases["conversation"], True, bos_token="",
                       eos_token=v2["eos_token"]) == v2["expected_output"]


@pytest.mark.parametrize("template", [CHATML_TEMPLATE, DEEPSEEK_TEMPLATE])
def test_builtin_templates_match_transformers_rendering(template):
    from transformers.utils.chat_template_utils import render_jinja_template

    tokens = {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>"}
    for messages in CONVERSATIONS.values():
        for gen in (False, True):
            (expected,), _ = render_jinja_template([messages], chat_template=template, add_generation_prompt=gen,
                                                   **tokens)
            assert render_chat(template, messages, gen, **tokens) == expected


def test_helpers_match_transformers():
    from transformers.utils.chat_template_utils import render_jinja_template

    template = ("{{ messages | tojson }}|{{ messages[0] | tojson(indent=2) }}|{{ strftime_now('%Y') }}|"
                "{% set ns = namespace(n=0) %}{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
                "{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}|"
                "{% generation %}{{ messages[0].content }}{% endgeneration %}")
    messages = [{"role": "user", "content": "<b>é 你好</b>"}, {"role": "assistant", "content": "x"}]
    (expected,), _ = render_jinja_template([messages], chat_template=template)
    assert render_chat(template, messages) == expected


def test_template_errors_are_data_errors():
    template = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be user') }}{% endif %}"
    with pytest.raises(DataError, match="first message must be user"):
        render_chat(template, [{"role": "assistant", "content": "x"}])
    with pytest.raises(DataError, match="_secret"):  # the sandbox refuses underscore namespace attributes
        render_chat("{% set ns = namespace(_secret=1) %}", [])
    with pytest.raises(DataError):
        render_chat("{{ ''.__class__.__mro__ }}", [])


def test_builtin_template_for_folders_without_one(tmp_path):
    chatml = tmp_path / "chatml"
    chatml.mkdir()
    for name in ("vocab.json", "merges.txt", "added_tokens.json", "special_tokens_map.json"):
        shutil.copy(TOKENIZERS / "qwen2.5-instruct" / name, chatml / name)
    tok = load_tokenizer(chatml)
    assert tok.chat_template == CHATML_TEMPLATE
    assert tok.apply_chat_template(CONVERSATIONS["single"], add_generation_prompt=False) == (
        "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\nHi there<|im_end|>\n")

    plain = tmp_path / "plain"
    plain.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(TOKENIZERS / "qwen2.5-instruct" / name, plain / name)
    with pytest.raises(ConfigError, match="no chat template"):
        load_tokenizer(plain).apply_chat_template(CONVERSATIONS["single"])
    (plain / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<｜end▁of▁sentence｜>"}))
    assert load_tokenizer(plain).chat_template == DEEPSEEK_TEMPLATE
    assert load_tokenizer(plain, chat_template="chatml").chat_template == CHATML_TEMPLATE


def test_a_template_file_path_is_read_and_a_missing_one_is_refused(tmp_path, monkeypatch):
    from lowrank.data.chat_template import resolve_template

    source = (TEMPLATES / "DeepSeek-R1-Distill-Qwen.jinja").read_text(encoding="utf-8")
    tok = load_tokenizer(TOKENIZERS / "qwen2.5-instruct", chat_template=str(TEMPLATES / "DeepSeek-R1-Distill-Qwen.jinja"))
    assert tok.chat_template == source
    monkeypatch.chdir(TEMPLATES)  # a bare file name in the working folder
    assert resolve_template("Qwen3-0.6B.jinja") == (TEMPLATES / "Qwen3-0.6B.jinja").read_text(encoding="utf-8")
    assert resolve_template("chatml") == CHATML_TEMPLATE and resolve_template(source) == source
    for missing, why in ((tmp_path / "nope.jinja", "no such file"), ("templates/qwen", "no such file"),
                         ("chatmll", "not a built-in name, a file or Jinja source")):
        with pytest.raises(ConfigError, match=f"chat template '{missing}': {why}"):
            load_tokenizer(TOKENIZERS / "qwen2.5-instruct", chat_template=str(missing))
