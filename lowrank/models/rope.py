"""Rotary position embeddings and their context-extension variants.

Each scaling type only changes the inverse frequencies (and, for yarn, a factor on cos/sin);
the rotation itself is the same. The formulas follow the papers as transformers implements
them, since checkpoints were trained against that code.
"""

from __future__ import annotations

import math

import torch


def _base_inv_freq(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _yarn(theta, dim, s, max_pos):
    factor = s.get("factor")
    original = s.get("original_max_position_embeddings") or max_pos
    if factor is None:
        factor = max_pos / original
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        if s.get("mscale") and s.get("mscale_all_dim"):
            attention_factor = mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)

    def correction_dim(rotations):
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1.0 - ramp  # 1 where a dimension keeps its trained frequency
    pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


def _llama3(theta, dim, s):
    inv_freq = _base_inv_freq(theta, dim)
    factor, low_f, high_f = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low_f, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low_f) / (high_f - low_f)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high_f) & (wavelen <= old_len / low_f)
    return torch.where(medium, smoothed, scaled)


def inv_freq_and_scale(theta: float, dim: int, scaling: dict | None, max_pos: int, seq_len: int = 0):
    """Inverse frequencies [dim/2] (fp32, CPU) and the factor applied to cos and sin.

    `seq_len` matters only to dynamic NTK scaling, which stretches the base once a sequence
    runs past the trained context.
    """
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "default":
        return _base_inv_freq(theta, dim), 1.0
    if kind == "linear":
        return _base_inv_freq(theta, dim) / scaling["factor"], 1.0
    if kind == "dynamic":
        if seq_len <= max_pos:
            return _base_inv_freq(theta, dim), 1.0
        f = scaling["factor"]
        base = theta * ((f * seq_len / max_pos) - (f - 1)) ** (dim / (dim - 2))
        return _base_inv_freq(base, dim), 1.0
    if kind == "yarn":
        return _yarn(theta, dim, scaling, max_pos)
    if kind == "llama3":
        return _llama3(theta, dim, scaling), 1.0
    raise ValueError(f"unknown RoPE type {kind!r}")


class Rotary:
    """Computes cos / sin for given positions. Holds no parameters or buffers, so a model
    built on the meta device needs nothing re-initialised after loading."""

    def __init__(self, dim: int, theta: float, scaling: dict | None, max_pos: int):
        self.dim, self.theta, self.scaling, self.max_pos = dim, theta, scaling, max_pos
        self.dynamic = (scaling or {}).get("rope_type") == "dynamic"
        with torch.device("cpu"):  # also when the model is being built on the meta device
            self.inv_freq, self.scale = inv_freq_and_scale(theta, dim, scaling, max_pos)
        self._on_device: dict = {}

    def __call__(self, position_ids: torch.Tensor, dtype: torch.dtype):
        inv_freq, scale = self.inv_freq, self.scale
        if self.dynamic:
            seq_len = int(position_ids.max()) + 1
            if seq_len > self.max_pos:
                with torch.device("cpu"):
                    inv_freq, scale = inv_freq_and_scale(
                        self.theta, self.dim, self.scaling, self.max_pos, seq_len
                    )
        device = position_ids.device
        if inv_freq is self.inv_freq:
            inv_freq = self._on_device.setdefault(device, inv_freq.to(device))
        else:
            inv_freq = inv_freq.to(device)
        freqs = position_ids[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, heads, T, D]; cos, sin: [B, T, D]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin
