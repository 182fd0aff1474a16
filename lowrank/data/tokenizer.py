"""Tokenizers of Qwen and DeepSeek folders, read without transformers.

A folder holds one of three encodings of the vocabulary, tried in this order:

- ``tokenizer.json``: the whole pipeline, loaded as is by the ``tokenizers`` library;
- ``vocab.json`` + ``merges.txt``: Qwen's "slow" byte-level BPE files. The pipeline is rebuilt
  the way transformers' Qwen2Tokenizer builds it (NFC, Qwen's split regex, byte-level bytes,
  byte-level decoder), with Qwen3.5's split regex for a Qwen3.5 folder as its Qwen3_5Tokenizer
  does; the test suite checks it against the ``tokenizer.json`` of the same model;
- ``tokenizer.model``: a SentencePiece model, run by ``sentencepiece``.

``tokenizer_config.json`` / ``special_tokens_map.json`` / ``added_tokens.json`` add the named
special tokens (bos, eos, pad, unk), the extra special tokens and the added tokens. Added tokens
are matched in the raw text before BPE runs, so ``<|im_end|>`` is one id wherever it appears.

Pad-token fallback: base models often name no pad token. Padding positions are masked out of
attention and loss, so any real id works; lowrank takes, in order, the configured ``pad_token``,
``<|endoftext|>`` when the vocabulary has it (Qwen), then the eos token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..errors import CheckpointError, ConfigError
from ..files import missing_folder_message
from .encoding import Encoding, encode_batch
from .chat_template import BUILTIN_TEMPLATES, render_chat, resolve_template
from .tokenizer_backends import (QWEN35_SPLIT_PATTERN, QWEN_SPLIT_PATTERN, AddedTokenSpec, SentencePieceBackend,
                                 TokenizersBackend)

# Folders whose vocab.json + merges.txt take Qwen3.5's split regex, as transformers picks its
# Qwen3_5Tokenizer: by config.json's model_type (the hub's tokenizer_config.json says Qwen2Tokenizer,
# which transformers overrides for these types), or by a tokenizer_class transformers 5 saved.
QWEN35_MODEL_TYPES = ("qwen3_5", "qwen3_5_moe", "qwen3_5_text", "qwen3_5_moe_text")
QWEN35_TOKENIZER_CLASSES = ("Qwen3_5Tokenizer", "Qwen3_5TokenizerFast")
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_TOKEN_FLAGS = ("lstrip", "rstrip", "single_word", "normalized")


@dataclass
class Tokenizer:
    """A loaded tokenizer: ids in and out, named special tokens, and the model's chat template."""

    backend: "TokenizersBackend | SentencePieceBackend"
    path: Path
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    unk_token: str | None = None
    chat_template: str | None = None
    # The named tokens the folder configures (pad without its fallback): what templates see.
    template_tokens: dict[str, str] = field(default_factory=dict)
    padding_side: str = "right"  # tokenizer_config.json's, as transformers; "left" for batched generation

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; add_special_tokens adds the bos/eos the folder asks for (none for Qwen)."""
        return self.backend.encode(text, add_special_tokens)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens)

    def batch_decode(self, sequences, skip_special_tokens: bool = False) -> list[str]:
        """decode() of each row of a list of id lists or a [B, T] tensor."""
        return [self.decode(row, skip_special_tokens) for row in sequences]

    def __call__(self, text, add_special_tokens: bool = True, padding=False, truncation: bool = False,
                 max_length: int | None = None, return_tensors: str | None = None,
                 padding_side: str | None = None) -> "Encoding":
        """{"input_ids", "attention_mask"} of a text or a list of texts, as transformers' tokenizer call.

        padding: False, True / "longest" (to the longest text) or "max_length"; truncation cuts at
        max_length; return_tensors="pt" gives [B, T] tensors (a single text gives [1, T]), which
        needs equal lengths. padding_side defaults to the folder's (tokenizer_config.json).
        """
        return encode_batch(self, text, add_special_tokens, padding, truncation, max_length, return_tensors,
                            padding_side or self.padding_side)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(int(token_id))

    @property
    def special_tokens(self) -> set[str]:
        """Contents of the tokens `decode(..., skip_special_tokens=True)` drops."""
        return self.backend.special_tokens()

    @property
    def bos_token_id(self) -> int | None:
        return None if self.bos_token is None else self.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return None if self.eos_token is None else self.token_to_id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return None if self.pad_token is None else self.token_to_id(self.pad_token)

    @property
    def vocab_size(self) -> int:
        """Size of the base vocabulary, without added tokens (transformers' `vocab_size`)."""
        return self.backend.size(with_added=False)

    def __len__(self) -> int:
        """Number of ids the tokenizer can produce, added tokens included."""
        return self.backend.size(with_added=True)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False,
                            tokenize: bool = False, return_dict: bool = False, return_tensors: str | None = None,
                            **kwargs):
        """Render `messages` with the model's chat template, as transformers does: the text, or with
        tokenize=True its ids (a list; [1, T] with return_tensors="pt"; with return_dict=True the
        {"input_ids", "attention_mask"} that transformers 5 returns by default)."""
        if return_dict or return_tensors:
            tokenize = True
        if self.chat_template is None:
            raise ConfigError(
                f"{self.path}: the tokenizer has no chat template and none of the built-in ones "
                f"({', '.join(BUILTIN_TEMPLATES)}) fits its vocabulary; pass chat_template= to load_tokenizer"
            )
        text = render_chat(self.chat_template, messages, add_generation_prompt,
                           **{**self.template_tokens, **kwargs})
        if not tokenize:
            return text
        # As transformers: the template writes the bos itself, so no special tokens are added.
        if not (return_dict or return_tensors):
            return self.encode(text, add_special_tokens=False)
        encoded = self(text, add_special_tokens=False, return_tensors=return_tensors)
        return encoded if return_dict else encoded["input_ids"]


