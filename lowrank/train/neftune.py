"""NEFTune (Jain et al., 2023): uniform noise on the input embeddings while training.

    embeds += U(-mag, mag),   mag = alpha / sqrt(L * d)

with L the sequence length of the batch as the embedding layer sees it (the padded length, or
the packed row length: transformers' `neftune_post_forward_hook` takes `output.size(1)`, and so
does this) and d the hidden size. The noise is drawn only while the embedding module is in
training mode, so evaluation and generation see the plain embeddings; `finetune` also removes
the hook when the run ends. The magnitude is computed in float32 through torch, as transformers
does, and the noise drawn by the same call from torch's global generator, so for the same seed
the two add the same noise bit for bit (the loop reseeds that generator every step).
"""

from __future__ import annotations

import torch

_HANDLE = "_lowrank_neftune"


def neftune_hook(module, inputs, output):
    if not module.training:
        return output
    dims = torch.tensor(output.size(1) * output.size(2))
    mag = module.neftune_noise_alpha / torch.sqrt(dims)
    return output + torch.zeros_like(output).uniform_(-mag, mag)


def add_neftune(model, alpha: float) -> None:
    """Register the noise on `model.model.embed_tokens` (replacing an earlier one)."""
    remove_neftune(model)
    embed = model.model.embed_tokens
    embed.neftune_noise_alpha = float(alpha)
    setattr(embed, _HANDLE, embed.register_forward_hook(neftune_hook))


def remove_neftune(model) -> None:
    embed = model.model.embed_tokens
    handle = getattr(embed, _HANDLE, None)
    if handle is not None:
        handle.remove()
        delattr(embed, _HANDLE)
