"""lowrank/train/export.py and `python -m lowrank.export`: the exported folder loads in transformers
(AutoModelForCausalLM + AutoTokenizer) with the logits of lowrank's model + adapter and the source
tokenizer, serves `python -m lowrank.generate`, and bad input exits 2 with nothing written."""

import json

import pytest
import torch

import lowrank
from lowrank.adapters.lora import LoraConfig, apply_lora
from lowrank.adapters.peft_format import load_adapter, save_adapter
from tests.conftest import make_hf_checkpoint, real_config, shrink
from tests.train_helpers import cli, copy_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore:save_adapter")
TEXTS = ["Hello there", "你是谁?", "<|im_start|>user\nhi<|im_end|>"]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who are you?"}]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tied Qwen2.5-0.5B-shaped checkpoint saved by transformers (its real vocabulary, so the real
    Qwen tokenizer files beside it fit), 2 layers 32 wide."""
    folder = tmp_path_factory.mktemp("export") / "base"
    config = real_config("Qwen2.5-0.5B-Instruct")
    make_hf_checkpoint(folder, shrink(config, vocab=config["vocab_size"]), seed=3)
    return copy_tokenizer(folder)


@pytest.fixture(scope="module")
def adapter(base):
    """A trained-looking rsLoRA adapter on every linear layer (B random, so the merge matters)."""
    model = apply_lora(lowrank.load_model(base), LoraConfig(r=4, alpha=8, use_rslora=True, target_modules="all-linear"))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return save_adapter(model, base.parent / "adapter")


def test_exported_folder_is_what_transformers_loads(base, adapter, tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    status, stdout, err = cli("lowrank.export", ["--model", base, "--adapter", adapter, "--output", out],
                              monkeypatch, capsys)
    assert status == 0, err
    assert stdout.strip() == f"lowrank: exported {base} with {adapter} merged to {out}"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                 "generation_config.json"):
        assert (out / name).is_file(), name
    assert not out.with_name("merged.partial").exists()

    ours = load_adapter(lowrank.load_model(base), adapter).eval()
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    x = torch.randint(0, 257, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = ours(x), hf(x).logits
        assert (expected - lowrank.load_model(base)(x)).abs().max() > 1e-2  # the adapter changes the logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)

    source, exported = AutoTokenizer.from_pretrained(base), AutoTokenizer.from_pretrained(out)
    assert len(exported) == len(source) and exported.eos_token == source.eos_token
    for text in TEXTS:
        assert exported(text)["input_ids"] == source(text)["input_ids"]
    kw = dict(add_generation_prompt=True, tokenize=False)
    assert exported.apply_chat_template(MESSAGES, **kw) == source.apply_chat_template(MESSAGES, **kw)
    assert (out / "generation_config.json").read_bytes() == (base / "generation_config.json").read_bytes()

    # and lowrank.generate serves it: the answer of the merged folder's own model, by the library
    status, stdout, err = cli("lowrank.generate", ["--model", out, "--prompt", "Who are you?", "--max-new-tokens", "9"],
                              monkeypatch, capsys)
    assert status == 0, err
    tok = lowrank.load_tokenizer(out)
    ids = tok.apply_chat_template([{"role": "user", "content": "Who are you?"}], add_generation_prompt=True,
                                  tokenize=True)
    new = lowrank.generate(lowrank.load_model(out), torch.tensor(ids), 9)[len(ids):]
    assert stdout == tok.decode(new.tolist(), skip_special_tokens=True).strip() + "\n"


def test_a_whole_model_exports_without_adapter_in_another_dtype(base, tmp_path):
    out = lowrank.export_model(base, None, tmp_path / "bf16", dtype="bfloat16")
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    model, source = lowrank.load_model(out), lowrank.load_model(base)
    for (k, a), (_, b) in zip(model.state_dict().items(), source.state_dict().items()):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b.to(torch.bfloat16)), k
    assert (out / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()


def test_builtin_template_is_written_out_for_a_folder_without_one(base, tmp_path):
    """The slow-file Qwen folder carries no template; lowrank's ChatML default ships as chat_template.jinja."""
    from transformers import AutoTokenizer

    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):  # no generation_config.json
        (bare / f).write_bytes((base / f).read_bytes())
    copy_tokenizer(bare, "qwen2.5-instruct")
    (bare / "tokenizer_config.json").write_text(json.dumps(
        {k: v for k, v in json.loads((bare / "tokenizer_config.json").read_text()).items() if k != "chat_template"}))
    out = lowrank.export_model(bare, None, tmp_path / "out")
    ours = lowrank.load_tokenizer(bare).apply_chat_template(MESSAGES, add_generation_prompt=True)
    exported = AutoTokenizer.from_pretrained(out)
    assert exported.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False) == ours
    # no generation_config.json to copy: one made of the config's eos and the chat's <|im_end|>
    config = json.loads((bare / "config.json").read_text())
    generation = json.loads((out / "generation_config.json").read_text())
    eos = generation["eos_token_id"]
    want = dict.fromkeys([config["eos_token_id"], exported.convert_tokens_to_ids("<|im_end|>")])
    assert (eos if isinstance(eos, list) else [eos]) == list(want)


@pytest.mark.parametrize("case", ["prefix adapter", "whole model as adapter", "output not empty", "no tokenizer",
                                  "hub id", "bad dtype"])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(base, adapter, tmp_path, monkeypatch, capsys, case):
    out = tmp_path / "out"
    args = ["--model", base, "--adapter", adapter, "--output", out]
    if case == "prefix adapter":
        model = lowrank.load_model(base)
        lowrank.apply_prefix(model, lowrank.PrefixConfig(num_virtual_tokens=3))
        args[3], message = save_adapter(model, tmp_path / "prefix"), "prefix-tuning adapter adds key/value prefixes"
    elif case == "whole model as adapter":
        args[3], message = base, "a whole model (a freeze or full fine-tune), not an adapter"
    elif case == "output not empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        message = "out: exists and is not empty"
    elif case == "no tokenizer":
        args += ["--tokenizer", tmp_path]
        message = "no tokenizer files"
    elif case == "hub id":
        args[1], message = "Qwen/Qwen2.5-0.5B-Instruct", "lowrank reads local folders and never downloads"
    else:
        args += ["--dtype", "int8"]
        message = "argument --dtype: invalid choice: 'int8'"
    status, _, err = cli("lowrank.export", args, monkeypatch, capsys)
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("lowrank: error: "), err
    assert message in lines[0], lines[0]
    assert (sorted(p.name for p in out.iterdir()) == ["keep.txt"]) if case == "output not empty" else not out.exists()
    assert not out.with_name("out.partial").exists()
