"""Giving the CPU process's freed memory back to the OS (glibc's malloc, on Linux).

glibc serves an allocation below its mmap threshold from the heap, and each time it frees a
mapped block it raises that threshold to the block's size (up to 32 MB). After reading and
quantising a checkpoint, or a training step's upcast blocks and activations, nearly every
tensor of a few MB comes from the heap, and a freed block that is not at the heap's top stays
resident: on Qwen2.5-7B's shape with an NF4 base, `malloc_trim(0)` in the middle of the first
step gave back 1.7 GB of an 8.2 GB RSS (2026-12-01). A fixed threshold stops the drift: blocks
of `MMAP_THRESHOLD` (1 MB) or more are mapped and unmapped on their own, so RSS follows the
live tensors. 4 MB was not enough: the first forward of that step still left about 50 MB of
free heap per layer resident (1.2 GB over 28 layers; on 4 of its layers, trimming after the
forward gave back all of it); at 1 MB nothing is left over. Mapping a block costs its page
faults at every use: on a small model they are a real share of the step (an NF4 Qwen2 of width
512, 1,024 tokens a step: 5.05 s against 4.44 s with glibc's default, 2026-12-01, because its
activations are 2-8 MB each); at 7B the matmuls that fill a block dwarf them.

`keep_heap_small()` is what a quantised load on the CPU calls (the case where memory is the
point); `LOWRANK_MALLOC=default` leaves malloc as it is. Elsewhere (macOS, musl, GPU runs) it
does nothing.
"""

import ctypes
import os
import sys

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 1 << 20


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def keep_heap_small() -> bool:
    """Fix glibc's mmap threshold at MMAP_THRESHOLD and give the heap's free pages back now.
    Whether it did (False off glibc, or with LOWRANK_MALLOC=default)."""
    if os.environ.get("LOWRANK_MALLOC", "").strip().lower() == "default":
        return False
    libc = _glibc()
    if libc is None:
        return False
    ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    return trim() and ok


def trim() -> bool:
    """Give the heap's free pages back to the OS (malloc_trim(0)); False off glibc."""
    libc = _glibc()
    if libc is None or os.environ.get("LOWRANK_MALLOC", "").strip().lower() == "default":
        return False
    libc.malloc_trim(0)
    return True
