"""Training checkpoints: what resuming needs, written so that a crash never damages the last good one.

A checkpoint is a folder ``checkpoints/step-N/``:

- ``trainable.safetensors``: the trainable parameters, by their names in the model;
- ``optimizer.safetensors``: the optimizer's per-parameter state (AdamW: ``step``, ``exp_avg``,
  ``exp_avg_sq``) as ``{parameter name}.{key}``;
- ``state.json``: the step, the data position (epoch and step within it), the grad scaler's state,
  and the settings a resumed run must share with this one;
- the result so far in its usable form, written by the loop (``usable``): a PEFT adapter
  (``adapter_config.json``, ``adapter_model.safetensors``) or, for freeze / full, a model folder
  (``config.json``, ``model.safetensors``, the tokenizer). Resuming reads none of it.

Nothing is pickled, so a checkpoint from anywhere loads without running code. The learning-rate
schedule and the random state need no files: the LR is a function of the step (schedule.py) and
the loop reseeds torch from (seed, step, rank) at every step (training.py), so both follow from
the step number.

Writing: every file goes into ``step-N.partial/``, is flushed to disk, and the folder is renamed
to ``step-N`` only when complete, so a ``step-N`` folder is always whole; a ``.partial`` folder
left by a killed process is ignored and cleared by the next write.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError, ConfigError
from ..files import read_json_object, write_atomic

STEP_DIR = re.compile(r"^step-(\d+)$")
# Test hook: the process SIGKILLs itself halfway through writing this step's checkpoint
# (after the weights, before the optimizer state), as a crash or preemption would.
CRASH_ENV = "LOWRANK_CRASH_IN_CHECKPOINT"


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The trainable parameters by name (tied parameters once, under their first name)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(folder, step: int, model, optimizer, state: dict, usable=None) -> Path:
    """Write checkpoint `step` under `folder` (the run's checkpoints/ folder) and return its path.
    `usable(path)`, if given, writes more files into the checkpoint before it is complete."""
    folder = Path(folder)
    final = folder / f"step-{step}"
    partial = folder / f"step-{step}.partial"
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)

    params = trainable_state(model)
    _save_tensors(partial / "trainable.safetensors", params)
    if os.environ.get(CRASH_ENV) == str(step):
        os.kill(os.getpid(), signal.SIGKILL)
    by_param = {p: name for name, p in params.items()}
    opt = {f"{by_param[p]}.{key}": value for p, values in optimizer.state.items() for key, value in values.items()
           if isinstance(value, torch.Tensor)}
    _save_tensors(partial / "optimizer.safetensors", opt)
    if usable is not None:
        usable(partial)
    _write_text(partial / "state.json", json.dumps(dict(state, step=step), indent=2) + "\n")

    if final.exists():  # a checkpoint of the same step from an earlier attempt: replace it whole
        shutil.rmtree(final)
    os.replace(partial, final)
    _fsync_dir(folder)
    return final


def checkpoints(folder) -> list[Path]:
    """The complete checkpoints under `folder`, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir()
             if (m := STEP_DIR.match(p.name)) and (p / "state.json").is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(folder) -> Path | None:
    """The complete checkpoint with the highest step under `folder`, or None."""
    found = checkpoints(folder)
    return found[-1] if found else None


# Settings checkpoints have recorded only since a later version: an older one ran with the default.
_UNRECORDED_DEFAULTS = {"quantize": "none"}


def load_checkpoint(path, model, optimizer, expected: dict | None = None) -> dict:
    """Restore the trainable parameters and the optimizer state from checkpoint `path`; return
    its state.json. `expected`: settings that must equal the checkpoint's (ConfigError naming the
    first that differs), e.g. the batch layout, without which the data position means nothing."""
    path = Path(path)
    state = read_json_object(path / "state.json")
    for key, value in (expected or {}).items():
        saved = state.get("run", {}).get(key, _UNRECORDED_DEFAULTS.get(key))
        if saved != value:
            raise ConfigError(f"{path}: was written with {key}={saved!r}, this run has {key}={value!r}; "
                              "resume with the same setting or start a new output folder")

    params = trainable_state(model)
    weights = _load_tensors(path / "trainable.safetensors")
    if set(weights) != set(params):
        missing, extra = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
        raise CheckpointError(f"{path / 'trainable.safetensors'}: does not match the model's trainable parameters "
                              f"(missing {missing[:3]}, unexpected {extra[:3]})")
    with torch.no_grad():
        for name, p in params.items():
            if weights[name].shape != p.shape:
                raise CheckpointError(f"{path / 'trainable.safetensors'}: {name!r} has shape "
                                      f"{list(weights[name].shape)}, the model {list(p.shape)}")
            p.copy_(weights[name])

    saved = _load_tensors(path / "optimizer.safetensors")
    # Through load_state_dict, so the optimizer places each value (AdamW's `step` stays on the
    # CPU unless it runs fused) as it would its own.
    order = [p for group in optimizer.param_groups for p in group["params"]]
    index = {p: i for i, p in enumerate(order)}
    per_param: dict[int, dict] = {}
    for key, value in saved.items():
        name, _, field = key.rpartition(".")
        if name not in params or params[name] not in index:
            raise CheckpointError(f"{path / 'optimizer.safetensors'}: state {key!r} names no optimized parameter")
        per_param.setdefault(index[params[name]], {})[field] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": optimizer.state_dict()["param_groups"]})
    return state


def prune_checkpoints(folder, keep: int) -> None:
    """Delete all but the `keep` newest complete checkpoints (keep <= 0 keeps all)."""
    if keep > 0:
        for p in checkpoints(folder)[:-keep]:
            shutil.rmtree(p)


def truncate_metrics(path, step: int) -> None:
    """Drop the rows of metrics.jsonl after `step`: a resumed run writes them again."""
    path = Path(path)
    if not path.is_file():
        return
    rows = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and _row_step(line) <= step]
    _write_text(path, "".join(row + "\n" for row in rows))


def _row_step(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return 1 << 62  # a torn last line from a killed process: drop it


# ---- files ------------------------------------------------------------------------------------

def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path))
    _fsync(path)


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{path}: cannot be read ({e})") from None


def _write_text(path: Path, text: str) -> None:
    """Readers see the old file or the new one; the new one is on disk before the rename."""
    def write(tmp: Path):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    write_atomic(path, write)


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
