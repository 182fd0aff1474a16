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
activations are 2-8 MB each), for little memory (90 MB of 1.1 GB there).

So the threshold is for loads where memory is the point: `heap_matters(nbytes)` says whether a
quantised CPU load of an `nbytes` checkpoint calls `keep_heap_small()`, which it does when the
checkpoint is over a quarter of the machine's memory (Qwen2.5-7B's 15 GB of bf16 on a 24 GB
machine; not a small model that fits either way). `LOWRANK_MALLOC=small` keeps the heap small
for every quantised CPU load, `LOWRANK_MALLOC=default` for none. Elsewhere (macOS, musl, GPU
runs) nothing is done.
"""

import ctypes
import os
import sys
from pathlib import Path

from .errors import ConfigError

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 1 << 20
MEMORY_SHARE = 0.25  # a checkpoint over this share of the machine's memory keeps the heap small


def _mode() -> str:
    mode = os.environ.get("LOWRANK_MALLOC", "").strip().lower()
    if mode not in ("", "auto", "small", "default"):
        raise ConfigError(f"LOWRANK_MALLOC={mode!r}: expected 'small' (always keep the heap small), 'default' "
                          "(leave glibc's malloc alone) or 'auto' (unset: by the checkpoint's size)")
    return mode


def physical_memory() -> int | None:
    """Bytes of memory this process may use: the machine's, or its cgroup's limit if lower; None
    where neither can be read."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()  # cgroup v2; "max" when unlimited
    except OSError:
        limit = ""
    if limit.isdigit():
        total = int(limit) if total is None else min(total, int(limit))
    return total


def heap_matters(nbytes: int) -> bool:
    """Whether a quantised CPU load of a checkpoint of `nbytes` should keep the heap small."""
    mode = _mode()
    if mode in ("default", "small"):
        return mode == "small"
    total = physical_memory()
    return total is None or nbytes > MEMORY_SHARE * total


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
    if _mode() == "default":
        return False
    libc = _glibc()
    if libc is None:
        return False
    ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    return trim() and ok


def trim() -> bool:
    """Give the heap's free pages back to the OS (malloc_trim(0)); False off glibc."""
    libc = _glibc()
    if libc is None or _mode() == "default":
        return False
    libc.malloc_trim(0)
    return True
