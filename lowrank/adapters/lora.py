"""LoRA: a low-rank update learned beside a frozen linear layer.

    y = x @ W.T + bias + scale * (dropout(x) @ A.T) @ B.T      A [r, in], B [out, r]
    scale = alpha / r, or alpha / sqrt(r) with rsLoRA

`apply_lora` replaces each targeted `nn.Linear` in place by a `LoraLinear` that holds the
original layer as `base_layer` and the factors as `lora_A` / `lora_B` (bias-free nn.Linear).
These are PEFT's names, so the model's state_dict keys are PEFT's in-memory keys without the
adapter name (`model.layers.0.self_attn.q_proj.lora_A.weight`) and a PEFT file key is
`base_model.model.` + that key (peft_format.py). B starts at zero, so the wrapped model
computes exactly what the base did until training moves B.

Adapter weights are kept in fp32 when the base is fp16 / bf16 (as PEFT's default
autocast_adapter_dtype) and cast to the activation dtype in the forward: the optimizer then
updates fp32 weights while the matmuls run in the model's dtype.

A quantised base (`models.quantized.QuantizedLinear`, QLoRA) is wrapped the same way: the
kernels take its `qweight` where they take a dense W. Merging folds the update into its
dequantised weight and puts a plain full-precision nn.Linear in its place.
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import ConfigError
from ..kernels import lora_linear, lora_linear_merged
from ..models.quantized import QuantizedLinear

# Every projection of attention and MLP: what SFT recipes for Qwen / DeepSeek set (LLaMA-Factory's
# `lora_target: all`, unsloth's list, most of the tutorials this project was checked against), as
# the QLoRA paper found LoRA on every linear layer needed to match full fine-tuning. The same
# default as TrainConfig and the CLI; ["q_proj", "v_proj"] is the original paper's lighter setting.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
INITS = ("kaiming", "gaussian")
LINEAR = (nn.Linear, QuantizedLinear)  # what LoRA wraps: a dense or a quantised frozen linear
BIASES = ("none", "all", "lora_only")


@dataclass
class LoraConfig:
    """What `apply_lora` adapts and how.

    target_modules: a list of module-name suffixes matched on dotted components (`"q_proj"`
        matches `model.layers.3.self_attn.q_proj`), a regex string matched in full against the
        module path (as PEFT), or `"all-linear"`: every nn.Linear in the decoder layers (never
        `lm_head`). Every name of a list must match some layer.
    layers: None (all), a layer index, or a list of them; restricts every target form. (PEFT
        ignores `layers_to_transform` for a regex; `save_adapter` then writes the matched
        module paths, so PEFT adapts the same layers.)
    modules_to_save: modules trained whole and saved with the adapter (e.g. `["lm_head"]`).
        With tied embeddings the listed module gets its own copy of the tied weight, as PEFT
        does, and the model becomes untied (`config.tie_word_embeddings = False`).
    bias: "none"; "all" trains (and saves) every bias of the model; "lora_only" the biases of
        the adapted layers.
    init: A is "kaiming"-uniform (a=sqrt(5), PEFT's default) or "gaussian" (std 1/r); B is 0.
    """

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: list[str] | tuple[str, ...] | str = DEFAULT_TARGETS
    use_rslora: bool = False
    init: str = "kaiming"
    layers: int | list[int] | None = None
    modules_to_save: list[str] | None = None
    bias: str = "none"

    def __post_init__(self):
        def bad(field, why):
            raise ConfigError(f"LoraConfig.{field} = {getattr(self, field)!r}: {why}")

        if not _is_int(self.r) or self.r <= 0:
            bad("r", "expected a positive integer rank")
        if not _is_number(self.alpha) or self.alpha <= 0:
            bad("alpha", "expected a positive number")
        if not _is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            bad("dropout", "expected a probability in [0, 1)")
        self.target_modules = t = module_names(self.target_modules)
        if isinstance(t, str):
            if not t:
                bad("target_modules", "expected a regex, 'all-linear' or a list of module names")
            if t != "all-linear":
                try:
                    re.compile(t)
                except re.error as e:
                    bad("target_modules", f"not a valid regex ({e})")
        elif not isinstance(t, (list, tuple)) or not t or not all(isinstance(n, str) and n for n in t):
            bad("target_modules", "expected a non-empty list of module names, a regex or 'all-linear'")
        if self.init not in INITS:
            bad("init", f"expected one of {', '.join(INITS)}")
        if self.bias not in BIASES:
            bad("bias", f"expected one of {', '.join(BIASES)}")
        layers = [self.layers] if _is_int(self.layers) else self.layers
        if layers is not None and (not isinstance(layers, (list, tuple)) or not layers
                                   or not all(_is_int(i) and i >= 0 for i in layers)):
            bad("layers", "expected None, a layer index or a non-empty list of layer indices (>= 0)")
        self.modules_to_save = m = module_names(self.modules_to_save)
        if m is not None and (not isinstance(m, (list, tuple)) or not all(isinstance(n, str) and n for n in m)):
            bad("modules_to_save", "expected None or a list of module names")
        if not isinstance(self.use_rslora, bool):
            bad("use_rslora", "expected True or False")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def layer_list(self) -> list[int] | None:
        return [self.layers] if _is_int(self.layers) else (list(self.layers) if self.layers is not None else None)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class LoraLinear(nn.Module):
    """`base_layer(x) + scale * (dropout(x) @ lora_A.weight.T) @ lora_B.weight.T`."""

    def __init__(self, base: nn.Linear | QuantizedLinear, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, init: str = "kaiming"):
        super().__init__()
        self.base_layer = base
        self.r, self.alpha, self.dropout_p = r, alpha, dropout
        self.scale = alpha / (math.sqrt(r) if use_rslora else r)
        w = base_weight(base)
        dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=w.device, dtype=dtype)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=w.device, dtype=dtype)
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(self.lora_A.weight, std=1.0 / r)
            else:
                nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def forward(self, x):
        a, b = self.lora_A.weight.to(x.dtype), self.lora_B.weight.to(x.dtype)
        return lora_linear(x, base_weight(self.base_layer), self.base_layer.bias, a, b, self.scale,
                           self.dropout_p, self.training)

    def merged_weight(self) -> torch.Tensor:
        """W + scale * B @ A, computed in fp32 (or wider) and returned in W's dtype (a
        quantised W: its dequantised weight, in the dtype it was quantised from)."""
        base = self.base_layer
        w = base.dequantize() if isinstance(base, QuantizedLinear) else base.weight
        acc = torch.promote_types(w.dtype, torch.float32)
        delta = self.lora_B.weight.to(acc) @ self.lora_A.weight.to(acc)
        return (w.to(acc) + self.scale * delta).to(w.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scale={self.scale:.4g}, dropout={self.dropout_p}"


def base_weight(layer):
    """The frozen weight `lora_linear` takes: a dense layer's tensor, a quantised one's qweight."""
    return layer.qweight if isinstance(layer, QuantizedLinear) else layer.weight


# ---- finding what to adapt ----------------------------------------------------------------

_LAYER_INDEX = re.compile(r".*?\.[^.]*\.(\d+)\.")  # PEFT's rule: the first `name.N.` in the path


def layer_index(path: str) -> int | None:
    m = _LAYER_INDEX.match(path)
    return int(m.group(1)) if m else None


_NAME_LIST = re.compile(r"[\w.]+(?:\s*,\s*[\w.]+)*")


def module_names(value):
    """A module-list setting in the forms every config takes (LoraConfig, FreezeConfig,
    TrainConfig, TOML, flags): a list of names, a comma string ("q_proj, v_proj"), or
    "all-linear". A comma string becomes the list; any other string is returned as it is
    (LoraConfig reads it as a regex over the module path, as PEFT does)."""
    if isinstance(value, str):
        text = value.strip()
        if text == "all-linear":
            return text
        if _NAME_LIST.fullmatch(text):
            return [n.strip() for n in text.split(",")]
    return value


def name_matches(path: str, name: str) -> bool:
    return path == name or path.endswith("." + name)


def lora_modules(model: nn.Module) -> list[tuple[str, LoraLinear]]:
    """The LoRA layers of a model, by module path."""
    return [(p, m) for p, m in model.named_modules() if isinstance(m, LoraLinear)]


def _plain_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """named_modules() without what lives inside a LoRA wrapper (its base layer and factors)."""
    out, seen = [], set()

    def walk(path, m):
        if id(m) in seen:
            return
        seen.add(id(m))
        out.append((path, m))
        if not isinstance(m, LoraLinear):
            for name, child in m.named_children():
                walk(f"{path}.{name}" if path else name, child)

    walk("", model)
    return out


def resolve_modules_to_save(model: nn.Module, names) -> list[str]:
    """Paths of the modules named in modules_to_save; every name must match one."""
    if not names:
        return []
    modules = [p for p, _ in _plain_modules(model) if p]
    paths = []
    for name in names:
        hits = [p for p in modules if name_matches(p, name)]
        if not hits:
            raise ConfigError(f"modules_to_save: {name!r} matches no module of the model")
        paths += [p for p in hits if p not in paths]
    # A module inside another listed one is saved with it.
    return [p for p in paths if not any(p.startswith(q + ".") for q in paths)]


def resolve_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Paths of the nn.Linear layers `config` adapts. Raises ConfigError, naming the target,
    when something does not fit; changes nothing."""
    modules = _plain_modules(model)
    wrapped = [p for p, m in modules if isinstance(m, LoraLinear)]
    if wrapped:
        raise ConfigError(
            f"the model already holds LoRA layers ({wrapped[0]}, ...): merge them first "
            "(merge_adapter) or load a fresh model; one LoRA adapter per model"
        )
    saved = resolve_modules_to_save(model, config.modules_to_save)
    layers = config.layer_list()
    present = {i for p, _ in modules if (i := layer_index(p + ".")) is not None}
    if layers is not None:
        missing = sorted(set(layers) - present)
        if missing:
            raise ConfigError(f"LoraConfig.layers: the model has no layer {missing[0]} "
                              f"(layers 0..{max(present, default=-1)})")

    t = config.target_modules
    hits = _matches(modules, t)
    # Modules trained whole carry no adapter inside them (as PEFT).
    hits = {p: n for p, n in hits.items() if not any(p == s or p.startswith(s + ".") for s in saved)}
    if layers is not None:
        hits = {p: n for p, n in hits.items() if layer_index(p) in layers}

    where = f" in layers {layers}" if layers is not None else ""
    unmatched = [n for n in t if n not in hits.values()] if isinstance(t, (list, tuple)) else []
    if unmatched or not hits:
        linear = sorted({p.rsplit(".", 1)[-1] for p, m in modules if isinstance(m, LINEAR)})
        raise ConfigError(f"target_modules: {unmatched[0] if unmatched else t!r} matches no module{where}; "
                          f"the model's linear layers are named {', '.join(linear)}")
    by_path = dict(modules)
    for p in hits:
        if not isinstance(by_path[p], LINEAR):
            raise ConfigError(f"target_modules {t!r} matches {p}, a {type(by_path[p]).__name__}: "
                              "LoRA adapts nn.Linear layers only")
    if "lm_head" in hits and _tied(model):
        raise ConfigError("target_modules includes lm_head, whose weight is tied to the input embeddings: "
                          "merging would change the embeddings too; adapt it on an untied model or use "
                          "modules_to_save=['lm_head']")
    return list(hits)


