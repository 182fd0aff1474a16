"""`python -m lowrank.generate`: the interactive chat on piped stdin (history kept, /reset, /exit,
answers streamed), raw prompts with stop strings, sampling defaults from generation_config.json
and the flags over them, each compared with lowrank.generate called directly; bad input exits 2."""

import json
import shutil

import pytest
import torch

import lowrank
import lowrank.models.generation as generation
from lowrank.adapters.lora import LoraConfig, apply_lora
from lowrank.adapters.peft_format import save_adapter
from tests.conftest import FIXTURES
from tests.train_helpers import cli, copy_tokenizer, tiny_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A 2-layer Qwen2.5-0.5B-shaped model with the real vocabulary and the real Qwen tokenizer."""
    return copy_tokenizer(tiny_model_dir(tmp_path_factory.mktemp("gen") / "model", vocab_size=151936, seed=2))


@pytest.fixture
def calls(monkeypatch):
    """The prompts (id lists) the CLI passes to lowrank.generate, in order."""
    seen, real = [], generation.generate

    def recording(model, input_ids, *args, **kwargs):
        seen.append(input_ids.tolist())
        return real(model, input_ids, *args, **kwargs)

    monkeypatch.setattr(generation, "generate", recording)
    return seen


def _answer(folder, prompt_ids, n, **kw):
    tok = lowrank.load_tokenizer(folder)
    out = generation.generate(lowrank.load_model(folder), torch.tensor(prompt_ids), n, **kw)
    return tok.decode(out[len(prompt_ids):].tolist(), skip_special_tokens=True)


def test_chat_keeps_history_resets_and_exits(model_dir, calls, monkeypatch, capsys):
    stdin = "Who are you?\n\nAnd then?\n/reset\nAgain\n/exit\nnever read\n"
    status, out, err = cli("lowrank.generate", ["--model", model_dir, "--max-new-tokens", "4"], monkeypatch, capsys,
                           stdin=stdin)
    assert status == 0, err
    assert len(calls) == 3  # the empty line is skipped, nothing after /exit is read
    tok = lowrank.load_tokenizer(model_dir)
    answers = out.split("\n")[:3]
    first = tok.apply_chat_template([{"role": "user", "content": "Who are you?"}], add_generation_prompt=True,
                                    tokenize=True)
    assert calls[0] == first and answers[0] == _answer(model_dir, first, 4)
    second = tok.apply_chat_template([{"role": "user", "content": "Who are you?"},
                                      {"role": "assistant", "content": answers[0].strip()},
                                      {"role": "user", "content": "And then?"}], add_generation_prompt=True,
                                     tokenize=True)
    assert calls[1] == second and answers[0].strip() in tok.decode(calls[1])  # the first answer is in the prompt
    assert calls[2] == tok.apply_chat_template([{"role": "user", "content": "Again"}], add_generation_prompt=True,
                                               tokenize=True)  # /reset cleared the history
    assert "(conversation cleared)" in err


def test_raw_prompt_with_stop_and_sampling_flags(model_dir, calls, monkeypatch, capsys):
    prompt = "Human: What is 2+2?\nAssistant:"
    flags = ["--temperature", "0.9", "--top-k", "7", "--top-p", "0.8", "--repetition-penalty", "1.2", "--seed", "3"]
    status, out, err = cli("lowrank.generate", ["--model", model_dir, "--raw", "--prompt", prompt,
                                                "--max-new-tokens", "8", *flags], monkeypatch, capsys)
    assert status == 0, err
    tok = lowrank.load_tokenizer(model_dir)
    ids = tok.encode(prompt)
    assert calls == [ids]
    expected = _answer(model_dir, ids, 8, temperature=0.9, top_k=7, top_p=0.8, repetition_penalty=1.2,
                       generator=torch.Generator().manual_seed(3), eos_token_id=[tok.eos_token_id])
    assert out == expected.strip() + "\n"
    stop = expected.strip()[3:6]  # a piece of the answer: the answer ends before it
    status, out, _ = cli("lowrank.generate", ["--model", model_dir, "--raw", "--prompt", prompt, "--max-new-tokens",
                                              "8", "--stop", stop, *flags], monkeypatch, capsys)
    assert status == 0 and out == expected[:expected.find(stop)].strip() + "\n"


def test_sampling_defaults_come_from_generation_config(model_dir, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "r1-like"
    shutil.copytree(model_dir, folder)
    shutil.copy2(FIXTURES / "tokenizers" / "deepseek-r1-distill-qwen" / "generation_config.json", folder)
    args = ["--model", folder, "--prompt", "hi", "--max-new-tokens", "6", "--seed", "5"]
    tok = lowrank.load_tokenizer(folder)
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=True)
    # generation_config.json: do_sample, temperature 0.6, top_p 0.95; top_k unset is transformers' 50
    sampled = _answer(folder, ids, 6, temperature=0.6, top_p=0.95, top_k=50,
                      generator=torch.Generator().manual_seed(5), eos_token_id=[151643, 151645])
    greedy = _answer(folder, ids, 6)
    assert sampled != greedy  # the settings matter here
    assert cli("lowrank.generate", args, monkeypatch, capsys)[1] == sampled.strip() + "\n"
    assert cli("lowrank.generate", args + ["--greedy"], monkeypatch, capsys)[1] == greedy.strip() + "\n"


def test_bad_input_exits_2_with_one_line(model_dir, tmp_path, monkeypatch, capsys):
    deeper = tiny_model_dir(tmp_path / "deeper", num_hidden_layers=3)  # same widths, one more layer
    save_adapter(apply_lora(lowrank.load_model(deeper), LoraConfig(r=2)), tmp_path / "a3")
    (tmp_path / "bad-gen").mkdir()
    (tmp_path / "bad-gen" / "generation_config.json").write_text(json.dumps({"do_sample": True, "top_k": "many"}))
    cases = [
        (["--adapter", tmp_path / "a3"], "the adapter was trained on another model (another layer count)"),
        (["--top-p", "0"], "top_p=0.0: expected a probability mass in (0, 1]"),
        (["--chat-template", tmp_path / "t.jinja"], "t.jinja': no such file"),
        (["--model", "Qwen/Qwen2.5-0.5B-Instruct"], "lowrank reads local folders and never downloads"),
        (["--model", tmp_path / "bad-gen"], "generation_config.json: key 'top_k' should be a number"),
    ]
    for flags, message in cases:
        status, out, err = cli("lowrank.generate", ["--model", model_dir, "--prompt", "hi", *flags], monkeypatch,
                               capsys)
        lines = err.strip().splitlines()
        assert status == 2 and out == "" and len(lines) == 1 and lines[0].startswith("lowrank: error: "), err
        assert message in lines[0], lines[0]
