"""Frozen quantised linear layers (the base of QLoRA), and quantising a checkpoint while it is read.

`QuantizedLinear` stands where the checkpoint has an `nn.Linear` and keeps its path, so
`model.layers.3.self_attn.q_proj` is that module whether quantised or not: LoRA targets, PEFT
keys and everything else are unchanged. It holds the weight as `kernels.nf4.NF4Weight` or
`kernels.int8.Int8Weight` (`.qweight`) and an ordinary bias; its forward is
`kernels.frozen_linear.frozen_linear` (x @ deq(W).T + bias, the dequantised weight made for
the matmul and dropped, made again in the backward; in fp32 on a CPU without bf16 units). `.dequantize()` gives the weight in full
precision (merging, tests). Its state_dict is exactly what transformers + bitsandbytes save for
a `Linear4bit` / `Linear8bitLt` (`weight`, `weight.absmax`, ..., or `weight`, `SCB`, `weight_format`).

What is quantised on load (`quantize="nf4" | "int8"`): every `nn.Linear` of the decoder layers,
attention, dense MLP and each expert's MLP (experts are one `nn.Linear` each, see moe.py), but
not the MoE routers (`mlp.gate`, not an nn.Linear), Qwen2-MoE's one-output `shared_expert_gate`,
the embeddings, the LM head or the norms, as bitsandbytes users skip them.

`Quantizer` is what `checkpoint.load_model` hands each tensor to while it reads the files: a
full-precision projection weight is quantised the moment it is read (so the full-precision
model is never in memory at once), and the pieces of an already quantised weight (a `*-bnb-4bit`
folder) are gathered until the module is complete.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import CheckpointError
from ..kernels import int8, nf4
from ..kernels.frozen_linear import dequantize, frozen_linear, intended_dtype

FORMATS = ("nf4", "int8")
# The keys transformers + bitsandbytes write beside a quantised `<module>.weight`.
_NF4_KEYS = ("weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
             "weight.quant_state.bitsandbytes__nf4", "weight.quant_state.bitsandbytes__fp4")
_INT8_KEYS = ("SCB", "weight_format")
NOT_QUANTIZED = ("shared_expert_gate",)  # a router-like gate: one output row, no memory to save


class QuantizedLinear(nn.Module):
    """y = x @ deq(W).T + bias with W stored in NF4 or int8; frozen (no weight gradient)."""

    def __init__(self, qweight, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = (int(d) for d in qweight.shape)
        self.format = "nf4" if isinstance(qweight, nf4.NF4Weight) else "int8"
        self.dtype = qweight.dtype
        # The quantised tensors are buffers (they move with .to(device)); the state dict writes
        # them under bitsandbytes' names instead (_save_to_state_dict).
        if self.format == "nf4":
            self.blocksize, self.nested_offset = qweight.blocksize, qweight.nested_offset
            self.register_buffer("packed", qweight.packed, persistent=False)
            self.register_buffer("absmax", qweight.absmax, persistent=False)
            self.register_buffer("nested_absmax", qweight.nested_absmax, persistent=False)
        else:
            self.register_buffer("codes", qweight.weight, persistent=False)
            self.register_buffer("scb", qweight.scb, persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @property
    def qweight(self):
        """The weight as the kernels take it (`lora_linear` accepts it in place of a dense W)."""
        if self.format == "nf4":
            return nf4.NF4Weight(self.packed, self.absmax, torch.Size((self.out_features, self.in_features)),
                                 self.dtype, self.blocksize, self.nested_absmax, self.nested_offset)
        return int8.Int8Weight(self.codes, self.scb, self.dtype)

    def forward(self, x):
        return frozen_linear(x, self.qweight, self.bias).to(intended_dtype(x))

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The [out, in] weight in full precision (default: the dtype it was quantised from)."""
        return dequantize(self.qweight, dtype or self.dtype)

    def to_linear(self, weight: torch.Tensor | None = None) -> nn.Linear:
        """A plain nn.Linear with `weight` (default: the dequantised one) and this bias."""
        w = self.dequantize() if weight is None else weight
        with torch.device("meta"):
            lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        lin.weight = nn.Parameter(w, requires_grad=False)
        if self.bias is not None:
            lin.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=False)
        return lin

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)  # the bias
        fmt = nf4 if self.format == "nf4" else int8
        destination.update(fmt.to_bnb_state_dict(self.qweight, prefix))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        mine = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix) and k[len(prefix):] != "bias"}
        if "weight" not in mine:
            if strict:
                missing_keys.append(prefix + "weight")
            return
        try:
            q = nf4.from_bnb_state_dict(mine) if self.format == "nf4" else int8.from_bnb_state_dict(mine, dtype=self.dtype)
        except (KeyError, ValueError) as e:
            error_msgs.append(f"{prefix}weight: {e}")
            return
        if tuple(q.shape) != (self.out_features, self.in_features):
            error_msgs.append(f"{prefix}weight: shape {list(q.shape)}, expected [{self.out_features}, {self.in_features}]")
            return
        if self.format == "nf4":
            if q.double_quant != (self.nested_absmax is not None) or q.blocksize != self.blocksize:
                error_msgs.append(f"{prefix}weight: blocksize {q.blocksize}, double quantised {q.double_quant}; "
                                  f"this layer has {self.blocksize}, {self.nested_absmax is not None}")
                return
            self.nested_offset = q.nested_offset
        for name, t in _buffers(q).items():
            getattr(self, name).copy_(t)
        if self.bias is not None and prefix + "bias" in state_dict:
            with torch.no_grad():
                self.bias.copy_(state_dict[prefix + "bias"])
        elif self.bias is not None and strict:
            missing_keys.append(prefix + "bias")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"bias={self.bias is not None}, format={self.format}"


def _buffers(q) -> dict:
    if isinstance(q, nf4.NF4Weight):
        return {"packed": q.packed, "absmax": q.absmax, **({"nested_absmax": q.nested_absmax} if q.double_quant else {})}
    return {"codes": q.weight, "scb": q.scb}


def quantize_weight(w: torch.Tensor, fmt: str):
    """A float weight as `fmt` ("nf4": 64-value blocks, double quantised, bitsandbytes' QLoRA
    defaults; "int8": per-row absmax)."""
    return nf4.quantize_nf4(w, 64, double_quant=True) if fmt == "nf4" else int8.quantize_int8(w)


def quantized_modules(model: nn.Module) -> list[tuple[str, QuantizedLinear]]:
    return [(p, m) for p, m in model.named_modules() if isinstance(m, QuantizedLinear)]


def quantizable(model: nn.Module) -> set[str]:
    """Paths of the linear layers `quantize=` quantises: those of the decoder layers, routers excepted."""
    return {p for p, m in model.named_modules() if isinstance(m, nn.Linear) and p.startswith("model.layers.")
            and p.rsplit(".", 1)[-1] not in NOT_QUANTIZED}


def quantize_model(model: nn.Module, fmt: str) -> nn.Module:
    """Put a QuantizedLinear holding its weight as `fmt` in place of every full-precision layer of
    `quantizable(model)` (those already quantised stay as they are); returns `model`."""
    with torch.no_grad():
        for path in sorted(quantizable(model)):
            lin = model.get_submodule(path)
            bias = None if lin.bias is None else lin.bias.detach()
            _set_module(model, path, QuantizedLinear(quantize_weight(lin.weight.detach(), fmt), bias))
    return model


def dequantize_model(model: nn.Module) -> nn.Module:
    """Put a plain full-precision nn.Linear, holding the dequantised weight, in place of every
    quantised layer; returns `model`."""
    for path, m in quantized_modules(model):
        _set_module(model, path, m.to_linear())
    return model


def _set_module(model: nn.Module, path: str, module: nn.Module):
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


