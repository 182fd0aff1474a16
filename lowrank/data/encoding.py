"""`tokenizer(texts, padding=..., return_tensors="pt")`: what transformers' tokenizer call returns.

An `Encoding` is a dict {"input_ids", "attention_mask"} that also reads as attributes
(`enc.input_ids`) and moves to a device (`enc.to("cuda")`), the two ways transformers code uses
its BatchEncoding. Padding follows transformers: to the longest text or to max_length, with the
pad id on the tokenizer's padding side and attention_mask 0 there.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError

PADDING = {False: None, "do_not_pad": None, True: "longest", "longest": "longest", "max_length": "max_length"}


class Encoding(dict):
    """A tokenizer call's result: a dict whose keys also read as attributes."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device) -> "Encoding":
        return Encoding({k: v.to(device) if hasattr(v, "to") else v for k, v in self.items()})


def encode_batch(tokenizer, text, add_special_tokens: bool, padding, truncation: bool, max_length: int | None,
                 return_tensors: str | None, padding_side: str) -> Encoding:
    single = isinstance(text, str)
    texts = [text] if single else list(text)
    if not all(isinstance(t, str) for t in texts):
        raise ConfigError("a tokenizer call takes a string or a list of strings")
    if padding not in PADDING:
        raise ConfigError(f"padding={padding!r}: expected False, True, 'longest' or 'max_length'")
    if return_tensors not in (None, "pt"):
        raise ConfigError(f"return_tensors={return_tensors!r}: lowrank returns lists (None) or torch tensors ('pt')")
    if padding_side not in ("left", "right"):
        raise ConfigError(f"padding_side={padding_side!r}: expected 'left' or 'right'")
    mode = PADDING[padding]
    if (truncation or mode == "max_length") and max_length is None:
        raise ConfigError("truncation and padding='max_length' need max_length")
    rows = [tokenizer.encode(t, add_special_tokens) for t in texts]
    if truncation:
        rows = [r[:max_length] for r in rows]
    masks = [[1] * len(r) for r in rows]
    if mode is not None:
        width = max(len(r) for r in rows) if mode == "longest" else max_length
        pad = tokenizer.pad_token_id
        if pad is None:
            raise ConfigError(f"{tokenizer.path}: padding needs a pad token, and the tokenizer has none")
        fill = [max(0, width - len(r)) for r in rows]  # as transformers: a longer row stays longer
        if padding_side == "left":
            rows = [[pad] * n + r for n, r in zip(fill, rows)]
            masks = [[0] * n + m for n, m in zip(fill, masks)]
        else:
            rows = [r + [pad] * n for n, r in zip(fill, rows)]
            masks = [m + [0] * n for n, m in zip(fill, masks)]
    if return_tensors == "pt":
        if len({len(r) for r in rows}) > 1:
            raise ConfigError("return_tensors='pt' needs rows of one length: pass padding=True")
        return Encoding(input_ids=torch.tensor(rows, dtype=torch.long), attention_mask=torch.tensor(masks))
    if single:
        return Encoding(input_ids=rows[0], attention_mask=masks[0])
    return Encoding(input_ids=rows, attention_mask=masks)
