"""Data parallelism: the process group, the model wrapper and the few collectives the loop uses.

A run started by torchrun (RANK / WORLD_SIZE / LOCAL_RANK in the environment) joins the process
group torchrun rendezvoused: gloo on the CPU, nccl on GPUs, one GPU per process. Without those
variables the run is a single process and every function here is the identity.

The loop stays unaware of how gradients are combined: `wrap` is the one place that chooses
DistributedDataParallel today and can choose FSDP later, `no_sync` the one place that skips the
gradient all-reduce on the micro-batches before the last of a step.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(choice: str, local_rank: int = 0) -> torch.device:
    """"auto": this process's GPU when CUDA is there, else the CPU; or "cpu" / "cuda"."""
    if choice not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device={choice!r}: expected auto, cpu or cuda")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but torch sees no CUDA device")
    if choice == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def init_distributed(device_choice: str = "auto") -> DistInfo:
    """Join torchrun's process group if this process was started by torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_choice, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world_size, local_rank, device)


def shutdown(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()


def wrap(module: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """The module whose backward all-reduces gradients across ranks (the module itself alone).

    DDP averages gradients over ranks; the loop scales each rank's loss by world_size / (global
    token count), so the average is the token-weighted mean of the whole step.
    """
    if not info.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [info.device.index] if info.device.type == "cuda" else None
    # An MoE expert that no token of this rank's batch reached has no gradient; DDP must look
    # for such parameters (a cost dense models need not pay).
    moe = any(".experts." in name for name, _ in module.named_parameters())
    # Buffers are the same on every rank as loaded (quantised base weights, RoPE tables): no
    # broadcast of them from rank 0 before every forward.
    return DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=moe, broadcast_buffers=False)


def no_sync(module: torch.nn.Module, sync: bool):
    """Context for one micro-batch: gradients are all-reduced only when `sync` (the step's last)."""
    if sync or not hasattr(module, "no_sync"):
        return nullcontext()
    return module.no_sync()


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The sum of `tensor` over ranks (in place; returned for chaining)."""
    if info.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()

