"""Depthwise causal conv1d with SiLU: the short conv before Gated DeltaNet's q/k/v.

    y[b, t, d] = act(bias[d] + sum_{w<W} weight[d, w] * x[b, t - (W-1) + w, d])

with x at negative times taken from the conv state (zeros without one). The conv state is the
last W - 1 inputs (pre-conv), [B, D, W - 1], oldest first: exactly what the next token needs.
transformers' cache keeps W positions instead (`update_conv_state` pads to conv_kernel_size
and its `causal_conv1d_update` concatenates state and input and keeps the last `state_len`);
the oldest of its W never reaches an output. `causal_conv1d_update` here accepts any state of
W - 1 or more positions and returns one of the same length, so either convention works.

Torch only: one F.conv1d with groups = D is a single memory-bound pass that oneDNN/cuDNN
already do well, and it is differentiable by autograd. `cu_seqlens` restarts the state at each
packed sequence's start (via `varlen.Packing`).
"""

import torch
import torch.nn.functional as F

from .varlen import Packing

ACTIVATIONS = {None: lambda y: y, "silu": F.silu, "swish": F.silu}


def _weight_2d(weight: torch.Tensor) -> torch.Tensor:
    """[D, W] or a checkpoint's nn.Conv1d weight [D, 1, W] -> [D, W]."""
    if weight.dim() == 3 and weight.shape[1] == 1:
        return weight[:, 0]
    if weight.dim() != 2:
        raise ValueError(f"conv weight must be [D, W] or [D, 1, W], got {tuple(weight.shape)}")
    return weight


def _activation(name):
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r}: expected one of {', '.join(map(str, ACTIVATIONS))}")
    return ACTIVATIONS[name]


def _conv(xp, weight, bias, act, out_len):
    """xp [B, D, S + T] (state then input, channels first) -> y [B, T, D] of the last out_len steps."""
    y = F.conv1d(xp, weight[:, None, :], bias, groups=weight.shape[0])
    return act(y[:, :, y.shape[-1] - out_len:]).transpose(1, 2)


def causal_conv1d(x, weight, bias=None, activation="silu", initial_state=None, output_final_state=False,
                  cu_seqlens=None):
    """x [B, T, D]; weight [D, W] or [D, 1, W]; bias [D] or None; activation "silu" or None;
    initial_state [B, D, W - 1] ([N, D, W - 1] with cu_seqlens) or None for zeros.
    Returns (y [B, T, D] in x's dtype, final state [B or N, D, W - 1] or None)."""
    weight = _weight_2d(weight)
    act = _activation(activation)
    B, T, D = x.shape
    if weight.shape[0] != D:
        raise ValueError(f"conv weight has {weight.shape[0]} channels, x has {D}")
    W = weight.shape[1]
    packing = None
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"cu_seqlens needs a packed batch with B = 1, got B = {B}")
        packing = Packing(cu_seqlens, T)
        x = packing.pad(x)
    rows = x.shape[0]
    if initial_state is not None and tuple(initial_state.shape) != (rows, D, W - 1):
        raise ValueError(f"initial_state must be [{rows}, {D}, {W - 1}], got {tuple(initial_state.shape)}")
    state = x.new_zeros(rows, D, W - 1) if initial_state is None else initial_state.to(x.dtype)
    xp = torch.cat([state, x.transpose(1, 2)], dim=-1)  # [rows, D, W - 1 + L]
    y = _conv(xp, weight.to(x.dtype), None if bias is None else bias.to(x.dtype), act, x.shape[1])
    final = None
    if output_final_state:
        # Each row's last W - 1 inputs end at its own length, not at the padded L_max.
        lengths = packing.lengths if packing is not None else torch.full((rows,), T, device=x.device)
        pos = lengths[:, None] + torch.arange(W - 1, device=x.device)[None, :]  # in xp's time axis
        final = xp.gather(2, pos[:, None, :].expand(rows, D, W - 1))
    if packing is not None:
        y = packing.unpad(y)
    return y, final


def causal_conv1d_update(x, conv_state, weight, bias=None, activation="silu"):
    """Decoding: x [B, T, D] new inputs (usually T = 1), conv_state [B, D, S] with S >= W - 1
    (the last S inputs, oldest first: W - 1 here, W in transformers' cache).
    Returns (y [B, T, D], the new state [B, D, S]). Nothing is updated in place."""
    weight = _weight_2d(weight)
    act = _activation(activation)
    W, S = weight.shape[1], conv_state.shape[-1]
    if S < W - 1 or conv_state.shape[:2] != (x.shape[0], x.shape[2]):
        raise ValueError(f"conv_state must be [{x.shape[0]}, {x.shape[2]}, >= {W - 1}], got {tuple(conv_state.shape)}")
    xp = torch.cat([conv_state.to(x.dtype), x.transpose(1, 2)], dim=-1)
    y = _conv(xp[:, :, S - (W - 1):], weight.to(x.dtype), None if bias is None else bias.to(x.dtype), act,
              x.shape[1])
    return y, xp[:, :, xp.shape[-1] - S:]
