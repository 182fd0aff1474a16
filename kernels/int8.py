"""int8 weight-only quantisation, as bitsandbytes' `Int8Params` / `Linear8bitLt` store it.

One scale per output row: SCB[n] = max_k |W[n, k]| (fp32 [N]) and W8[n, k] = round(W[n, k] * 127 / SCB[n])
(int8 [N, K], round half to even). bitsandbytes rounds the weight to fp16 first (`Int8Params`
quantises `data.to(float16)`), so SCB and the codes are those of the fp16 weight; lowrank does
the same, so a weight quantised here equals one quantised by bitsandbytes.

Dequantised: W = W8 * SCB / 127, as `bitsandbytes.functional.int8_vectorwise_dequant` (and
transformers' dequantize) compute it: (W8 * SCB) * fp32(1/127), in fp32, rounded once to the
compute dtype. A zero row has SCB = 0 and codes 0 (bitsandbytes' torch path leaves NaN
codes there, from 0 * 127/0).
"""

from dataclasses import dataclass

import torch

from .chunks import CHUNK, row_blocks  # CHUNK is read at each call: the tests shrink it

_INV_127 = 7.874015718698502e-3  # fp32(1/127): bitsandbytes' constant


@dataclass
class Int8Weight:
    """A frozen int8 weight: `weight` int8 [N, K], `scb` fp32 [N] (bitsandbytes' SCB), and the
    dtype the original weight had."""

    weight: torch.Tensor
    scb: torch.Tensor
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.weight.shape

    @property
    def device(self) -> torch.device:
        return self.weight.device

    def to(self, device) -> "Int8Weight":
        return Int8Weight(self.weight.to(device), self.scb.to(device), self.dtype)


def quantize_int8(w: torch.Tensor) -> Int8Weight:
    """Per-row absmax int8 of a [N, K] float weight, as `Int8Params(w, has_fp16_weights=False)` does."""
    if w.dim() != 2 or w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"quantize_int8 takes a 2-d fp32, fp16 or bf16 weight, got {w.dtype} {tuple(w.shape)}")
    # Rows are independent: a block of rows at a time keeps the fp16 copy and the fp32 scaled
    # values to a chunk's size (6 bytes per element of the whole weight otherwise).
    codes = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scb = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    for rows in row_blocks(*w.shape, CHUNK):
        w16 = w[rows].detach().to(torch.float16)
        scb[rows] = w16.abs().amax(dim=1).float()
        scaled = w16 * (127.0 / scb[rows])[:, None]  # fp16 * fp32 -> fp32, as bitsandbytes computes it
        codes[rows] = torch.where(scb[rows][:, None] > 0, torch.round(scaled), 0.0).to(torch.int8)
    return Int8Weight(codes, scb, w.dtype)


def dequantize_int8(qw: Int8Weight, dtype: torch.dtype | None = None, rows: slice | None = None,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """W8 * SCB / 127 (or its `rows`) as `dtype` (default: the original's), computed in fp32 and
    rounded once. `out`: a tensor of that shape to write into (its dtype is the result's)."""
    codes, scb = (qw.weight, qw.scb) if rows is None else (qw.weight[rows], qw.scb[rows])
    if out is None:
        out = torch.empty(codes.shape, dtype=dtype or qw.dtype, device=codes.device)
    elif out.shape != codes.shape:
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {tuple(codes.shape)}")
    for block in row_blocks(*codes.shape, CHUNK):  # the fp32 scratch is a block of rows', not the weight's
        out[block] = codes[block].float() * scb[block, None] * _INV_127
    return out


def to_bnb_state_dict(qw: Int8Weight, prefix: str = "") -> dict[str, torch.Tensor]:
    """What `Linear8bitLt` saves (and transformers writes): weight, SCB and weight_format 0 ("row")."""
    return {prefix + "weight": qw.weight, prefix + "SCB": qw.scb,
            prefix + "weight_format": torch.tensor(0, dtype=torch.uint8)}


def is_bnb_int8(tensors, prefix: str = "") -> bool:
    return prefix + "SCB" in tensors


def from_bnb_state_dict(tensors, prefix: str = "", dtype: torch.dtype = torch.float16) -> Int8Weight:
    """Read an 8-bit weight under `prefix`. The checkpoint does not record the original dtype;
    `dtype` (the model's torch_dtype) is what dequantisation returns by default."""
    for key in ("weight", "SCB"):
        if prefix + key not in tensors:
            raise KeyError(f"{prefix}{key}: missing from the int8 state dict")
    weight, scb = tensors[prefix + "weight"], tensors[prefix + "SCB"]
    fmt = tensors.get(prefix + "weight_format", 0)
    fmt = int(fmt.item()) if isinstance(fmt, torch.Tensor) else fmt
    if fmt not in (0, "row"):
        raise ValueError(f"{prefix}weight_format: {fmt!r}; lowrank reads the row-major format (0) only")
    if weight.dtype != torch.int8 or weight.dim() != 2 or tuple(scb.shape) != (weight.shape[0],):
        raise ValueError(f"{prefix}weight {weight.dtype} {tuple(weight.shape)} with SCB {tuple(scb.shape)}: "
                         f"expected int8 [N, K] and [N]")
    return Int8Weight(weight, scb.float(), dtype)
