"""Text generation with a KV cache: greedy, or sampling with temperature, top-k and top-p, and a
repetition penalty, computed as transformers' logits processors compute them.

Each step turns the last position's logits into the next token in transformers' order: the
repetition penalty (also when greedy), then, when sampling, temperature, top-k and top-p. The
processed scores are `process_logits`, which the tests compare with transformers'
`RepetitionPenaltyLogitsProcessor`, `TemperatureLogitsWarper`, `TopKLogitsWarper` and
`TopPLogitsWarper` on the same logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import CheckpointError, ConfigError

# transformers' sampling defaults for what a generation_config.json leaves unset.
HF_SAMPLING_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0}


def check_sampling(temperature: float, top_p: float, top_k: int, repetition_penalty: float) -> None:
    if not temperature >= 0:
        raise ConfigError(f"temperature={temperature}: expected >= 0 (0 is greedy decoding)")
    if not 0 < top_p <= 1:
        raise ConfigError(f"top_p={top_p}: expected a probability mass in (0, 1]")
    if top_k < 0:
        raise ConfigError(f"top_k={top_k}: expected >= 0 (0 keeps every token)")
    if not repetition_penalty > 0:
        raise ConfigError(f"repetition_penalty={repetition_penalty}: expected > 0 (1 is none)")


def process_logits(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 0.0, top_k: int = 0,
                   top_p: float = 1.0, repetition_penalty: float = 1.0) -> torch.Tensor:
    """The scores the next token is chosen from ([B, V] float32; filtered tokens at -inf).

    `ids` [B, T] are the tokens so far; a token among them has its logit divided by the penalty
    when positive, multiplied when negative (CTRL's rule, as transformers, over the whole row).
    temperature 0 (greedy) applies the penalty only: the argmax of the result is the token.
    """
    scores = logits.float()
    if repetition_penalty != 1.0:
        seen = scores.gather(1, ids)
        seen = torch.where(seen < 0, seen * repetition_penalty, seen / repetition_penalty)
        scores = scores.scatter(1, ids, seen)
    if temperature <= 0:
        return scores
    scores = scores / temperature
    if top_k > 0:
        kth = torch.topk(scores, min(top_k, scores.shape[-1])).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        # Drop the tokens whose ascending cumulative mass stays within 1 - top_p; the top token stays.
        sorted_scores, order = scores.sort(dim=-1)
        drop = sorted_scores.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
        drop[..., -1] = False
        scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return scores


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_token_id: int | list[int] | None = None,
    attention_mask: torch.Tensor | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    *,
    top_k: int = 0,
    repetition_penalty: float = 1.0,
    on_token=None,
) -> torch.Tensor:
    """Continue `input_ids` ([T] or [B, T]; left-pad batches and pass `attention_mask`).

    Returns the prompt followed by the new tokens. temperature=0 is greedy decoding; top_k=0 and
    top_p=1 keep every token; repetition_penalty=1 is none. A row that has produced an
    end-of-sequence token is filled with `pad_token_id` (default: the first eos id), as
    transformers does. `on_token(tokens)` is called with each step's new tokens ([B]) as they
    come (streaming); returning True stops the generation after them.
    """
    check_sampling(temperature, top_p, top_k, repetition_penalty)
    squeeze = input_ids.dim() == 1
    ids = input_ids[None] if squeeze else input_ids
    B, T = ids.shape
    eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(ids.device).long()
    if attention_mask is not None and attention_mask.dim() == 1:
        mask = mask[None]
    was_training = model.training
    model.eval()
    try:
        cache = model.new_cache()
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(ids, attention_mask=mask, position_ids=positions, cache=cache)[:, -1]
        out = [ids]
        done = torch.zeros(B, dtype=torch.bool, device=ids.device)
        next_pos = positions[:, -1:] + 1
        for step in range(max_new_tokens):
            so_far = torch.cat(out, dim=1) if repetition_penalty != 1.0 else ids
            scores = process_logits(logits, so_far, temperature, top_k, top_p, repetition_penalty)
            if temperature <= 0:
                token = scores.argmax(dim=-1)
            else:
                token = torch.multinomial(scores.softmax(dim=-1), 1, generator=generator).squeeze(-1)
            token = torch.where(done, torch.full_like(token, pad), token)
            out.append(token[:, None])
            if eos:
                done |= torch.isin(token, torch.tensor(eos, device=token.device))
            stop = bool(on_token(token)) if on_token is not None else False
            if stop or bool(done.all()) or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
            logits = model(token[:, None], attention_mask=mask, position_ids=next_pos, cache=cache)[:, -1]
            next_pos = next_pos + 1
    finally:
        model.train(was_training)
    result = torch.cat(out, dim=1)
    return result[0] if squeeze else result


def generation_defaults(folder) -> dict:
    """The sampling settings of a model folder's generation_config.json, as transformers reads them:
    {"temperature", "top_k", "top_p", "repetition_penalty", "eos_token_id", "max_new_tokens"}.

    do_sample false (or no file) is greedy: temperature 0. When sampling, a key the file leaves
    out takes transformers' default (temperature 1, top_k 50, top_p 1). eos_token_id is a list
    (None when the file names none), max_new_tokens None when unset.
    """
    path = Path(folder) / "generation_config.json"
    d = {}
    if path.is_file():
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise CheckpointError(f"{path}: expected a JSON object")
    out = {k: d.get(k) if d.get(k) is not None else v for k, v in HF_SAMPLING_DEFAULTS.items()}
    if not d.get("do_sample", False):
        out["temperature"] = 0.0
    eos = d.get("eos_token_id")
    out["eos_token_id"] = None if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    out["max_new_tokens"] = d.get("max_new_tokens")
    for key, kind in (("temperature", (int, float)), ("top_p", (int, float)), ("top_k", int),
                      ("repetition_penalty", (int, float))):
        if isinstance(out[key], bool) or not isinstance(out[key], kind):
            raise CheckpointError(f"{path}: key {key!r} should be a number, got {out[key]!r}")
    return out
