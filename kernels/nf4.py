"""NF4 weights exactly as bitsandbytes stores them (`Params4bit`, quant_type="nf4"), in plain torch.

The weight [N, K] is flattened row-major and cut into blocks of `blocksize` (64) values; each
block keeps its absmax, and each value the index of the nearest of the 16 NF4 levels to
value / absmax. Two 4-bit indices go in a byte, the first element in the high nibble; the
packed tensor is uint8 [ceil(N*K / 2), 1]. Dequantised: w = NF4[q] * absmax[block], in fp32,
then rounded once to the compute dtype.

Double quantisation ("compress_statistics") stores the absmax themselves in 8 bits: with
offset = mean(absmax), the values absmax - offset are quantised blockwise (256 per block) to
the nearest entry of bitsandbytes' signed dynamic map, keeping one fp32 absmax per 256 blocks
(`nested_absmax`). Dequantised: absmax[b] = DYN[code[b]] * nested_absmax[b // 256] + offset.

Rounding follows bitsandbytes' reference implementation (`backends/default/ops.py`, which its
GPU kernels agree with): scale by 1/absmax in full blocks, divide by absmax in a short last
block, clamp to [-1, 1], nearest level with ties to the lower one. bitsandbytes' CPU build
rounds the nested absmax through a 65,536-entry table instead (about 0.2% of codes differ,
each by at most 2^-15 in the scaled value); see docs/quantization.md.

This file is the format, the torch dequantisation (the spec, the CPU path and the test oracle
of the fused kernel in `lora_nf4.py`) and the safetensors state dict transformers writes.
"""

import json
from dataclasses import dataclass

import torch

# Elements quantised or dequantised at a time: a multiple of every blocksize (and of 2, for the
# packing); read at each call (the tests shrink it).
from .chunks import CHUNK

# bitsandbytes' NF4 levels (`get_4bit_type("nf4")`, i.e. `create_normal_map()`'s non-zero
# entries): quantiles of N(0, 1) normalised to [-1, 1], ascending, so index order = value order.
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
NESTED_BLOCKSIZE = 256  # bitsandbytes' fixed block of the double-quantised absmax


def nf4_code(device=None) -> torch.Tensor:
    """The 16 NF4 levels, fp32 (`weight.quant_map` in a checkpoint)."""
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


