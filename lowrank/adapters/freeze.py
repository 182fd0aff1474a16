"""Freeze fine-tuning: train some decoder layers (and named modules) in place, freeze the rest.

No wrapper and no adapter file: the trained model is saved whole with `lowrank.save_model`.
Full fine-tuning is the same with nothing frozen (every parameter already trains).
`trainable_parameters` counts what an optimizer would see, for any adapter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from ..errors import ConfigError
from .lora import module_names, name_matches


@dataclass
class FreezeConfig:
    """Which parameters train.

    trainable_layers: N > 0 trains the last N decoder layers, N < 0 the first |N|, 0 none; a
        list trains exactly those layer indices (0-based, each 0 <= i < num_layers).
    trainable_modules: module names matched on dotted suffixes. A name found inside the decoder
        layers (`mlp`, `self_attn`, `q_proj`, `mlp.down_proj`) narrows the selected layers to
        those parts; a name outside them (`lm_head`, `embed_tokens`, `norm`) trains that module
        as well. None: whole layers.
    """

    trainable_layers: int | list[int] = 2
    trainable_modules: list[str] | None = None

    def __post_init__(self):
        n = self.trainable_layers
        ok = _is_int(n) or (isinstance(n, (list, tuple)) and all(_is_int(i) for i in n))
        if not ok:
            raise ConfigError(f"FreezeConfig.trainable_layers = {n!r}: expected a layer count or a list of indices")
        self.trainable_modules = m = module_names(self.trainable_modules)
        if m is not None and (not isinstance(m, (list, tuple)) or not all(isinstance(x, str) and x for x in m)):
            raise ConfigError(f"FreezeConfig.trainable_modules = {m!r}: expected None or a list of module names")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def selected_layers(config: FreezeConfig, num_layers: int) -> list[int]:
    n = config.trainable_layers
    if _is_int(n):
        if abs(n) > num_layers:
            raise ConfigError(f"FreezeConfig.trainable_layers = {n}: the model has {num_layers} layers")
        return list(range(num_layers - n, num_layers)) if n >= 0 else list(range(-n))
    bad = [i for i in n if not 0 <= i < num_layers]
    if bad:
        raise ConfigError(f"FreezeConfig.trainable_layers: no layer {bad[0]} "
                          f"(the model has layers 0..{num_layers - 1})")
    return sorted(set(n))


def apply_freeze(model: nn.Module, config: FreezeConfig | None = None) -> nn.Module:
    """Set requires_grad on the parameters `config` selects and clear it everywhere else;
    returns `model`. Checked before anything changes. With tied embeddings, training
    `lm_head` trains `embed_tokens` too: they are one tensor."""
    config = config if config is not None else FreezeConfig()
    layers = model.model.layers
    chosen = selected_layers(config, len(layers))
    names = list(config.trainable_modules or [])
    in_layers = {p for layer in layers for p, _ in layer.named_modules() if p}
    inner = [n for n in names if any(name_matches(p, n) for p in in_layers)]
    outer_paths = [p for p, _ in model.named_modules()
                   if p and p != "model.layers" and not p.startswith("model.layers.")
                   and any(name_matches(p, n) for n in names)]
    for n in names:
        if n not in inner and not any(name_matches(p, n) for p in outer_paths):
            raise ConfigError(f"FreezeConfig.trainable_modules: {n!r} matches no module of the model")
    if inner and not chosen:
        raise ConfigError(f"FreezeConfig.trainable_modules {inner} name parts of decoder layers, "
                          f"but trainable_layers = {config.trainable_layers!r} selects no layer")

    train = []
    for i in chosen:
        if inner:
            for p, m in layers[i].named_modules():
                if p and any(name_matches(p, n) for n in inner):
                    train += list(m.parameters())
        else:
            train += list(layers[i].parameters())
    for p in outer_paths:
        train += list(model.get_submodule(p).parameters())
    if not train:
        raise ConfigError(f"{config}: selects no parameter to train")
    for p in model.parameters():
        p.requires_grad_(False)
    for p in train:
        p.requires_grad_(True)
    return model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a tied weight counts once."""
    params = list(model.parameters())  # unique tensors: tied weights appear once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def trainable_summary(model: nn.Module) -> str:
    """PEFT's line: `trainable params: 1,081,344 || all params: 495,114,112 || trainable%: 0.2184`."""
    trainable, total = trainable_parameters(model)
    return (f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / max(total, 1):.4f}")