def _matches(modules, target) -> dict[str, str]:
    """module path -> the target name (or pattern) that selects it."""
    if target == "all-linear":
        return {p: target for p, m in modules if p.startswith("model.layers.") and isinstance(m, LINEAR)}
    if isinstance(target, str):
        return {p: target for p, _ in modules if p and re.fullmatch(target, p)}
    hits = {}
    for p, _ in modules:
        name = next((n for n in target if name_matches(p, n)), None)
        if p and name is not None:
            hits[p] = name
    return hits


def _tied(model) -> bool:
    head, embed = getattr(model, "lm_head", None), getattr(getattr(model, "model", None), "embed_tokens", None)
    return head is not None and embed is not None and head.weight is embed.weight


# ---- applying, merging ----------------------------------------------------------------------

def apply_lora(model: nn.Module, config: LoraConfig | None = None) -> nn.Module:
    """Wrap the targeted linear layers in place and freeze everything else; returns `model`.

    Trainable afterwards: every lora_A / lora_B, the modules in `modules_to_save`, and the
    biases `config.bias` names. Everything is checked before the model is touched.
    """
    config = config if config is not None else LoraConfig()
    targets = resolve_targets(model, config)
    saved = resolve_modules_to_save(model, config.modules_to_save)

    for p in model.parameters():
        p.requires_grad_(False)
    for path in targets:
        base = model.get_submodule(path)
        _set_module(model, path, LoraLinear(base, config.r, config.alpha, config.dropout,
                                            config.use_rslora, config.init))
    _untie_saved(model, saved)
    for path in saved:
        for p in model.get_submodule(path).parameters():
            p.requires_grad_(True)
    for name, p in lora_biases(model, config.bias):
        p.requires_grad_(True)
    for _, m in lora_modules(model):
        m.lora_A.weight.requires_grad_(True)
        m.lora_B.weight.requires_grad_(True)
    # The model's hooks for projections of one input (q/k/v, gate/up, a Gated DeltaNet layer's
    # in_proj_*): one wide GEMM on a GPU, one pass over x for their LoRA A products on a CPU.
    for m in model.modules():
        for hook in ("qkv_fn", "gate_up_fn", "in_proj_fn"):
            if hasattr(m, hook):
                setattr(m, hook, lora_group)
    model.lora_config = config
    return model


