"""Prefix tuning / P-tuning v2: trainable key and value prefixes for every attention layer.

Every layer attends, before the real tokens, to P virtual tokens whose keys and values are
learned directly (nothing passes through the frozen q/k/v projections). The parameters live
in one module, `model.prefix_encoder`, holding PEFT's flat table `[P, L * 2 * kv_dim]`
(kv_dim = n_kv_heads * head_dim) laid out as `[P, layer, key|value, kv head, head_dim]`,
so saving is one tensor named `prompt_embeddings`, exactly as PEFT's PREFIX_TUNING writes it.

With `projection=True` the table is produced, as in PEFT's PrefixEncoder with
prefix_projection, by `Embedding(P, kv_dim) -> Linear(kv_dim, hidden) -> Tanh ->
Linear(hidden, L * 2 * kv_dim)`: the reparameterisation P-tuning v2 uses to stabilise
training. The table is computed once per forward, in a forward pre-hook of the decoder
(outside any checkpointed layer, so gradient checkpointing recomputes nothing of it), and
every layer reads its slice. `fold_prefix` replaces the MLP by its output for inference;
saving always writes that output.

The decoder's hook (`Attention.kv_prefix`) takes care of the rest: the prefix is always
visible, carries no rotation, and shifts default positions by P, as PEFT's pre-filled cache.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import CheckpointError, ConfigError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
TENSOR = "prompt_embeddings"


@dataclass
class PrefixConfig:
    num_virtual_tokens: int = 20
    projection: bool = False  # train through PEFT's two-layer MLP (prefix_projection)
    projection_hidden: int | None = None  # the MLP's width; default kv_dim, PEFT's encoder_hidden_size default

    def __post_init__(self):
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens < 1:
            raise ConfigError(
                f"PrefixConfig.num_virtual_tokens must be a positive int, got {self.num_virtual_tokens!r}"
            )
        hidden = self.projection_hidden
        if hidden is not None and (not isinstance(hidden, int) or hidden < 1):
            raise ConfigError(f"PrefixConfig.projection_hidden must be a positive int or None, got {hidden!r}")


class PrefixEncoder(nn.Module):
    """The key / value prefixes of every layer; parameter names follow PEFT's PrefixEncoder
    (`embedding.weight`, `transform.0.*`, `transform.2.*`)."""

    def __init__(self, num_tokens: int, num_layers: int, num_kv_heads: int, head_dim: int,
                 projection_hidden: int | None = None):
        super().__init__()
        self.num_tokens, self.num_layers = num_tokens, num_layers
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        kv_dim = num_kv_heads * head_dim
        width = num_layers * 2 * kv_dim
        if projection_hidden is None:
            self.embedding = nn.Embedding(num_tokens, width)
            self.transform = None
        else:
            self.embedding = nn.Embedding(num_tokens, kv_dim)
            self.transform = nn.Sequential(
                nn.Linear(kv_dim, projection_hidden), nn.Tanh(), nn.Linear(projection_hidden, width)
            )
        self._kv = None  # this forward's key_values(), set by the decoder's pre-hook

    def table(self) -> torch.Tensor:
        """The flat prefixes [P, L * 2 * kv_dim]: what PEFT saves as prompt_embeddings."""
        w = self.embedding.weight
        return w if self.transform is None else self.transform(w)

    def key_values(self) -> torch.Tensor:
        """[L, 2, n_kv, P, head_dim]: layer, key|value, then the attention layout."""
        P, L, H, D = self.num_tokens, self.num_layers, self.num_kv_heads, self.head_dim
        return self.table().view(P, L, 2, H, D).permute(1, 2, 3, 0, 4)

    def _before_decoder(self, decoder, args):
        # A fresh table per forward: it follows the current parameters and grad mode, and
        # the MLP runs once for all layers instead of once per layer.
        self._kv = self.key_values()

    def current(self) -> torch.Tensor:
        # A layer called outside the decoder's forward has no table of this call: compute one.
        return self._kv if self._kv is not None else self.key_values()


class LayerPrefix:
    """`Attention.kv_prefix` of one layer. Deliberately not an nn.Module, so the parameters
    are registered once, on `model.prefix_encoder`, and optimizers see each of them once."""

    def __init__(self, encoder: PrefixEncoder, layer: int):
        self.encoder, self.layer = encoder, layer

    @property
    def num_tokens(self) -> int:
        return self.encoder.num_tokens

    def __call__(self, batch_size: int):
        k, v = self.encoder.current()[self.layer]
        shape = (batch_size, -1, -1, -1)
        return k.unsqueeze(0).expand(shape), v.unsqueeze(0).expand(shape)


def has_prefix(model) -> bool:
    return isinstance(getattr(model, "prefix_encoder", None), PrefixEncoder)


def _new_encoder(model, num_tokens: int, projection_hidden: int | None = None) -> PrefixEncoder:
    cfg, ref = model.config, model.model.embed_tokens.weight
    if any(not hasattr(layer, "self_attn") for layer in model.model.layers):
        raise ConfigError(
            f"prefix tuning: {cfg.model_type} has linear-attention (Gated DeltaNet) layers, which keep a recurrent "
            "state rather than keys and values; PEFT 0.21 cannot prefix-tune these models either (its prefix cache "
            "gives every layer keys and values, which transformers' linear layers refuse), so no PEFT or vLLM user "
            "could load such an adapter: use LoRA")
    encoder = PrefixEncoder(num_tokens, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim,
                            projection_hidden)
    # Prefixes train in fp32 even on a bf16 model (the decoder casts them per layer).
    return encoder.to(device=ref.device, dtype=torch.promote_types(ref.dtype, torch.float32))


def _attach(model, encoder: PrefixEncoder) -> PrefixEncoder:
    """Register `encoder` on the model, freeze the base, and point every layer at it."""
    encoder._frozen = [p for p in model.parameters() if p.requires_grad]
    for p in encoder._frozen:
        p.requires_grad_(False)
    model.prefix_encoder = encoder
    model.model.register_forward_pre_hook(encoder._before_decoder)
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.kv_prefix = LayerPrefix(encoder, i)
    return encoder


def apply_prefix(model, config: PrefixConfig) -> PrefixEncoder:
    """Give every attention layer trainable key / value prefixes and freeze every parameter
    the model had. Returns `model.prefix_encoder`, whose parameters are the trainable ones."""
    if has_prefix(model):
        raise ConfigError("the model already has a prefix: call remove_prefix(model) before applying another")
    cfg = model.config
    if not hasattr(cfg, "num_key_value_heads"):
        # MLA (DeepSeek-V2 / V3) caches a compressed latent, not per-head keys and values.
        raise ConfigError(f"prefix tuning needs per-head keys and values; {cfg.model_type} uses multi-head "
                          "latent attention: use LoRA instead")
    hidden = None
    if config.projection:
        hidden = config.projection_hidden or cfg.num_key_value_heads * cfg.head_dim
    return _attach(model, _new_encoder(model, config.num_virtual_tokens, hidden))


def remove_prefix(model) -> None:
    """Undo apply_prefix: drop the prefixes and unfreeze what apply_prefix froze."""
    if not has_prefix(model):
        raise ConfigError("the model has no prefix to remove")
    encoder = model.prefix_encoder
    # Found by owner rather than by a stored handle: a deep-copied model's handle would
    # point at the original's hook table.
    hooks = model.model._forward_pre_hooks
    for key, fn in list(hooks.items()):
        if getattr(fn, "__self__", None) is encoder:
            del hooks[key]
    for layer in model.model.layers:
        layer.self_attn.kv_prefix = None
    for p in encoder._frozen:
        p.requires_grad_(True)
    del model.prefix_encoder


@contextmanager
def prefix_disabled(model):
    """`with prefix_disabled(model): ...` — inside, no layer sees the prefix (and positions are
    not shifted by it): the model computes what its base computes. Nothing is copied."""
    if not has_prefix(model):
        raise ConfigError("the model has no prefix to disable")
    hooks = [layer.self_attn.kv_prefix for layer in model.model.layers]
    try:
        for layer in model.model.layers:
            layer.self_attn.kv_prefix = None
        yield model
    finally:
        for layer, hook in zip(model.model.layers, hooks):
            layer.self_attn.kv_prefix = hook


@torch.no_grad()
def fold_prefix(model) -> None:
    """Replace the reparameterisation MLP by the prefixes it produces (a no-op without one).
    The outputs are unchanged; an optimizer built before folding no longer sees the
    parameters, so fold when training is over."""
    if not has_prefix(model):
        raise ConfigError("the model has no prefix to fold")
    encoder = model.prefix_encoder
    if encoder.transform is None:
        return
    table = encoder.table()
    del encoder.transform
    encoder.transform = None
    encoder.embedding = nn.Embedding(*table.shape, device=table.device, dtype=table.dtype)
    encoder.embedding.weight.copy_(table)
    encoder._kv = None


def prefix_to_peft(model) -> tuple[dict, dict]:
    """(adapter_config, tensors) in PEFT's PREFIX_TUNING format; the model is left as it is.

    The tensor holds the folded prefixes, so the config says prefix_projection: false. (PEFT
    0.21 would load either value identically: it loads prompt-learning adapters only for
    inference, where the encoder is the plain table; false keeps the config truthful.)"""
    if not has_prefix(model):
        raise ConfigError("the model has no prefix to save")
    encoder, cfg = model.prefix_encoder, model.config
    kv_dim = cfg.num_key_value_heads * cfg.head_dim
    with torch.no_grad():
        table = encoder.table().detach().to("cpu", copy=True).contiguous()
    adapter_config = {
        "peft_type": "PREFIX_TUNING",
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": encoder.num_tokens,
        "token_dim": kv_dim,
        "num_transformer_submodules": 1,
        # PEFT names the kv-head count so for GQA models (its _prepare_prompt_learning_config).
        "num_attention_heads": cfg.num_key_value_heads,
        "num_layers": cfg.num_hidden_layers,
        "encoder_hidden_size": kv_dim,
        "prefix_projection": False,
        "inference_mode": True,
        "base_model_name_or_path": cfg.hf.get("_name_or_path") or None,
        "revision": None,
        "modules_to_save": None,
        "auto_mapping": None,
    }
    return adapter_config, {TENSOR: table}


def _check_config(model, adapter_config: dict, source) -> int:
    """Check a PEFT PREFIX_TUNING config against the model; returns num_virtual_tokens."""
    cfg = model.config
    if not isinstance(adapter_config, dict):
        raise CheckpointError(f"{source}: expected a JSON object, got {type(adapter_config).__name__}")
    kv_dim = cfg.num_key_value_heads * cfg.head_dim
    expected = {  # key -> (what the model needs, what that is)
        "peft_type": ("PREFIX_TUNING", "expected 'PREFIX_TUNING'"),
        "num_layers": (cfg.num_hidden_layers, f"the model has {cfg.num_hidden_layers} layers"),
        "num_attention_heads": (cfg.num_key_value_heads, f"the model has {cfg.num_key_value_heads} key/value "
                                                         "heads (PEFT stores the kv-head count here)"),
        "token_dim": (kv_dim, f"the model's key/value width (kv heads x head_dim) is {kv_dim}"),
    }
    for key, (want, what) in expected.items():
        if key not in adapter_config:
            raise CheckpointError(f"{source}: key {key!r} is missing ({what})")
        if adapter_config[key] != want:
            raise CheckpointError(f"{source}: key {key!r} is {adapter_config[key]!r}, {what}")
    if adapter_config.get("task_type") not in (None, "CAUSAL_LM"):
        raise CheckpointError(f"{source}: key 'task_type' is {adapter_config['task_type']!r}, expected 'CAUSAL_LM'")
    if adapter_config.get("num_transformer_submodules", 1) != 1:
        raise CheckpointError(
            f"{source}: key 'num_transformer_submodules' is {adapter_config['num_transformer_submodules']!r}, "
            "expected 1 (a decoder-only model)"
        )
    P = adapter_config.get("num_virtual_tokens")
    if not isinstance(P, int) or isinstance(P, bool) or P < 1:
        raise CheckpointError(f"{source}: key 'num_virtual_tokens' is {P!r}, expected a positive int")
    return P


def load_prefix_from_peft(model, adapter_config: dict, tensors: dict, folder=None) -> PrefixEncoder:
    """Give the model the plain prefixes of a PEFT PREFIX_TUNING adapter (one trained with
    prefix_projection loads the same way: PEFT saves the MLP's output). Replaces any prefix
    the model had. Raises CheckpointError naming the file (inside `folder`, when given) and
    the key on a mismatch, before touching the model."""
    where = Path(folder) if folder is not None else Path()
    P = _check_config(model, adapter_config, where / CONFIG_FILE)
    weights = where / WEIGHTS_FILE
    extra = sorted(set(tensors) - {TENSOR})
    if extra:
        raise CheckpointError(f"{weights}: unexpected tensor {extra[0]!r} (a prefix adapter holds only {TENSOR!r})")
    if TENSOR not in tensors:
        raise CheckpointError(f"{weights}: tensor {TENSOR!r} is missing")
    cfg = model.config
    table = tensors[TENSOR]
    want = (P, cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim)
    if tuple(table.shape) != want:
        raise CheckpointError(
            f"{weights}: tensor {TENSOR!r} has shape {list(table.shape)}, expected {list(want)} "
            f"(num_virtual_tokens x num_layers * 2 * token_dim)"
        )
    if not table.is_floating_point():
        raise CheckpointError(f"{weights}: tensor {TENSOR!r} has dtype {table.dtype}, expected a float type")
    if has_prefix(model):
        remove_prefix(model)
    encoder = _new_encoder(model, P)
    with torch.no_grad():
        encoder.embedding.weight.copy_(table)
    return _attach(model, encoder)
