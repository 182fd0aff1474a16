"""The quickstart: the whole pipeline on the CPU in a couple of minutes, nothing downloaded.

`python -m lowrank.train --quickstart` does, in ./lowrank-quickstart (or --output):

1. `build_base(folder)`: trains a byte-level BPE tokenizer (1,024 ids; Qwen2's pre-tokenizer;
   ChatML's special tokens and template) on the shipped identity data, builds a random
   Qwen2-architecture model (4 layers, hidden 256, tied embeddings) and saves both as a Hugging
   Face folder with `lowrank.save_model`: the same kind of folder as Qwen2.5-0.5B-Instruct.
2. trains LoRA on `quickstart_data/identity.json` (91 self-cognition records from
   LLaMA-Factory, Apache-2.0, see quickstart_data/LICENSE.LLaMA-Factory) with its {{name}} and
   {{author}} placeholders filled with "lowrank", through `lowrank.train.loop.finetune`;
3. asks the fine-tuned model who it is and prints the answers.

The base is random, so it knows nothing before step 1 of training; what the LoRA layers learn
in a few hundred steps is the identity answers, which is the point of the demonstration.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..data.chat_template import CHATML_TEMPLATE, render_chat
from ..errors import ConfigError

DATA_DIR = Path(__file__).resolve().parent / "quickstart_data"
DATA = DATA_DIR / "identity.json"
REPLACEMENTS = {"name": "lowrank", "author": "lowrank"}
MARKER = ".lowrank-quickstart"  # marks a folder the quickstart made, which it may clear on a rerun
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
PROMPTS = ["Who are you?", "你是谁?"]

# A Qwen2.5-shaped model, shrunk: GQA (4 query / 2 key-value heads), q/k/v biases, tied embeddings.
MODEL = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2)
VOCAB = 1024


def quickstart_settings(output: str | None = None) -> dict:
    """The quickstart's TrainConfig values; flags given with --quickstart override them."""
    out = Path(output or "lowrank-quickstart")
    return dict(model=str(out / "base-model"), data=str(DATA), output=str(out), method="lora",
                r=16, alpha=32.0, dropout=0.0, lr=3e-3, lr_scheduler="cosine", warmup_steps=10,
                epochs=20, batch_size=8, max_len=256, save_every=100,
                keep_checkpoints=1, replacements=dict(REPLACEMENTS), device="cpu", dtype="float32", seed=0)


def run_quickstart(config) -> None:
    """Build the base if needed, train, and chat with the result (see the module docstring)."""
    from ..models.checkpoint import load_model
    from .config import check_config
    from .loop import finetune

    check_config(config)
    out, base = Path(config.output), Path(config.model)
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        raise ConfigError(f"{out}: exists and was not made by the quickstart; choose another --output")
    if not (base / "config.json").is_file():
        print(f"lowrank quickstart: building a tiny Qwen2 model and tokenizer in {base}", flush=True)
        build_base(base)
    (out / MARKER).touch()
    if not config.resume:  # a rerun starts over rather than refusing the old checkpoints
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    result = finetune(config)

    from ..adapters.peft_format import load_adapter

    model = load_adapter(load_model(base), result.adapter)  # the saved adapter, as a user would load it
    for prompt in PROMPTS:
        print(f"\nuser: {prompt}\nassistant: {chat(model, result.tokenizer, prompt)}", flush=True)
    print(f"\nadapter: {result.adapter}   chat with it:\n"
          f"  python -m lowrank.generate --model {base} --adapter {result.adapter} --prompt \"Who are you?\"")


def chat(model, tokenizer, prompt: str, max_new_tokens: int = 64) -> str:
    """The model's greedy answer to one user message, through the tokenizer's chat template."""
    from ..models.generation import generate

    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        tokenize=True)
    out = generate(model, torch.tensor(ids), max_new_tokens, eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[len(ids):], skip_special_tokens=True).strip()


# ---- the base model -------------------------------------------------------------------------

def build_base(folder, seed: int = 0) -> Path:
    """Write a tokenizer trained on the quickstart data and a random tiny Qwen2 model to `folder`."""
    from ..models import build_model, config_from_dict, save_model

    folder = Path(folder)
    tokenizer = save_tokenizer(folder)
    ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
    hf = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=tokenizer.get_vocab_size(),
              max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True,
              hidden_act="silu", use_sliding_window=False, sliding_window=None, max_window_layers=MODEL[
                  "num_hidden_layers"], attention_dropout=0.0, initializer_range=0.02, use_cache=True,
              bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], torch_dtype="float32", **MODEL)
    torch.manual_seed(seed)
    model = build_model(config_from_dict(hf))
    init_weights_(model, std=hf["initializer_range"])
    save_model(model, folder)
    return folder


def save_tokenizer(folder):
    """Write train_tokenizer()'s tokenizer to `folder` as a Qwen2 tokenizer with ChatML's template; returns it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer()
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "unk_token": None, "chat_template": CHATML_TEMPLATE,
        "model_max_length": 2048, "add_prefix_space": False, "clean_up_tokenization_spaces": False,
        "errors": "replace", "split_special_tokens": False,
    }, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return tokenizer


def train_tokenizer():
    """A byte-level BPE with Qwen2's pre-tokenizer, trained on the quickstart conversations."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    from ..data.dataset import read_records, record_to_messages
    from ..data.tokenizer_backends import QWEN_SPLIT_PATTERN

    texts = [render_chat(CHATML_TEMPLATE, record_to_messages(r, REPLACEMENTS)) for r in read_records(DATA)]
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


@torch.no_grad()
def init_weights_(model, std: float = 0.02) -> None:
    """transformers' initialisation for Qwen2: N(0, std) matrices and embeddings, zero biases, unit norms."""
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.normal_(0.0, std)
