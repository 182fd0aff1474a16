"""Rendered conversations to ids and answer-only labels in batches, at the speed of the tokenizer.

`dataset.tokenize_conversation` (the reference) encodes each rendered text, then the text up to
each boundary of a trained span, and trains the tokens between the two shared prefixes: three
encodes per answer, one record at a time. Here the whole texts of a chunk of records go through
`tokenizers`' `encode_batch` (Rust, all cores), and each boundary b costs a few tokens:

The tokenizers library cuts the text at added tokens (``<|im_start|>``, ``<|im_end|>``, ...)
before anything else and tokenizes the pieces between them independently. So if the last added
token of the full encoding that ends at or before b is token k, ending at character c, then

    encode(text[:b]) == ids[:k + 1] + encode(text[c:b])

(an added token matched in the full text within text[:b] is matched the same in text[:b], and
the pieces before it are the same pieces). The shared prefix the reference computes is then
k + 1 plus the shared prefix of encode(text[c:b]) with ids[k + 1:]: in ChatML the tail is
"assistant\\n" for every answer start and empty for every answer end (just after <|im_end|>).
The reference also bounds an answer's start by the shared prefix of the generation prompt's own
tokens (Qwen3.5's prompt ends with "<think>\\n" a turn without reasoning lacks); the prompt agrees
with the text up to the start, so it takes the start's anchor and its tail is prompt[c:].

The identity needs the pieces to be tokenized alone. Two pipeline parts break it, and the
anchor is then the start of the text (exact, only slower): a ``Metaspace`` pre-tokenizer or
``Prepend`` normalizer (they treat the first piece of a text differently) and ``single_word``
added tokens (whether they match depends on the character before them). SentencePiece models
(tokenizer.model) have no batch encoder with offsets; they take the reference path.
"""

from __future__ import annotations

import numpy as np

from .tokenizer_backends import TokenizersBackend


def supports(tokenizer) -> bool:
    """Whether `tokenizer` has the batch path (the tokenizers library behind it)."""
    return isinstance(getattr(tokenizer, "backend", None), TokenizersBackend)


class BatchLabeler:
    """encode_batch plus the anchor rule for one tokenizer (computed once per load)."""

    def __init__(self, tokenizer):
        tok = tokenizer.backend.tok
        self.tok = tok
        added = tok.get_added_tokens_decoder()
        self.is_added = np.zeros(tok.get_vocab_size(with_added_tokens=True), dtype=bool)
        self.is_added[list(added)] = True
        pipeline = b"".join(part.__getstate__() for part in (tok.normalizer, tok.pre_tokenizer) if part is not None)
        self.anchored = not (b"Metaspace" in pipeline or b"Prepend" in pipeline
                             or any(t.single_word for t in added.values()))

    def label(self, items: list[tuple[str, list[tuple[int, int, str]]]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(ids, trained mask) of each (text, trained spans) of dataset.conversation_spans, as
        tokenize_conversation makes them: a span is (start, end, generation prompt)."""
        encodings = self.tok.encode_batch([text for text, _ in items], add_special_tokens=False)
        ids_of = [np.array(e.ids, dtype=np.int64) for e in encodings]
        # Pass 1: each boundary's anchor (tokens before it, where its tail starts) and tail text.
        cuts, tails = [], {}
        for (text, spans), enc, ids in zip(items, encodings, ids_of):
            anchors = np.flatnonzero(self.is_added[ids])[::-1] if self.anchored else ()
            row = []
            for start, end, prompt in spans:
                for bound, source in ((start, text), (start, prompt), (end, text)):
                    # The generation prompt agrees with the text up to start, so it shares the anchor
                    # of start (the reference bounds the answer's first token by its tokens too).
                    base, char = 0, 0
                    for k in anchors:
                        stop = enc.token_to_chars(int(k))[1]
                        if stop <= bound:
                            base, char = int(k) + 1, stop
                            break
                    tail = source[char:bound] if source is text else source[char:]
                    tails.setdefault(tail, None)
                    row.append((base, tail))
            cuts.append(row)
        # Pass 2: the tails of the whole chunk in one batch (most are the same few strings).
        pending = [t for t in tails if t]
        for tail, enc in zip(pending, self.tok.encode_batch(pending, add_special_tokens=False)):
            tails[tail] = np.array(enc.ids, dtype=np.int64)
        out = []
        for ids, row in zip(ids_of, cuts):
            trained = np.zeros(len(ids), dtype=bool)
            ends = [base + _shared_prefix(tails[tail], ids[base:]) if tail else base for base, tail in row]
            for start, prompt, last in zip(ends[0::3], ends[1::3], ends[2::3]):
                trained[min(start, prompt):last] = True
            out.append((ids, trained))
        return out


def _shared_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n
