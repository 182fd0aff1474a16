"""The tokenizer backends, one per file format, with the same methods: the `tokenizers` library
(tokenizer.json, or Qwen's vocab.json + merges.txt rebuilt as the same pipeline) and
`sentencepiece` (tokenizer.model). lowrank.data.tokenizer picks one and adds the folder's configs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError


@dataclass(frozen=True)
class AddedTokenSpec:
    """One added token as a folder describes it; id is None where the folder leaves it to us."""

    content: str
    special: bool
    id: int | None = None
    lstrip: bool = False
    rstrip: bool = False
    single_word: bool = False
    normalized: bool = False


# The split regex of Qwen2's pre-tokenizer, as in its tokenizer.json.
QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen3.5's (llama.cpp calls it "qwen35"): Qwen2's with combining marks (\p{M}) counted as letters,
# so a mark stays in its word (Devanagari vowel signs, Thai tone marks) instead of starting a
# punctuation run. Its tokenizer.json carries it as a plain Split, which tokenizers reads as is.
QWEN35_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

class TokenizersBackend:
    """tokenizer.json, or Qwen's vocab.json + merges.txt rebuilt as the same pipeline."""

    def __init__(self, tok):
        self.tok = tok

    @classmethod
    def from_tokenizer_json(cls, file: Path) -> "TokenizersBackend":
        from tokenizers import Tokenizer as HFTokenizer

        try:
            return cls(HFTokenizer.from_file(str(file)))
        except Exception as e:  # the Rust side raises plain Exception on any parse error
            raise CheckpointError(f"{file}: cannot be read as a tokenizers file ({e})") from None

    @classmethod
    def from_byte_level_bpe(cls, folder: Path, add_prefix_space: bool,
                            split_pattern: str = QWEN_SPLIT_PATTERN) -> "TokenizersBackend":
        from tokenizers import Regex, decoders, normalizers, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers.models import BPE

        for name in ("vocab.json", "merges.txt"):
            if not (folder / name).is_file():
                raise CheckpointError(
                    f"{folder / name}: missing; a byte-level BPE folder needs vocab.json and merges.txt")
        try:
            bpe = BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt"), dropout=None, unk_token=None,
                                continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
                                byte_fallback=False)
        except Exception as e:
            raise CheckpointError(f"{folder}: vocab.json / merges.txt cannot be read ({e})") from None
        tok = HFTokenizer(bpe)
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split_pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=False),
        ])
        tok.decoder = decoders.ByteLevel()
        return cls(tok)

    def add_tokens(self, specs: list[AddedTokenSpec]) -> None:
        from tokenizers import AddedToken

        known = {t.content for t in self.tok.get_added_tokens_decoder().values()}
        for spec in specs:
            have = self.tok.token_to_id(spec.content)
            token_id = have if have is not None else self.tok.get_vocab_size(with_added_tokens=True)
            if spec.id is not None and spec.id != token_id:
                raise CheckpointError(
                    f"added token {spec.content!r}: the folder gives id {spec.id}, the vocabulary {token_id}")
            if spec.content in known:
                continue
            token = AddedToken(spec.content, single_word=spec.single_word, lstrip=spec.lstrip, rstrip=spec.rstrip,
                               normalized=spec.normalized, special=spec.special)
            (self.tok.add_special_tokens if spec.special else self.tok.add_tokens)([token])

    def has_post_processor(self) -> bool:
        return self.tok.post_processor is not None

    def set_bos_eos(self, bos: str | None, eos: str | None) -> None:
        from tokenizers import processors

        single = " ".join([f"{bos}:0"] * bool(bos) + ["$A:0"] + [f"{eos}:0"] * bool(eos))
        pair = single + " " + " ".join([f"{bos}:1"] * bool(bos) + ["$B:1"] + [f"{eos}:1"] * bool(eos))
        specials = [(t, self.tok.token_to_id(t)) for t in dict.fromkeys(x for x in (bos, eos) if x)]
        self.tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.tok.id_to_token(token_id)

    def special_tokens(self) -> set[str]:
        return {t.content for t in self.tok.get_added_tokens_decoder().values() if t.special}

    def size(self, with_added: bool) -> int:
        return self.tok.get_vocab_size(with_added_tokens=with_added)


class SentencePieceBackend:
    """tokenizer.model. Added tokens are split out of the text first, as tokenizers does; each
    piece of plain text between them is encoded by sentencepiece on its own (with its dummy
    prefix, as transformers' legacy Llama tokenizer does)."""

    def __init__(self, file: Path):
        import sentencepiece as spm

        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(file))
        except Exception as e:
            raise CheckpointError(f"{file}: cannot be read as a SentencePiece model ({e})") from None
        self.added: dict[str, int] = {}
        self.added_special: set[str] = set()
        self.prefix: list[int] = []
        self.suffix: list[int] = []
        self._split = None

    def add_tokens(self, specs: list[AddedTokenSpec]) -> None:
        for spec in specs:
            token_id = self.token_to_id(spec.content)
            if token_id is None:
                token_id = self.size(with_added=True)
            if spec.id is not None and spec.id != token_id:
                raise CheckpointError(
                    f"added token {spec.content!r}: the folder gives id {spec.id}, the vocabulary {token_id}")
            self.added[spec.content] = token_id
            if spec.special:
                self.added_special.add(spec.content)
        # Longest first, so a token that contains another wins.
        names = sorted(self.added, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None

    def set_bos_eos(self, bos: str | None, eos: str | None) -> None:
        self.prefix = [self.token_to_id(bos)] if bos else []
        self.suffix = [self.token_to_id(eos)] if eos else []

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        ids = []
        for i, piece in enumerate(self._split.split(text) if self._split else [text]):
            if i % 2:  # re.split puts the matched added tokens at odd positions
                ids.append(self.added[piece])
            elif piece:
                ids += self.sp.encode(piece)
        return self.prefix + ids + self.suffix if add_special_tokens else ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        by_id = {i: t for t, i in self.added.items()}
        out, run = [], []
        for i in ids:
            if i in by_id:
                out.append(self.sp.decode(run))
                run = []
                if not (skip_special_tokens and by_id[i] in self.added_special):
                    out.append(by_id[i])
            elif not (skip_special_tokens and self.sp.is_control(i)):
                run.append(i)
        return "".join(out) + self.sp.decode(run)

    def token_to_id(self, token: str) -> int | None:
        if token in self.added:
            return self.added[token]
        token_id = self.sp.piece_to_id(token)
        # sentencepiece answers the unk id for unknown pieces
        return token_id if self.sp.id_to_piece(token_id) == token else None

    def id_to_token(self, token_id: int) -> str | None:
        for token, i in self.added.items():
            if i == token_id:
                return token
        return self.sp.id_to_piece(token_id) if 0 <= token_id < self.sp.get_piece_size() else None

    def special_tokens(self) -> set[str]:
        return set(self.added_special)

    def size(self, with_added: bool) -> int:
        base = self.sp.get_piece_size()
        return max([base] + [i + 1 for i in self.added.values()]) if with_added else base
