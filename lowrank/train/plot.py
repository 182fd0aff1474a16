"""Loss curves from metrics.jsonl: train and eval loss against step, one panel per run.

The run writes `loss.png` beside its metrics.jsonl when matplotlib is installed (the optional
extra `lowrank[plot]`); `python -m lowrank.plot RUN_DIR...` draws several runs side by side
with a shared loss axis, so they compare at a glance. matplotlib's object API (Figure plus
the Agg canvas) draws without pyplot, so no GUI backend or global figure state is involved.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError, DataError
from ..files import write_atomic


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def read_curves(run_dir) -> dict[str, list[tuple[int, float]]]:
    """{"loss": [(step, loss), ...], "eval_loss": [...]} of a run folder's metrics.jsonl."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"{path}: no such file (is {run_dir} a lowrank.train output folder?)")
    curves = {"loss": [], "eval_loss": []}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{path}: line {n} is not JSON") from None
        for key in curves:
            if isinstance(row, dict) and isinstance(row.get(key), (int, float)):
                curves[key].append((int(row["step"]), float(row[key])))
    return curves


def plot_runs(run_dirs, path) -> Path:
    """Draw each run's train and eval loss in a panel of its own, side by side, into PNG `path`."""
    if not have_matplotlib():
        raise ConfigError('drawing loss curves needs matplotlib: pip install "lowrank[plot]"')
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    runs = [(Path(d), read_curves(d)) for d in run_dirs]
    fig = Figure(figsize=(5 * len(runs), 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(runs), sharey=True, squeeze=False)[0]
    for ax, (folder, curves) in zip(axes, runs):
        if curves["loss"]:
            ax.plot(*zip(*curves["loss"]), label="train loss", linewidth=1)
        if curves["eval_loss"]:
            ax.plot(*zip(*curves["eval_loss"]), "o-", label="eval loss", markersize=3)
        ax.set_title(folder.resolve().name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("loss")
    write_atomic(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    return Path(path)