def dynamic_code(device=None) -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map(signed=True)`), 256 fp32 values,
    ascending: for exponent e = 0..6, 2^e linearly spaced fractions in (0.1, 1) times 10^(e-6),
    both signs, plus 0 and 1. Built the way bitsandbytes builds it (fp32 linspace and means, scaled
    in fp32) so the values agree to the bit (`weight.nested_quant_map`)."""
    values = []
    for e in range(7):
        edges = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        scaled = (10 ** (e - 6)) * means
        values += scaled.tolist() + (-scaled).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32, device=device)


@dataclass
class NF4Weight:
    """A frozen NF4 weight. `absmax` is fp32 [n_blocks], or uint8 codes [n_blocks] when double
    quantised, in which case `nested_absmax` (fp32 [ceil(n_blocks / 256)]) and `nested_offset`
    are set. `shape` and `dtype` are the original weight's (bitsandbytes' quant_state.shape/dtype)."""

    packed: torch.Tensor  # uint8 [ceil(numel / 2), 1]
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    nested_absmax: torch.Tensor | None = None
    nested_offset: float | None = None

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def to(self, device) -> "NF4Weight":
        move = (lambda t: t.to(device) if t is not None else None)
        return NF4Weight(move(self.packed), move(self.absmax), self.shape, self.dtype, self.blocksize,
                         move(self.nested_absmax), self.nested_offset)




def _blockwise_nearest(flat: torch.Tensor, blocksize: int, code: torch.Tensor):
    """(indices into the sorted `code`, absmax per block) of a flat fp32 tensor, rounded as
    bitsandbytes' backends/default/ops.py rounds: full blocks scaled by the reciprocal of their
    absmax, a short last block divided by its absmax (clamped to 1e-38, and stored clamped)."""
    n = flat.numel()
    full = n - n % blocksize
    body = flat[:full].view(-1, blocksize)
    absmax = body.abs().amax(dim=1)
    scaled = torch.clamp(body * (1.0 / absmax.clamp(min=1e-38))[:, None], -1, 1).view(-1)
    if full < n:
        tail_max = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max[None]])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tail_max, -1, 1)])
    midpoints = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, midpoints), absmax  # right=False: a tie goes to the lower level


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantise a float weight to NF4, as `bitsandbytes.functional.quantize_4bit(w, blocksize,
    quant_type="nf4", compress_statistics=double_quant)` does."""
    if w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"quantize_nf4 takes an fp32, fp16 or bf16 weight, got {w.dtype}")
    if blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
        raise ValueError(f"blocksize {blocksize}: bitsandbytes takes a power of two from 32 to 4096")
    # A chunk of blocks at a time: the fp32 copy, the scaled values and the int64 level indices
    # would otherwise be 16 bytes of scratch per element at once (1.1 GB for one of a 7B model's
    # MLP weights, while the checkpoint loads). Every block is rounded on its own, so chunks
    # give the same bytes.
    flat, n = w.detach().reshape(-1), w.numel()
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=w.device)
    absmaxes = []
    for start in range(0, n, CHUNK):  # CHUNK is a multiple of every blocksize, and even
        q, absmax = _blockwise_nearest(flat[start:start + CHUNK].float(), blocksize, nf4_code(w.device))
        q = q.to(torch.uint8)
        if q.numel() % 2:
            q = torch.cat([q, q.new_full((1,), 7)])  # the padding is level 7, 0.0
        packed[start // 2:start // 2 + q.numel() // 2, 0] = (q[0::2] << 4) | q[1::2]
        absmaxes.append(absmax)
    absmax = torch.cat(absmaxes) if absmaxes else torch.empty(0, device=w.device)
    if not double_quant:
        return NF4Weight(packed, absmax, w.shape, w.dtype, blocksize)
    offset = absmax.mean()
    codes, nested = _blockwise_nearest(absmax - offset, NESTED_BLOCKSIZE, dynamic_code(w.device))
    return NF4Weight(packed, codes.to(torch.uint8), w.shape, w.dtype, blocksize, nested, offset.item())


def block_absmax(qw: NF4Weight, blocks: slice | None = None) -> torch.Tensor:
    """The fp32 absmax of every block (or of `blocks`), undoing the double quantisation if there is one."""
    lo, hi, _ = (blocks or slice(None)).indices(qw.absmax.numel())
    if not qw.double_quant:
        return qw.absmax[lo:hi].float()
    nested = qw.nested_absmax[lo // NESTED_BLOCKSIZE:(hi - 1) // NESTED_BLOCKSIZE + 1]
    nested = nested.repeat_interleave(NESTED_BLOCKSIZE)[lo % NESTED_BLOCKSIZE:][:hi - lo]
    offset = torch.tensor(qw.nested_offset, dtype=torch.float32, device=qw.device)
    return dynamic_code(qw.device)[qw.absmax[lo:hi].long()] * nested + offset


def nf4_indices(qw: NF4Weight) -> torch.Tensor:
    """The 4-bit level index of every element, int64 [numel], in flattened row-major order."""
    p = qw.packed.view(-1)
    return torch.stack([p >> 4, p & 0xF], dim=1).view(-1)[: qw.shape.numel()].long()


def byte_levels(device=None) -> torch.Tensor:
    """fp32 [256, 2]: the two NF4 levels a packed byte holds, the high nibble's first."""
    code, byte = nf4_code(device), torch.arange(256, device=device)
    return torch.stack([code[byte >> 4], code[byte & 0xF]], dim=1)


def dequantize_nf4(qw: NF4Weight, dtype: torch.dtype | None = None, rows: slice | None = None,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """The weight (or its `rows`, of a 2-d weight) as `dtype` (default: the original's):
    NF4[q] * absmax in fp32, rounded once. The rows must start on a block (`frozen_linear.row_blocks`
    cuts them so). `out`: a contiguous tensor of that shape to write into (its dtype is the
    result's), so a caller making a weight block by block reuses one buffer.

    One gather of both levels of each byte from a 256-entry table, then each block scaled in
    place by its absmax (no unpacked indices, no repeated absmax), a chunk at a time into the
    result: the fp32 scratch is one chunk's, not the weight's (a 7B model's MLP weight would need
    0.4 GB of it beside its 136 MB bf16 result, at every matmul of the step). An fp32 result is
    gathered and scaled in place, with no scratch (a third fewer passes over memory)."""
    n, bs = qw.shape.numel(), qw.blocksize
    lo, hi, shape = 0, n, qw.shape
    if rows is not None:
        first, last, _ = rows.indices(qw.shape[0])
        k = n // qw.shape[0]
        lo, hi, shape = first * k, last * k, torch.Size((last - first, k))
        if lo % bs:
            raise ValueError(f"rows {first}:{last} start inside a block of {bs} values (row length {k})")
    if out is None:
        out = torch.empty(shape, dtype=dtype or qw.dtype, device=qw.device)
    elif out.shape != shape or not out.is_contiguous():
        raise ValueError(f"out has shape {tuple(out.shape)}, expected a contiguous {tuple(shape)}")
    flat = out.view(-1)
    levels, packed = byte_levels(qw.device), qw.packed.view(-1)
    absmax = block_absmax(qw, slice(lo // bs, -(-hi // bs)))
    for start in range(lo, hi, CHUNK):  # CHUNK is a multiple of every blocksize, and even
        stop = min(start + CHUNK, hi)
        bytes_ = packed[start // 2:(stop + 1) // 2].int()
        direct = flat.dtype == torch.float32 and (stop - start) % 2 == 0  # lo is even: a block starts there
        if direct:
            values = flat[start - lo:stop - lo]
            torch.index_select(levels, 0, bytes_, out=values.view(-1, 2))
        else:
            values = levels.index_select(0, bytes_).view(-1)[:stop - start]
        full = (stop - start) - (stop - start) % bs
        values[:full].view(-1, bs).mul_(absmax[(start - lo) // bs:(start - lo + full) // bs, None])
        if full < stop - start:  # a short last block (only the weight's last can be short)
            values[full:].mul_(absmax[-1])
        if not direct:
            flat[start - lo:stop - lo] = values
    return out


# --- the safetensors layout -------------------------------------------------------------------

_QUANT_STATE = "weight.quant_state.bitsandbytes__nf4"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def to_bnb_state_dict(qw: NF4Weight, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors transformers + bitsandbytes save for this weight (`QuantState.as_dict(packed=True)`),
    under `prefix` (e.g. "model.layers.0.self_attn.q_proj."): the packed weight, absmax, quant_map,
    the nested state when double quantised, and the rest as JSON bytes in a uint8 tensor."""
    tensors = {"weight": qw.packed, "weight.absmax": qw.absmax, "weight.quant_map": nf4_code(qw.device)}
    meta = {"quant_type": "nf4", "blocksize": qw.blocksize, "dtype": _dtype_name(qw.dtype),
            "shape": list(qw.shape)}
    if qw.double_quant:
        tensors["weight.nested_absmax"] = qw.nested_absmax
        tensors["weight.nested_quant_map"] = dynamic_code(qw.device)
        meta.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=qw.nested_offset)
    tensors[_QUANT_STATE] = torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)
    return {prefix + k: v for k, v in tensors.items()}


def is_bnb_nf4(tensors, prefix: str = "") -> bool:
    """Whether a state dict holds an NF4 weight under `prefix`."""
    return prefix + _QUANT_STATE in tensors


def from_bnb_state_dict(tensors, prefix: str = "") -> NF4Weight:
    """Read the weight `to_bnb_state_dict` (or transformers' save_pretrained) wrote under `prefix`.
    Refuses what lowrank cannot honour: another 4-bit type, or maps other than bitsandbytes' own."""
    def get(key):
        if prefix + key not in tensors:
            raise KeyError(f"{prefix}{key}: missing from the NF4 state dict")
        return tensors[prefix + key]

    if prefix + "weight.quant_state.bitsandbytes__fp4" in tensors:
        raise ValueError(f"{prefix}weight: an FP4 weight; lowrank reads NF4 only")
    meta = json.loads(bytes(get(_QUANT_STATE).cpu().tolist()).decode("utf-8"))
    if meta.get("quant_type") != "nf4":
        raise ValueError(f"{prefix}{_QUANT_STATE}: quant_type {meta.get('quant_type')!r}, expected 'nf4'")
    packed, absmax = get("weight"), get("weight.absmax")
    if not torch.equal(get("weight.quant_map").cpu().float(), nf4_code()):
        raise ValueError(f"{prefix}weight.quant_map: not the NF4 levels")
    dtype = getattr(torch, meta["dtype"])
    shape = torch.Size(meta["shape"])
    if packed.dtype != torch.uint8 or packed.numel() != (shape.numel() + 1) // 2:
        raise ValueError(f"{prefix}weight: {packed.dtype} {tuple(packed.shape)}, expected uint8 "
                         f"[{(shape.numel() + 1) // 2}, 1] for shape {list(shape)}")
    qw = NF4Weight(packed.reshape(-1, 1), absmax, shape, dtype, int(meta["blocksize"]))
    if "nested_offset" not in meta:
        return qw
    if meta["nested_blocksize"] != NESTED_BLOCKSIZE or meta["nested_dtype"] != "float32":
        raise ValueError(f"{prefix}{_QUANT_STATE}: nested blocksize {meta['nested_blocksize']} "
                         f"dtype {meta['nested_dtype']}, expected {NESTED_BLOCKSIZE} float32")
    if not torch.equal(get("weight.nested_quant_map").cpu().float(), dynamic_code()):
        raise ValueError(f"{prefix}weight.nested_quant_map: not bitsandbytes' signed dynamic map")
    qw.nested_absmax = get("weight.nested_absmax").float()
    qw.nested_offset = float(meta["nested_offset"])
    return qw
