"""The metrics of a run sent to TensorBoard or Weights & Biases (`--report-to tensorboard wandb`).

Each tracker gets exactly the rows the loop writes to metrics.jsonl, keyed by step, under the
names transformers' Trainer gives them (its `rewrite_logs`: `eval_*` -> `eval/*`, the rest
`train/*`; `lr` is `train/learning_rate` there). Both are optional extras, imported only when
asked for: `pip install "lowrank[tensorboard]"` / `"lowrank[wandb]"`.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from ..errors import ConfigError

# metrics.jsonl key -> tracker name; keys not listed follow Trainer's rule (tracker_name).
NAMES = {"loss": "train/loss", "lr": "train/learning_rate", "grad_norm": "train/grad_norm", "epoch": "train/epoch",
         "tokens_per_s": "train/tokens_per_second", "peak_mem_mb": "train/peak_memory_mb",
         "tokens": "train/tokens", "trained_tokens": "train/trained_tokens",
         "eval_loss": "eval/loss", "eval_ppl": "eval/perplexity"}
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # tracker -> the module it needs


def tracker_name(key: str) -> str:
    if key in NAMES:
        return NAMES[key]
    return "eval/" + key[5:] if key.startswith("eval_") else "train/" + key


def require_trackers(names) -> None:
    """ConfigError naming the extra to install when a tracker's package is missing (imports nothing)."""
    for name in names:
        if name in PACKAGES and importlib.util.find_spec(PACKAGES[name]) is None:
            raise ConfigError(f"report_to={name!r}: {PACKAGES[name]} is not installed; "
                              f"pip install \"lowrank[{name}]\"")


class TensorBoard:
    """Scalars into `logdir` (torch.utils.tensorboard); `tensorboard --logdir OUTPUT` shows them."""

    def __init__(self, logdir: Path, start: int):
        from torch.utils.tensorboard import SummaryWriter

        # A resumed run rewrites the steps after its checkpoint: purge_step hides the first
        # attempt's events from there on, so TensorBoard shows one curve.
        self.writer = SummaryWriter(str(logdir), purge_step=start + 1 if start else None)

    def log(self, row: dict) -> None:
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(tracker_name(key), value, row["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class Wandb:
    """One wandb run per invocation (a resumed run is a new one, named alike); WANDB_MODE=offline
    writes it under `logdir` without a network, for `wandb sync` later."""

    def __init__(self, logdir: Path, name: str, settings: dict):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "lowrank"), name=name, dir=str(logdir),
                              config=settings)

    def log(self, row: dict) -> None:
        self.run.log({tracker_name(k): v for k, v in row.items() if k != "step"}, step=row["step"])

    def close(self) -> None:
        self.run.finish()


def open_trackers(names, logdir: Path, start: int, name: str, settings: dict) -> list:
    """The trackers of `report_to` (`["none"]`: none), writing under `logdir`."""
    names = [n for n in names if n != "none"]
    require_trackers(names)
    if names:
        Path(logdir).mkdir(parents=True, exist_ok=True)
    return [TensorBoard(Path(logdir), start) if n == "tensorboard" else Wandb(Path(logdir), name, settings)
            for n in names]
