"""Which implementation a kernel call takes: the Triton kernels or the torch reference.

`LOWRANK_KERNEL=auto` (the default) takes Triton for CUDA tensors when triton imports and
the torch reference everywhere else; `triton` and `torch` force a path. Forcing `triton`
on CPU tensors works only under Triton's interpreter (`TRITON_INTERPRET=1`), which is how
CI checks the kernels on a machine without a GPU.
"""

import os

import torch

_CHOICES = ("auto", "triton", "torch")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def kernel_choice() -> str:
    choice = os.environ.get("LOWRANK_KERNEL", "auto").strip().lower() or "auto"
    if choice not in _CHOICES:
        raise ValueError(f"LOWRANK_KERNEL={choice!r}: expected one of {', '.join(_CHOICES)}")
    return choice


def use_triton(x: torch.Tensor) -> bool:
    """True when a kernel called on `x` should run its Triton path."""
    choice = kernel_choice()
    if choice == "torch":
        return False
    if choice == "triton":
        if not triton_available():
            raise RuntimeError("LOWRANK_KERNEL=triton but triton does not import")
        if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                f"LOWRANK_KERNEL=triton on a {x.device.type} tensor needs TRITON_INTERPRET=1"
            )
        return True
    return x.device.type == "cuda" and triton_available()
