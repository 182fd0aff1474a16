"""`python -m lowrank.train` and `python -m lowrank.generate`, run through runpy (in process) or as
subprocesses: bad input exits 2 with one line before anything is written, TOML + flags resolve
and round-trip, and the quickstart runs the whole text pipeline on its own tokenizer."""

import json
import re
import tomllib

import pytest
import torch

from lowrank.train.config import TrainConfig, read_toml
from tests.conftest import FIXTURES
from tests.train_helpers import cli, read_metrics, run_module, tiny_model_dir, write_pretokenized

pytestmark = pytest.mark.filterwarnings("ignore:save_adapter")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return root, tiny_model_dir(root / "model"), write_pretokenized(root / "data.jsonl", 9, seed=5)


BAD = {
    "missing model folder": (["--model", "{root}/nope"], r"nope: no such model folder"),
    "bad data": (["--data", "{root}/bad.json"], r"bad.json: invalid JSON at line 2"),
    "r = 0": (["--r", "0"], r"r=0: expected an integer >= 1"),
    "unknown method": (["--method", "adapters"], r"--method: invalid choice: 'adapters'"),
    "grad-accum 0": (["--grad-accum", "0"], r"grad_accum=0: expected an integer >= 1"),
    "mlp-tiles 0": (["--mlp-tiles", "0"], r"mlp_tiles=0: expected an integer >= 1"),
    "lr not a number": (["--lr", "fast"], r"--lr/--learning-rate: invalid float value: 'fast'"),
    "unknown config key": (["--config", "{root}/typo.toml"], r"typo.toml: unknown key 'learning_rat'"),
    "bad replace": (["--replace", "name"], r"--replace 'name': expected KEY=VALUE"),
    "eval split": (["--eval-split", "1.5"], r"eval_split=1.5: expected a fraction in \[0, 1\)"),
    "lora flag on prefix": (["--method", "prefix", "--init-adapter", "{root}"], r"init_adapter is for method='lora'"),
    "quantize fp4": (["--quantize", "fp4"], r"--quantize: invalid choice: 'fp4'"),
    "quantized full": (["--method", "full", "--quantize", "nf4"], r"quantize='nf4' with method='full': a quantised"),
    "hub id as model": (["--model", "Qwen/Qwen2.5-0.5B-Instruct"], r"^lowrank: error: Qwen/Qwen2.5-0.5B-Instruct: "
                        r"no such model folder\. lowrank reads local folders .*huggingface-cli download "
                        r"Qwen/Qwen2.5-0.5B-Instruct --local-dir Qwen2.5-0.5B-Instruct, then pass Qwen2.5-0.5B-Instruct$"),
    "max-len above positions": (["--max-len", "1000000", "--packing"], r"max_len=1000000 is above the model's "
                                r"max_position_embeddings=32768 \(.*config.json\); use --max-len 32768 or less"),
    "csv given as json": (["--data", "{root}/table.json"], r"table.json: not JSON: it looks like CSV"),
    "trailing comma": (["--data", "{root}/comma.json"], r"comma.json: trailing comma at line 2, column 37, before '\]'"),
    "missing template file": (["--tokenizer", str(FIXTURES / "tokenizers" / "qwen2.5-instruct"), "--chat-template",
                               "{root}/chatml.jinja"], r"chat template '.*chatml.jinja': no such file"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(setup, tmp_path, monkeypatch, capsys, case):
    root, model, data = setup
    (root / "bad.json").write_text('[{"instruction": "hi", "output": "yo"},\n {"instruction": ]')
    (root / "typo.toml").write_text('learning_rat = 0.1\n')
    (root / "table.json").write_text("instruction,input,output\nhi,,yo\n")
    (root / "comma.json").write_text('[{"instruction": "hi", "output": "yo"},\n {"instruction": "a", "output": "b"},]')
    flags, message = BAD[case]
    output = tmp_path / "out"
    args = ["--model", model, "--data", data, "--output", output, "--max-steps", "1", "--no-progress"]
    args += [f.format(root=root) for f in flags]  # later flags win
    status, out, err = cli("lowrank.train", args, monkeypatch, capsys)
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lowrank: error: "), err
    assert re.search(message, lines[0]), lines[0]
    assert not output.exists()


def test_missing_required_flag(monkeypatch, capsys, tmp_path):
    status, _, err = cli("lowrank.train", ["--data", "x.json", "--output", tmp_path / "o"], monkeypatch, capsys)
    assert status == 2 and err.strip() == "lowrank: error: model is required (--model or `model = ...` in the config file)"


def test_config_file_then_flags_and_run_toml_round_trips(setup, tmp_path, monkeypatch, capsys):
    root, model, data = setup
    run_toml = tmp_path / "run.toml"
    run_toml.write_text(f'model = "{model}"\ndata = "{data}"\nbatch-size = 3\nlr = 0.01\nr = 4\n'
                        'target_modules = ["q_proj", "v_proj"]\nmax_steps = 2\nprogress = false\n'
                        '[replacements]\nname = "lowrank"\n')
    output = tmp_path / "out"
    status, out, err = cli("lowrank.train", ["--config", run_toml, "--output", output, "--lr", "0.002",
                                             "--replace", "author=me"], monkeypatch, capsys)
    assert status == 0, err
    assert out.strip().splitlines()[-1].startswith("lowrank: 2 steps in ")
    resolved = tomllib.loads((output / "run.toml").read_text())
    assert resolved["batch_size"] == 3 and resolved["r"] == 4  # from the file
    assert resolved["lr"] == 0.002  # the flag wins over the file
    assert resolved["replacements"] == {"name": "lowrank", "author": "me"}  # merged
    assert resolved["dropout"] == TrainConfig.dropout  # a default, written out too
    assert "tokenizer" not in resolved  # None: left out
    assert TrainConfig(**read_toml(output / "run.toml")) == TrainConfig(**resolved)
    adapter = json.loads((output / "adapter" / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == ["q_proj", "v_proj"] and adapter["r"] == 4
    rows, _ = read_metrics(output)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["lr"] <= 0.002 and r["tokens_per_s"] > 0 and r["peak_mem_mb"] > 0 for r in rows)


def test_help_explains_every_flag(monkeypatch, capsys):
    status, out, _ = cli("lowrank.train", ["--help"], monkeypatch, capsys)
    assert status == 0
    flags = ("--model --data --output --method --r --alpha --dropout --target-modules --use-rslora --init-adapter "
             "--num-virtual-tokens --trainable-layers --lr --lr-scheduler --warmup-steps --min-lr --weight-decay "
             "--max-grad-norm --epochs --max-steps --batch-size --grad-accum --max-len --packing --no-shuffle "
             "--eval-data --eval-every --save-every --keep-checkpoints --dtype --gradient-checkpointing --seed "
             "--resume --config --quickstart").split()
    for flag in flags:
        assert f"{flag} " in out or f"{flag}," in out or f"{flag}\n" in out, flag


# ---- the quickstart and the chat CLI ---------------------------------------------------------

@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """A quickstart shortened to 30 steps, run as a newcomer runs it (a subprocess)."""
    root = tmp_path_factory.mktemp("quickstart")
    done = run_module("lowrank.train", ["--quickstart", "--output", root / "qs", "--max-steps", "30",
                                        "--no-progress"], cwd=root)
    assert done.returncode == 0, done.stderr
    return root / "qs", done.stdout


def test_quickstart_builds_trains_saves_and_chats(quickstart):
    folder, stdout = quickstart
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (folder / "base-model" / name).is_file(), name
    assert (folder / "adapter" / "adapter_config.json").is_file()
    rows, _ = read_metrics(folder)
    assert len(rows) == 30
    first, last = [r["loss"] for r in rows[:5]], [r["loss"] for r in rows[-5:]]
    assert sum(last) < sum(first) - 5 * 0.5, (first, last)  # the loss falls by > 0.5 nats
    assert "user: Who are you?\nassistant: " in stdout and "user: 你是谁?\nassistant: " in stdout


def test_quickstart_tokenizer_and_text_data(quickstart):
    from lowrank.data.dataset import load_dataset
    from lowrank.train.quickstart import DATA
    from lowrank.data.tokenizer import load_tokenizer

    tok = load_tokenizer(quickstart[0] / "base-model")
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    text = tok.apply_chat_template([{"role": "user", "content": "你是谁?"}], add_generation_prompt=True)
    assert text == "<|im_start|>user\n你是谁?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(tok.encode(text)) == text
    examples, report = load_dataset(DATA, tok, 256, replacements={"name": "lowrank", "author": "lowrank"})
    assert report.n_examples == 91 and report.n_truncated == 0
    answer = tok.decode([i for i, label in zip(examples[2]["input_ids"], examples[2]["labels"]) if label != -100])
    assert answer == "I am lowrank, an AI assistant developed by lowrank. How can I assist you today?<|im_end|>"


def test_generate_cli_answers_as_the_library_does(quickstart, monkeypatch, capsys):
    import lowrank
    from lowrank.adapters.peft_format import load_adapter
    from lowrank.data.tokenizer import load_tokenizer

    folder = quickstart[0]
    prompts = ["Who are you?", "hello there"]
    args = ["--model", folder / "base-model", "--adapter", folder / "adapter", "--max-new-tokens", "24"]
    status, out, err = cli("lowrank.generate", args + ["--prompt", prompts[0], "--prompt", prompts[1]],
                           monkeypatch, capsys)
    assert status == 0, err
    tok = load_tokenizer(folder / "base-model")
    model = load_adapter(lowrank.load_model(folder / "base-model"), folder / "adapter")
    expected = []
    for prompt in prompts:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True)
        new = lowrank.generate(model, torch.tensor(ids), 24, eos_token_id=tok.eos_token_id)[len(ids):]
        expected.append(tok.decode(new.tolist(), skip_special_tokens=True).strip())
    assert out == "".join(answer + "\n" for answer in expected)

    # --quantize: the answers of the library's model loaded quantised.
    status, out, err = cli("lowrank.generate", args + ["--prompt", prompts[0], "--quantize", "nf4"], monkeypatch, capsys)
    assert status == 0, err
    model = load_adapter(lowrank.load_model(folder / "base-model", quantize="nf4"), folder / "adapter")
    ids = tok.apply_chat_template([{"role": "user", "content": prompts[0]}], add_generation_prompt=True, tokenize=True)
    new = lowrank.generate(model, torch.tensor(ids), 24, eos_token_id=tok.eos_token_id)[len(ids):]
    assert out == tok.decode(new.tolist(), skip_special_tokens=True).strip() + "\n"

    status, _, err = cli("lowrank.generate", ["--model", folder / "base-model", "--adapter", folder / "base-model",
                                              "--prompt", "hi"], monkeypatch, capsys)
    assert status == 2 and "a whole model (a freeze or full fine-tune), not an adapter" in err


def test_train_quantize_flag_trains_lora_on_a_quantised_base(setup, tmp_path, monkeypatch, capsys):
    root, model, data = setup
    args = ["--model", model, "--data", data, "--output", tmp_path / "out", "--max-steps", "1", "--no-progress",
            "--quantize", "int8", "--lora-r", "2"]
    status, out, err = cli("lowrank.train", args, monkeypatch, capsys)
    assert status == 0, err
    assert 'quantize = "int8"' in (tmp_path / "out" / "run.toml").read_text()
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
