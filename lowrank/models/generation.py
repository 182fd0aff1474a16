"""Text generation with a KV cache: greedy, or temperature / nucleus sampling."""

from __future__ import annotations

import torch


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator) -> torch.Tensor:
    if temperature <= 0.0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest set of tokens whose mass reaches top_p (the top token always).
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


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
) -> torch.Tensor:
    """Continue `input_ids` ([T] or [B, T]; left-pad batches and pass `attention_mask`).

    Returns the prompt followed by the new tokens. temperature=0 is greedy decoding; a row
    that has produced an end-of-sequence token is filled with `pad_token_id` (default: the
    first eos id), as transformers does.
    """
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
            token = _sample(logits, temperature, top_p, generator)
            token = torch.where(done, torch.full_like(token, pad), token)
            out.append(token[:, None])
            if eos:
                done |= torch.isin(token, torch.tensor(eos, device=token.device))
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
            logits = model(token[:, None], attention_mask=mask, position_ids=next_pos, cache=cache)[:, -1]
            next_pos = next_pos + 1
    finally:
        model.train(was_training)
    result = torch.cat(out, dim=1)
    return result[0] if squeeze else result
