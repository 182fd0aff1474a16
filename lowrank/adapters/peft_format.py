"""PEFT's adapter folder: what `save_adapter` writes and `load_adapter` reads.

A folder holds `adapter_config.json` and `adapter_model.safetensors`. For LoRA the tensor keys
are the model's own state_dict keys behind PEFT's wrapper prefix, because lowrank's LoRA
modules carry PEFT's names:

    model.layers.0.self_attn.q_proj.lora_A.weight   <->   base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight

Modules trained whole (`modules_to_save`) are written under their plain names
(`base_model.model.lm_head.weight`), and trained biases under theirs
(`...q_proj.base_layer.bias` for an adapted layer), as peft 0.21 writes them. The config
carries the keys every PEFT release since 0.6 reads, so older PEFT and vLLM load it too.
Prefix tuning is converted by `prefix.py`; this file only dispatches to it.

A model whose checkpoint names its modules otherwise (Qwen3.5's multimodal checkpoints keep the
text model under `model.language_model.`) says so with `model.checkpoint_key(name)`; the keys
written and read are then the checkpoint's names, which PEFT uses on the checkpoint's own class.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..models.checkpoint import read_header, read_tensor
from ..errors import CheckpointError, ConfigError
from ..files import read_json_object, write_atomic
from .lora import (LoraConfig, apply_lora, lora_biases, lora_modules, resolve_modules_to_save,
                   resolve_targets)
from .prefix import has_prefix, load_prefix_from_peft, prefix_to_peft

PREFIX = "base_model.model."


def _peft_key(model, name: str) -> str:
    """PEFT's key for a module or parameter name of the model."""
    return PREFIX + getattr(model, "checkpoint_key", lambda k: k)(name)
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"

# PEFT features that change the forward or what the weights mean: refused, never ignored.
_REFUSED = ("use_dora", "rank_pattern", "alpha_pattern", "layer_replication", "lora_bias", "exclude_modules",
            "target_parameters", "trainable_token_indices", "use_qalora", "alora_invocation_tokens",
            "megatron_config", "arrow_config", "use_bdlora")