def lora_group(projections, x) -> list[torch.Tensor]:
    """Run projections of the same input (q/k/v, gate/up, in_proj_*) through one
    `lora_linear_merged` call when all are LoRA layers with one dropout and mode: on a GPU one
    wide GEMM instead of three narrow ones, on a CPU one GEMM for all the x @ A^T products.
    Anything else (a projection left plain, or merged back) runs as itself, so the hook stays
    correct whatever happens to the wrappers later."""
    if not all(isinstance(p, LoraLinear) for p in projections) or \
            len({(p.dropout_p, p.training) for p in projections}) != 1:
        return [p(x) for p in projections]
    first = projections[0]
    return lora_linear_merged(
        x, [base_weight(p.base_layer) for p in projections], [p.base_layer.bias for p in projections],
        [p.lora_A.weight.to(x.dtype) for p in projections], [p.lora_B.weight.to(x.dtype) for p in projections],
        [p.scale for p in projections], first.dropout_p, first.training,
    )


def lora_biases(model, bias: str) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of the biases that `bias` ("none" | "all" | "lora_only") trains."""
    if bias == "all":
        return [(n, p) for n, p in model.named_parameters() if n.endswith(".bias")]
    if bias == "lora_only":
        return [(f"{path}.base_layer.bias", m.base_layer.bias) for path, m in lora_modules(model)
                if m.base_layer.bias is not None]
    return []


def _set_module(model: nn.Module, path: str, module: nn.Module):
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def _untie_saved(model: nn.Module, saved: list[str]):
    """Give each module trained whole its own copy of any weight it shares with a module outside
    it (tied embeddings), as PEFT's ModulesToSaveWrapper does: training it leaves the rest as is."""
    if not saved:
        return
    owners: dict[int, list[str]] = {}
    for path, m in model.named_modules(remove_duplicate=False):
        for p in m.parameters(recurse=False):
            owners.setdefault(id(p), []).append(path)
    for s in saved:
        module = model.get_submodule(s)
        for path, m in module.named_modules(prefix=s):
            for name, p in list(m.named_parameters(recurse=False)):
                if any(o != s and not o.startswith(s + ".") for o in owners[id(p)]):
                    setattr(m, name, nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))
    cfg = getattr(model, "config", None)
    if getattr(cfg, "tie_word_embeddings", False) and not _tied(model):
        cfg.tie_word_embeddings = False  # saving must now write lm_head.weight


