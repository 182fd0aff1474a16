"""Packed sequences as a padded batch, and back: how the linear-attention ops honour `cu_seqlens`.

A packed batch is [1, T, ...] with sequence n at positions cu_seqlens[n]:cu_seqlens[n+1]
(FLA's convention). The ops that carry state along T (the gated delta rule, the causal conv)
must restart it at every sequence start. Rather than teach every kernel the boundaries, the
packed tensor is gathered into [N, L_max, ...] with zeros after each sequence's end, the op
runs on that batch with one initial state per row, and the valid positions are gathered back.
Zeros at the end of a row change nothing that matters: the outputs there are dropped, and the
ops are built so that trailing zero inputs leave the state as it was (a zero key, beta and
log-decay is the identity update; the conv state is taken at the row's true length).

Gathers are plain indexing, so autograd carries gradients through both directions. The
lengths are read to the host once (one device sync per call).
"""

import torch


class Packing:
    """The index maps between a packed [1, T, ...] tensor and the padded [N, L_max, ...] batch."""

    def __init__(self, cu_seqlens: torch.Tensor, total: int):
        check_cu_seqlens(cu_seqlens, total)
        starts = cu_seqlens[:-1].long()
        self.lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        self.max_len = int(self.lengths.max()) if len(self.lengths) else 0
        pos = torch.arange(self.max_len, device=cu_seqlens.device)
        self.valid = pos[None, :] < self.lengths[:, None]  # [N, L_max]
        self.index = torch.where(self.valid, starts[:, None] + pos[None, :], 0)
        self.total = total

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """[1, T, ...] -> [N, L_max, ...], zero after each sequence's end."""
        rows = x[0, self.index]
        mask = self.valid.view(*self.valid.shape, *([1] * (x.dim() - 2)))
        return torch.where(mask, rows, rows.new_zeros(()))

    def unpad(self, y: torch.Tensor) -> torch.Tensor:
        """[N, L_max, ...] -> [1, T, ...]: the valid positions, in packed order (row-major)."""
        return y[self.valid].unsqueeze(0)


def check_cu_seqlens(cu_seqlens: torch.Tensor, total: int):
    if cu_seqlens.dim() != 1 or len(cu_seqlens) < 2:
        raise ValueError(f"cu_seqlens must be a 1-d tensor [N+1], got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype.is_floating_point:
        raise ValueError(f"cu_seqlens must be an integer tensor, got {cu_seqlens.dtype}")
    first, last = int(cu_seqlens[0]), int(cu_seqlens[-1])
    if first != 0 or last != total or bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
        raise ValueError(f"cu_seqlens must rise from 0 to T={total}, got {cu_seqlens.tolist()}")