def save_adapter(model, path, base_model_name_or_path: str | None = None) -> Path:
    """Write the model's adapter (LoRA or prefix) as a PEFT folder; returns the folder.

    Only adapter weights are written (plus modules_to_save and trained biases where the
    adapter asks for them), never the frozen base. Each file is written under a temporary
    name and renamed. Freeze and full fine-tunes have no adapter: save them with save_model.
    """
    folder = Path(path)
    has_lora, has_pfx = bool(lora_modules(model)), has_prefix(model)
    if has_lora and has_pfx:
        raise ConfigError("save_adapter: the model holds both LoRA layers and a prefix; a PEFT folder holds one")
    if has_lora:
        config, tensors = lora_to_peft(model)
    elif has_pfx:
        config, tensors = prefix_to_peft(model)
    else:
        raise ConfigError("save_adapter: the model holds no adapter (LoRA or prefix); a freeze or full "
                          "fine-tune is saved whole with lowrank.save_model(model, path)")
    if base_model_name_or_path is not None:
        config["base_model_name_or_path"] = str(base_model_name_or_path)
    if config.get("base_model_name_or_path") is None:  # where the model came from, if its config.json said
        hf = getattr(getattr(model, "config", None), "hf", None) or {}
        config["base_model_name_or_path"] = hf.get("_name_or_path") or None
    _warn_if_vllm_refuses(config, folder)
    _warn_if_gguf_rescales(config, folder)
    tensors = {k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}
    folder.mkdir(parents=True, exist_ok=True)
    # Weights first: a folder with a config is taken as complete.
    write_atomic(folder / WEIGHTS, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    write_atomic(folder / CONFIG, lambda p: p.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"))
    return folder


def load_adapter(model, path, trainable: bool = False):
    """Apply a PEFT adapter folder (written by save_adapter or PEFT's save_pretrained) to a
    plain loaded model, in place; returns `model`.

    Ready for inference by default, as `PeftModel.from_pretrained`: every module it adds takes
    the mode of the model it is given (a model in eval mode keeps dropout off), and the
    adapter's weights are frozen. `trainable=True` leaves them trainable, to continue training
    (what `--init-adapter` does).

    Everything is checked against the model before it is touched: on a CheckpointError
    (missing or corrupt files, a config or tensor that does not fit the model) the model is
    left as it was.
    """
    folder = Path(path)
    config = _read_config(folder)
    kind = config.get("peft_type")
    if kind not in ("LORA", "PREFIX_TUNING"):
        raise CheckpointError(f"{folder / CONFIG}: peft_type {kind!r}; lowrank loads LORA and PREFIX_TUNING adapters")
    tensors = _read_tensors(folder)
    before = {id(m) for m in model.modules()}
    if kind == "LORA":
        load_lora_from_peft(model, config, tensors, folder)
        adapter_params = [p for n, p in model.named_parameters() if PREFIX + n in tensors]
    else:
        adapter_params = list(load_prefix_from_peft(model, config, tensors, folder).parameters())
    # nn.Module starts in training mode: new modules would run dropout in an eval model.
    for m in model.modules():
        if id(m) not in before:
            m.train(model.training)
    for p in adapter_params:
        p.requires_grad_(trainable)
    return model


# ---- LoRA <-> PEFT ---------------------------------------------------------------------------

def lora_to_peft(model) -> tuple[dict, dict]:
    """(adapter_config, tensors) of the model's LoRA adapter, in PEFT's form."""
    wrapped = lora_modules(model)
    if not wrapped:
        raise ConfigError("the model holds no LoRA layers")
    first = wrapped[0][1]
    for path, m in wrapped:
        if (m.r, m.alpha, m.scale, m.dropout_p) != (first.r, first.alpha, first.scale, first.dropout_p):
            raise ConfigError(f"{path} has r={m.r}, alpha={m.alpha} but {wrapped[0][0]} r={first.r}, "
                              f"alpha={first.alpha}: one PEFT config holds one rank and scale")
    paths = [p for p, _ in wrapped]
    # Wrappers built by hand carry no config: their exact paths describe them.
    cfg = getattr(model, "lora_config", None) or LoraConfig(r=first.r, alpha=first.alpha, target_modules=paths)
    use_rslora = abs(first.scale - first.alpha / first.r) > 1e-12 * first.scale
    layers = cfg.layer_list()
    t = cfg.target_modules
    if t == "all-linear":
        targets = sorted({p.rsplit(".", 1)[-1] for p in paths})
    elif isinstance(t, str):  # PEFT ignores layers_to_transform for a regex; its paths may be named otherwise
        renamed = any(_peft_key(model, p) != PREFIX + p for p in paths)
        targets = t if layers is None and not renamed else [_peft_key(model, p)[len(PREFIX):] for p in paths]
    else:
        targets = list(t)
    config = {
        "alpha_pattern": {}, "auto_mapping": None, "bias": cfg.bias, "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True if cfg.init == "kaiming" else cfg.init,
        "layer_replication": None, "layers_pattern": None, "layers_to_transform": layers, "loftq_config": {},
        "lora_alpha": int(first.alpha) if float(first.alpha).is_integer() else first.alpha,
        "lora_dropout": first.dropout_p, "megatron_config": None, "megatron_core": "megatron.core",
        "modules_to_save": list(cfg.modules_to_save) if cfg.modules_to_save else None, "peft_type": "LORA",
        "r": first.r, "rank_pattern": {}, "revision": None, "target_modules": targets, "task_type": "CAUSAL_LM",
        "use_dora": False, "use_rslora": use_rslora,
    }
    tensors = {}
    for path, m in wrapped:
        tensors[_peft_key(model, f"{path}.lora_A.weight")] = m.lora_A.weight
        tensors[_peft_key(model, f"{path}.lora_B.weight")] = m.lora_B.weight
    for name, p in lora_biases(model, cfg.bias):
        tensors[_peft_key(model, name)] = p
    for s in resolve_modules_to_save(model, cfg.modules_to_save):
        for name, p in model.get_submodule(s).named_parameters():
            tensors[_peft_key(model, f"{s}.{name}")] = p
    return config, tensors


def load_lora_from_peft(model, adapter_config: dict, tensors: dict, folder: Path | None = None):
    """Wrap `model` as `adapter_config` says and load `tensors` (PEFT keys) into it."""
    folder = Path(folder) if folder is not None else Path(".")
    source, weights = folder / CONFIG, folder / WEIGHTS
    cfg = lora_config_from_peft(adapter_config, source, model)
    try:
        targets = resolve_targets(model, cfg)
        saved = resolve_modules_to_save(model, cfg.modules_to_save)
    except ConfigError as e:
        raise CheckpointError(f"{source}: {e}") from None
    expected = _expected_tensors(model, cfg, targets, saved)
    _check_layer_count(model, tensors, expected, weights)
    for key in tensors:
        if key not in expected:
            raise CheckpointError(f"{weights}: tensor {key!r} {_why_unexpected(model, key, cfg)}")
    missing = [k for k in expected if k not in tensors]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(f"{weights}: lacks {missing[0]!r}{more}, which {source.name} "
                              f"(target_modules={cfg.target_modules!r}, bias={cfg.bias!r}, "
                              f"modules_to_save={cfg.modules_to_save!r}) implies for this model")
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise CheckpointError(f"{weights}: tensor {key!r} has shape {list(tensors[key].shape)}, the model needs "
                                  f"{list(shape)}: the adapter was trained on another model (size or architecture)")
        if not tensors[key].is_floating_point():
            raise CheckpointError(f"{weights}: tensor {key!r} is {tensors[key].dtype}, expected floating point")

    apply_lora(model, cfg)
    params = {_peft_key(model, n): p for n, p in model.named_parameters(remove_duplicate=False)}
    with torch.no_grad():
        for key, t in tensors.items():
            params[key].copy_(t)
    return model


def lora_config_from_peft(d: dict, source: Path, model=None) -> LoraConfig:
    """A LoraConfig from PEFT's adapter_config.json, refusing what lowrank would compute differently."""
    def fail(key, why):
        raise CheckpointError(f"{source}: key {key!r} {why}")

    for key in _REFUSED:
        if d.get(key):
            fail(key, f"is {d[key]!r}: this PEFT feature is not supported by lowrank")
    if d.get("task_type") not in (None, "CAUSAL_LM"):
        fail("task_type", f"is {d['task_type']!r}; lowrank adapts causal language models (CAUSAL_LM)")
    if d.get("layers_pattern") not in (None, "", [], "layers", ["layers"]):
        fail("layers_pattern", f"is {d['layers_pattern']!r}; lowrank's decoder layers are `model.layers`")
    init = d.get("init_lora_weights", True)
    if not (isinstance(init, bool) or init == "gaussian"):
        fail("init_lora_weights", f"is {init!r}: such an adapter belongs to a modified base model "
                                  "(convert it with PEFT's path_initial_model_for_weight_conversion)")
    saved = d.get("modules_to_save")
    if d.get("ensure_weight_tying") and saved and model is not None and getattr(
            getattr(model, "config", None), "tie_word_embeddings", False):
        fail("ensure_weight_tying", "is true: lowrank trains a tied module in modules_to_save as an untied copy")
    for key in ("r", "target_modules"):
        if d.get(key) is None:
            fail(key, "is missing")
    target = d["target_modules"]
    layers = d.get("layers_to_transform")
    if isinstance(target, str) and target != "all-linear":
        layers = None  # PEFT matches a regex alone
    try:
        return LoraConfig(
            r=d["r"], alpha=d.get("lora_alpha", 8), dropout=d.get("lora_dropout", 0.0) or 0.0,
            target_modules=target, use_rslora=bool(d.get("use_rslora", False)),
            init="gaussian" if init == "gaussian" else "kaiming", layers=None if layers in (None, []) else layers,
            modules_to_save=saved or None, bias=d.get("bias", "none"),
        )
    except ConfigError as e:
        raise CheckpointError(f"{source}: {e}") from None


def _expected_tensors(model, cfg: LoraConfig, targets: list[str], saved: list[str]) -> dict[str, tuple]:
    """PEFT key -> shape of every tensor an adapter with `cfg` holds for this model."""
    expected, targets = {}, set(targets)
    for path in targets:
        lin = model.get_submodule(path)
        expected[_peft_key(model, f"{path}.lora_A.weight")] = (cfg.r, lin.in_features)
        expected[_peft_key(model, f"{path}.lora_B.weight")] = (lin.out_features, cfg.r)
    if cfg.bias != "none":
        for path, m in model.named_modules():
            b = m._parameters.get("bias")
            if b is None or (cfg.bias == "lora_only" and path not in targets):
                continue
            name = f"{path}.base_layer.bias" if path in targets else f"{path}.bias"
            expected[_peft_key(model, name)] = tuple(b.shape)
    for s in saved:
        for name, p in model.get_submodule(s).named_parameters():
            expected[_peft_key(model, f"{s}.{name}")] = tuple(p.shape)
    return expected


_LAYER = re.compile(rf"{re.escape(PREFIX)}model\.layers\.(\d+)\.")


def _check_layer_count(model, tensors: dict, expected: dict, weights: Path) -> None:
    """An adapter of a model with more or fewer layers (a 28-layer adapter on a 24-layer model)
    fails here by its layer count, before a key-by-key complaint that would not say so."""
    def layers(keys):
        return {int(m.group(1)) for m in map(_LAYER.match, keys) if m}

    have, want = layers(tensors), layers(expected)
    # Only an adapter over a whole run of layers 0..k-1 is a model's: a stray key is reported by name below.
    if have and want and have != want and have == set(range(len(have))) and want == set(range(len(want))):
        n = model.config.num_hidden_layers
        raise CheckpointError(f"{weights}: holds LoRA weights for {len(have)} decoder layers (0..{max(have)}), "
                              f"this model has {n} and its config implies them in {len(want)}: the adapter was "
                              "trained on another model (another layer count)")


def _why_unexpected(model, key: str, cfg: LoraConfig) -> str:
    if not key.startswith(PREFIX):
        return f"is not a PEFT LoRA key (expected {PREFIX}<module path>.lora_A.weight, ...)"
    name = key[len(PREFIX):]
    for part in (".lora_A.", ".lora_B."):
        if part in name:
            path = name.split(part)[0]
            modules = dict(model.named_modules())
            if path not in modules:
                return f"belongs to {path}, which this model does not have: the adapter was made for another model"
            return f"adapts {path}, which target_modules={cfg.target_modules!r} does not select in this model"
    return (f"is not a LoRA factor and not expected with bias={cfg.bias!r}, "
            f"modules_to_save={cfg.modules_to_save!r}")


# ---- files ------------------------------------------------------------------------------------

def _read_config(folder: Path) -> dict:
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such adapter folder")
    path = folder / CONFIG
    if not path.is_file():
        model_folder = (folder / "config.json").is_file()
        hint = " (this looks like a full model: load it with lowrank.load_model)" if model_folder else ""
        raise CheckpointError(f"{folder}: no {CONFIG}{hint}")
    return read_json_object(path)


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    path = folder / WEIGHTS
    if not path.is_file():
        pickles = [p.name for p in folder.glob("*.bin")]
        hint = (f" (found {', '.join(pickles)}: lowrank never loads pickle files; re-save with safetensors)"
                if pickles else "")
        raise CheckpointError(f"{folder}: no {WEIGHTS}{hint}")
    header, start = read_header(path)
    with open(path, "rb") as f:
        return {k: read_tensor(f, start, *info) for k, info in header.items()}


def _warn_if_vllm_refuses(config: dict, folder: Path):
    """What vLLM (0.33) refuses of a PEFT folder, said when it is written rather than when served."""
    why = []
    if config.get("peft_type") != "LORA":
        why.append(f"vLLM serves LoRA adapters only, not {config.get('peft_type')}")
    if config.get("modules_to_save"):
        why.append(f"vLLM refuses modules_to_save ({config['modules_to_save']}): 'vLLM only supports "
                   "modules_to_save being either None or [\"classifier\", \"score\"] for classification models'")
    if config.get("bias", "none") != "none":
        why.append(f"bias={config['bias']!r}: most vLLM releases refuse LoRA adapters that carry biases")
    if why:
        fix = ("to serve it with vLLM, merge it into a whole model folder (python -m lowrank.export, or "
               "lowrank.export_model)") if config.get("peft_type") == "LORA" else "serve it with PEFT or lowrank"
        warnings.warn(f"save_adapter: {folder} cannot be served by vLLM as an adapter ({'; '.join(why)}). "
                      f"PEFT and lowrank load it; {fix}", UserWarning, stacklevel=3)


def _warn_if_gguf_rescales(config: dict, folder: Path):
    """llama.cpp's convert_lora_to_gguf.py keeps lora_alpha and its runtime scales by alpha / r:
    an rsLoRA adapter (alpha / sqrt(r)) would run with its update shrunk by sqrt(r). Merged first,
    the weights are exact whatever the scale."""
    if config.get("peft_type") == "LORA" and config.get("use_rslora"):
        r = config["r"]
        warnings.warn(f"save_adapter: {folder} is an rsLoRA adapter (scale alpha/sqrt(r)); llama.cpp's GGUF LoRA "
                      f"converter scales by alpha/r, which would shrink its update {r ** 0.5:.3g}x. For llama.cpp, "
                      "merge it (python -m lowrank.export) and convert the merged folder", UserWarning, stacklevel=3)