class Quantizer:
    """Takes the tensors of quantised layers off `load_model`'s hands while it reads the files.

    quantize: None (load quantised what the checkpoint stores quantised, the rest as it is), or
    "nf4" / "int8" (also quantise every full-precision weight of `quantizable(model)` as read).
    """

    def __init__(self, model: nn.Module, quantize: str | None, device):
        if quantize not in (None, *FORMATS):
            raise CheckpointError(f"quantize={quantize!r}: expected None, 'nf4' or 'int8'")
        self.quantize, self.device = quantize, device
        self.linears = {p: m for p, m in model.named_modules() if isinstance(m, nn.Linear)}
        self.targets = quantizable(model) if quantize else set()
        self.parts: dict[str, dict[str, torch.Tensor]] = {}  # pre-quantised: module -> its bnb tensors
        self.files: dict[str, str] = {}
        self.quantized: dict[str, object] = {}  # module -> NF4Weight / Int8Weight, quantised on load

    def _module_of(self, key: str, t_dtype) -> str | None:
        """The linear whose quantised weight `key` is a piece of, or None."""
        for suffix in _NF4_KEYS + _INT8_KEYS:
            path = key[: -len(suffix) - 1]
            if key.endswith("." + suffix) and path in self.linears:
                return path
        path = key.removesuffix(".weight")
        if key.endswith(".weight") and path in self.linears and t_dtype in (torch.uint8, torch.int8):
            return path
        return None

    def take(self, file, key: str, t_dtype, read) -> bool:
        """Whether the tensor `key` (read by calling `read()`) belongs to a quantised layer; if
        so it is kept here, quantised first when it is a full-precision weight to quantise."""
        path = self._module_of(key, t_dtype)
        if path is not None:
            if key.endswith("quant_state.bitsandbytes__fp4"):
                raise CheckpointError(f"{file}: tensor {key!r} is an FP4 weight; lowrank loads bitsandbytes "
                                      "NF4 (bnb_4bit_quant_type='nf4') and 8-bit weights only")
            self.parts.setdefault(path, {})[key[len(path) + 1:]] = read().to(self.device)
            self.files[path] = str(file)
            return True
        path = key.removesuffix(".weight")
        if key.endswith(".weight") and path in self.targets:
            self.quantized[path] = quantize_weight(read().to(self.device), self.quantize)
            self.files[path] = str(file)
            return True
        return False

    def finish(self, model: nn.Module, state: dict, dtype: torch.dtype | None) -> set[str]:
        """Put a QuantizedLinear at every path seen quantised (its bias taken from `state`);
        returns the keys now satisfied (`<path>.weight`, `<path>.bias`). dtype: the model's float dtype, which
        dequantisation returns by default."""
        built = dict(self.quantized)
        for path, parts in self.parts.items():
            built[path] = self._read_bnb(path, parts, dtype)
        if self.quantize:
            formats = {path: "nf4" if isinstance(q, nf4.NF4Weight) else "int8" for path, q in built.items()}
            other = next((p for p, f in formats.items() if f != self.quantize), None)
            if other is not None:
                raise CheckpointError(f"{self.files[other]}: {other}.weight is stored as {formats[other]}; "
                                      f"quantize={self.quantize!r} would quantise it twice: load without quantize=")
        for path, q in built.items():
            lin = self.linears[path]
            if tuple(q.shape) != (lin.out_features, lin.in_features):
                raise CheckpointError(f"{self.files[path]}: tensor {path + '.weight'!r} holds a weight of shape "
                                      f"{list(q.shape)}, the config implies [{lin.out_features}, {lin.in_features}]")
            if dtype is not None:
                q.dtype = dtype
            bias = state.pop(path + ".bias", None)
            if (bias is None) != (lin.bias is None):
                raise CheckpointError(f"{self.files[path]}: the checkpoint lacks {path + '.bias'!r}")
            if bias is not None and dtype is not None:
                bias = bias.to(dtype)
            _set_module(model, path, QuantizedLinear(q, bias))
        return {f"{path}.{name}" for path in built for name in ("weight", "bias")}

    def _read_bnb(self, path: str, parts: dict, dtype):
        file = self.files[path]
        try:
            if "weight.quant_state.bitsandbytes__nf4" in parts:
                return nf4.from_bnb_state_dict(parts)
            if "SCB" in parts:
                return int8.from_bnb_state_dict(parts, dtype=dtype or torch.float16)
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"{file}: {path}.{e.args[0] if e.args else e}") from None
        held = ", ".join(sorted(parts))
        raise CheckpointError(f"{file}: {path} holds {held} but not the bitsandbytes quantisation state "
                              "(weight.quant_state.bitsandbytes__nf4, or SCB for 8-bit)")