def load_tokenizer(path, chat_template: str | None = None) -> Tokenizer:
    """Load the tokenizer of a model folder.

    chat_template: a built-in name ("chatml", "deepseek"), a template file (.jinja) or Jinja
    source, used in place of the folder's own; folders that carry none get ChatML when the vocabulary has
    ``<|im_start|>``/``<|im_end|>`` and the DeepSeek format when its eos is
    ``<｜end▁of▁sentence｜>``.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(missing_folder_message(path, "tokenizer folder"))
    config = _read_json(folder / "tokenizer_config.json") or {}
    special_map = _read_json(folder / "special_tokens_map.json") or {}
    backend = _open_backend(folder, config)
    try:
        named = _named_tokens(config, special_map, backend)
        backend.add_tokens(_added_tokens(folder, config, special_map, named))
    except CheckpointError as e:
        raise CheckpointError(f"{folder}: {e}") from None
    _set_bos_eos(backend, config, named)

    tokens = {key: spec.content for key, spec in named.items()}
    pad = tokens.get("pad_token")
    if pad is None:
        pad = "<|endoftext|>" if backend.token_to_id("<|endoftext|>") is not None else tokens.get("eos_token")
    side = config.get("padding_side", "right")
    if side not in ("left", "right"):
        raise CheckpointError(f"{folder / 'tokenizer_config.json'}: padding_side {side!r}; expected 'left' or 'right'")
    tok = Tokenizer(backend=backend, path=folder, bos_token=tokens.get("bos_token"), eos_token=tokens.get("eos_token"),
                    pad_token=pad, unk_token=tokens.get("unk_token"), template_tokens=tokens, padding_side=side)
    tok.chat_template = _chat_template(folder, config, tok, chat_template)
    return tok


# ---- reading the folder -------------------------------------------------------------------

def _read_json(file: Path):
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None


def _open_backend(folder: Path, config: dict):
    if (folder / "tokenizer.json").is_file():
        return TokenizersBackend.from_tokenizer_json(folder / "tokenizer.json")
    if (folder / "vocab.json").is_file() or (folder / "merges.txt").is_file():
        pattern = QWEN35_SPLIT_PATTERN if _is_qwen35(folder, config) else QWEN_SPLIT_PATTERN
        return TokenizersBackend.from_byte_level_bpe(folder, bool(config.get("add_prefix_space", False)), pattern)
    if (folder / "tokenizer.model").is_file():
        return SentencePieceBackend(folder / "tokenizer.model")
    raise CheckpointError(
        f"{folder}: no tokenizer files; expected tokenizer.json, vocab.json + merges.txt, or tokenizer.model"
    )


def _is_qwen35(folder: Path, config: dict) -> bool:
    model = _read_json(folder / "config.json")
    return ((isinstance(model, dict) and model.get("model_type") in QWEN35_MODEL_TYPES)
            or config.get("tokenizer_class") in QWEN35_TOKENIZER_CLASSES)


def _named_tokens(config: dict, special_map: dict, backend) -> dict[str, AddedTokenSpec]:
    """bos_token, eos_token, ...: tokenizer_config.json first, then special_tokens_map.json; a
    SentencePiece model the configs say nothing about brings its own bos / eos / unk."""
    named = {}
    for key in NAMED_SPECIAL_TOKENS:
        spec = _token_spec(config[key] if config.get(key) is not None else special_map.get(key))
        if spec is not None:
            named[key] = spec
    if isinstance(backend, SentencePieceBackend):
        sp = backend.sp
        for key, token_id in (("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()), ("unk_token", sp.unk_id())):
            if key not in config and key not in named and token_id >= 0:
                named[key] = AddedTokenSpec(sp.id_to_piece(token_id), special=True)
    return named


def _token_spec(value, token_id: int | None = None, special: bool = True) -> AddedTokenSpec | None:
    """A token as configs write it: a string, or a dict with `content` and flags (AddedToken)."""
    if value is None:
        return None
    if isinstance(value, str):
        return AddedTokenSpec(value, special=special, id=token_id)
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        flags = {k: bool(value[k]) for k in _TOKEN_FLAGS if k in value}
        return AddedTokenSpec(value["content"], special=bool(value.get("special", special)), id=token_id, **flags)
    raise CheckpointError(f"token {value!r}: expected a string or a dict with 'content'")


def _added_tokens(folder: Path, config: dict, special_map: dict, named: dict) -> list[AddedTokenSpec]:
    """Every added token in the order transformers registers them: those with fixed ids first
    (added_tokens_decoder, added_tokens.json), then the named and extra special tokens."""
    specs = [_token_spec(value, int(token_id), special=False)
             for token_id, value in config.get("added_tokens_decoder", {}).items()]
    specs += [AddedTokenSpec(content, special=False, id=int(token_id))
              for content, token_id in (_read_json(folder / "added_tokens.json") or {}).items()]
    specs = sorted(specs, key=lambda s: s.id) + list(named.values())
    for source in (config, special_map):
        for key in ("additional_special_tokens", "extra_special_tokens"):
            extra = source.get(key) or []
            # transformers 4 wrote extra_special_tokens as a {name: token} dict, 5 as a list.
            specs += [_token_spec(v) for v in (extra.values() if isinstance(extra, dict) else extra)]
    special = {s.content for s in specs if s.special}
    seen, unique = set(), []
    for s in specs:
        if s.content not in seen:
            seen.add(s.content)
            # A token named special anywhere is special (skipped by decode(skip_special_tokens=True)).
            unique.append(replace(s, special=s.content in special))
    return unique


def _set_bos_eos(backend, config: dict, named: dict) -> None:
    """bos/eos added by encode(add_special_tokens=True): transformers rebuilds the post-processor
    from add_bos_token/add_eos_token when the config states them, or when tokenizer.json has none;
    otherwise tokenizer.json's own post-processor stands."""
    if isinstance(backend, SentencePieceBackend):
        # LlamaTokenizer's defaults for SentencePiece models.
        add_bos, add_eos = config.get("add_bos_token", True), config.get("add_eos_token", False)
    elif "add_bos_token" in config or "add_eos_token" in config or not backend.has_post_processor():
        add_bos, add_eos = config.get("add_bos_token", False), config.get("add_eos_token", False)
    else:
        return
    bos, eos = named.get("bos_token"), named.get("eos_token")
    backend.set_bos_eos(bos.content if add_bos and bos else None, eos.content if add_eos and eos else None)


def _chat_template(folder: Path, config: dict, tok: Tokenizer, override: str | None) -> str | None:
    source = resolve_template(override) if override is not None else None
    if source is None and (folder / "chat_template.jinja").is_file():
        source = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if source is None:
        source = config.get("chat_template")
        if isinstance(source, list):  # a list of named templates: take the default one
            source = next((t["template"] for t in source if t.get("name") == "default"), None)
    if source is None:
        if tok.token_to_id("<|im_start|>") is not None and tok.token_to_id("<|im_end|>") is not None:
            source = "chatml"
        elif tok.eos_token == "<｜end▁of▁sentence｜>":
            source = "deepseek"
    return BUILTIN_TEMPLATES.get(source, source)