def merge_adapter(model: nn.Module) -> nn.Module:
    """Fold `scale * B @ A` into each base weight (computed in fp32, stored in the base dtype)
    and put the plain nn.Linear back in place; returns `model`, ready for `save_model`. A
    quantised base becomes a full-precision nn.Linear holding deq(W) + scale * B @ A.

    Modules trained whole (modules_to_save) and trained biases are already in place. A model
    without LoRA layers (e.g. merged already) is refused. To keep training afterwards, merge
    inside `with merged(model):` instead.
    """
    wrapped = lora_modules(model)
    if not wrapped:
        raise ConfigError("merge_adapter: the model holds no LoRA layers (merged already?)")
    with torch.no_grad():
        for path, m in wrapped:
            if isinstance(m.base_layer, QuantizedLinear):
                _set_module(model, path, m.base_layer.to_linear(m.merged_weight()))
                continue
            m.base_layer.weight.copy_(m.merged_weight())
            _set_module(model, path, m.base_layer)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


@contextmanager
def merged(model: nn.Module):
    """`with merged(model): ...` — inside, the LoRA layers are folded into plain nn.Linear
    (save_model, fast inference); on exit the wrappers come back with their base weights
    bit-identical to before, so training goes on. Costs one copy of the adapted weights."""
    wrapped = lora_modules(model)
    if not wrapped:
        raise ConfigError("merged: the model holds no LoRA layers")
    originals = []
    try:
        with torch.no_grad():
            for path, m in wrapped:
                if isinstance(m.base_layer, QuantizedLinear):  # left as it is: the merge is a new layer
                    originals.append(None)
                    _set_module(model, path, m.base_layer.to_linear(m.merged_weight()))
                    continue
                w = m.base_layer.weight
                originals.append(w.detach().clone())
                w.copy_(m.merged_weight())
                _set_module(model, path, m.base_layer)
        yield model
    finally:
        with torch.no_grad():
            for (path, m), w0 in zip(wrapped, originals):
                if w0 is not None:
                    m.base_layer.weight.copy_(w0)
                _set_module(model, path, m)


@contextmanager
def lora_disabled(model: nn.Module):
    """`with lora_disabled(model): ...` — inside, the model computes what its base computes:
    every LoRA layer is swapped for its own base layer (nothing is copied, no low-rank term is
    computed); on exit the wrappers come back. Modules trained whole (modules_to_save) and
    trained biases stay as they are: they have no untrained twin to fall back to."""
    wrapped = lora_modules(model)
    try:
        for path, m in wrapped:
            _set_module(model, path, m.base_layer)
        yield model
    finally:
        for path, m in wrapped:
            _set_module(model, path, m)
