"""Stopping a run by Ctrl-C (SIGINT) or SIGTERM without losing it.

The first signal only raises a flag: the loop finishes the step it is in, writes a checkpoint
and raises `Stopped`; the command line prints `stopped at step N; continue with --resume` and
exits 128 + the signal number (130 for SIGINT, 143 for SIGTERM), as a shell reports a process
the signal ended. A second signal stops at once (KeyboardInterrupt from wherever the run is;
the newest complete checkpoint is still there, a half-written one is ignored by --resume).

Under torchrun every process gets the signal, but not necessarily within the same step: the
flag is all-reduced after each step, so all processes stop after the same one.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

import torch

from . import distributed as dist

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(KeyboardInterrupt):
    """finetune stopped on a signal after writing checkpoint `step`. A KeyboardInterrupt, so a
    script that does not catch it ends as on Ctrl-C."""

    def __init__(self, step: int, signum: int, checkpoint):
        super().__init__(f"stopped at step {step}; continue with --resume")
        self.step, self.signum, self.checkpoint = step, signum, checkpoint

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


class StopFlag:
    """Set by the first SIGINT / SIGTERM while `catch_signals` is active."""

    def __init__(self):
        self.signum: int | None = None

    def requested(self, info: dist.DistInfo) -> bool:
        """Whether any process was signalled (a collective call under torchrun: every rank calls it)."""
        if info.world_size == 1:
            return self.signum is not None
        mine = torch.tensor([float(self.signum == s) for s in SIGNALS], device=info.device)
        got = dist.all_reduce_sum(mine, info).tolist()  # how many processes got each signal
        if self.signum is None and any(got):
            self.signum = SIGNALS[0] if got[0] else SIGNALS[1]
        return any(got)


@contextmanager
def catch_signals():
    """Within the block, the first SIGINT / SIGTERM sets the returned flag and a second raises
    KeyboardInterrupt. Outside the main thread (signals cannot be caught there) the flag never rises."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag.signum is not None:
            raise KeyboardInterrupt
        flag.signum = signum

    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
