"""Depthwise causal conv1d with SiLU: the short conv before Gated DeltaNet's q/k/v.

    y[b, t, d] = act(bias[d] + sum_{w<W} weight[d, w] * x[b, t - (W-1) + w, d])

with x at negative times taken from the conv state (zeros without one). The conv state is the
last W - 1 inputs (pre-conv), [B, D, W - 1], oldest first: exactly what the next token needs.
transformers' cache keeps W positions instead (`update_conv_state` pads to conv_kernel_size
and its `causal_conv1d_update` concatenates state and input and keeps the last `state_len`);
the oldest of its W never reaches an output. `causal_conv1d_update` here accepts any state of
W - 1 or more positions and returns one of the same length, so either convention works.

Torch only, in the time-major layout the projections give ([B, T, D], channels contiguous):
W shifted multiply-adds over [B, T, D] (`_DepthwiseCausalConv`, its backward written out) rather
than F.conv1d with groups = D, which needs the channels-first layout: on the CPU that costs a
transposed copy of x and of the output, and oneDNN's depthwise backward took 3.4x its forward.
Forward + backward at [2, 512, 1024] (a Qwen3.5 LoRA step's shape): 18 ms against 35 (best
of 20 on 2 shared cores). The taps are summed in order w = 0..W-1, as oneDNN does: the outputs
are bitwise those of F.conv1d. `cu_seqlens` restarts the state at each packed sequence's start
(via `varlen.Packing`).
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


class _DepthwiseCausalConv(torch.autograd.Function):
    """y[:, t] = bias + sum_w weight[:, w] * xp[:, t + w] for xp [B, W - 1 + T, D] (state, then
    input; time-major), weight [D, W], bias [D] or None -> y [B, T, D]. Each of the W taps is one
    fused multiply-add pass over [B, T, D]; the backward is the same taps transposed."""

    @staticmethod
    def forward(ctx, xp, weight, bias):
        W = weight.shape[1]
        T = xp.shape[1] - (W - 1)
        y = xp[:, :T] * weight[:, 0] if bias is None else torch.addcmul(bias, xp[:, :T], weight[:, 0])
        for w in range(1, W):
            y.addcmul_(xp[:, w:w + T], weight[:, w])
        ctx.save_for_backward(xp, weight)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        xp, weight = ctx.saved_tensors
        W = weight.shape[1]
        T = dy.shape[1]
        dxp = dweight = dbias = None
        if ctx.needs_input_grad[0]:
            dxp = xp.new_zeros(xp.shape)
            for w in range(W):
                dxp[:, w:w + T].addcmul_(dy, weight[:, w])
        if ctx.needs_input_grad[1]:
            # dweight[d, w] = sum over (b, t) of dy[b, t, d] * xp[b, t + w, d]
            dweight = torch.stack([(dy * xp[:, w:w + T]).sum((0, 1)) for w in range(W)], dim=1)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            dbias = dy.sum((0, 1))
        return dxp, dweight, dbias


def _conv(xp, weight, bias, act, out_len):
    """xp [B, S + T, D] (state then input, time-major) -> y [B, T, D] of the last out_len steps."""
    W = weight.shape[1]
    xp = xp[:, xp.shape[1] - out_len - (W - 1):]
    return act(_DepthwiseCausalConv.apply(xp, weight, bias))


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
    xp = torch.cat([state.transpose(1, 2), x], dim=1)  # [rows, W - 1 + L, D]
    y = _conv(xp, weight.to(x.dtype), None if bias is None else bias.to(x.dtype), act, x.shape[1])
    final = None
    if output_final_state:
        # Each row's last W - 1 inputs end at its own length, not at the padded L_max.
        lengths = packing.lengths if packing is not None else torch.full((rows,), T, device=x.device)
        pos = lengths[:, None] + torch.arange(W - 1, device=x.device)[None, :]  # in xp's time axis
        final = xp.gather(1, pos[:, :, None].expand(rows, W - 1, D)).transpose(1, 2)
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
    xp = torch.cat([conv_state.to(x.dtype).transpose(1, 2), x], dim=1)  # [B, S + T, D]
    y = _conv(xp, weight.to(x.dtype), None if bias is None else bias.to(x.dtype), act, x.shape[1])
    return y, xp[:, xp.shape[1] - S:].transpose(1, 2)
