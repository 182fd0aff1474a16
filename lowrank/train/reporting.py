"""What a run tells while it runs, besides the progress bar.

- At the start (`start_lines`): what the data became (examples kept, cut at max_len, skipped
  and why; the eval examples), PEFT's trainable-parameter line, and the plan (steps, epochs,
  batch layout).
- Every step (`RunLog.train`): a row of metrics.jsonl, the same row to each tracker
  (trackers.py), and every `logging_steps` steps a plain log line.
- Every evaluation (`RunLog.evaluation`): its row, to the trackers, and a printed line.

Lines go through tqdm.write, which prints above the bar instead of through it.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from ..adapters.freeze import trainable_summary
from .trackers import open_trackers


def say(line: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()


def data_line(report, max_len: int) -> str:
    """A DataReport as the run prints it: what was kept, cut and dropped, and why. Another report
    (a preference file's PreferenceReport) prints its own summary."""
    if not hasattr(report, "n_trainable_tokens"):
        return report.summary()
    return (f"{report.path}: {report.n_records} records -> {report.n_examples} examples "
            f"({report.n_truncated} cut at max_len={max_len}, {report.n_skipped} skipped: no trained token "
            f"within max_len={max_len}), {report.n_tokens} tokens, {report.n_trainable_tokens} trained")


def start_lines(run) -> list[str]:
    """The lines a run prints before its first step (see the module docstring)."""
    cfg = run.config
    lines = [f"lowrank: data: {data_line(r, cfg.max_len)}" for r in run.data_reports]
    if cfg.eval_split:
        lines.append(f"lowrank: data: {len(run.eval_examples)} examples held out for evaluation "
                     f"(eval_split={cfg.eval_split}), {len(run.train_examples)} to train on")
    lines.append(f"lowrank: {trainable_summary(run.model)}")
    rows = f"{len(run.packed_rows)} packed rows" if run.packed_rows is not None else \
        f"{len(run.train_examples)} examples"
    lines.append(f"lowrank: {run.total_steps} steps ({run.steps_per_epoch} per epoch over {rows}; "
                 f"batch_size {cfg.batch_size} x grad_accum {cfg.grad_accum} x {run.dist.world_size} "
                 f"process{'es' if run.dist.world_size > 1 else ''})")
    return lines


def step_line(row: dict, total: int) -> str:
    return (f"step {row['step']}/{total}: loss {row['loss']:.4f}, lr {row['lr']:.3g}, "
            f"grad_norm {row['grad_norm']:.4g}, {row['tokens_per_s']:.0f} tokens/s, epoch {row['epoch']:g}")


def eval_line(row: dict) -> str:
    if "eval_ppl" not in row:  # a preference objective: its rewards/... instead of a perplexity
        extra = "".join(f", {k[5:]} {v:.4g}" for k, v in row.items()
                        if k.startswith("eval_rewards/") and isinstance(v, (int, float)))
        return f"eval at step {row['step']}: loss {row['eval_loss']:.4f}{extra}"
    return f"eval at step {row['step']}: loss {row['eval_loss']:.4f}, perplexity {row['eval_ppl']:.4g}"


class RunLog:
    """metrics.jsonl (appended to: a resumed run's file was cut back to its checkpoint), the
    trackers of `report_to`, and the printed lines. Rank 0 only."""

    def __init__(self, cfg, out: Path, start: int, total: int, settings: dict):
        self.cfg, self.total = cfg, total
        self.trackers = open_trackers(cfg.report_to, Path(cfg.logging_dir or out / "runs"), start,
                                      name=out.resolve().name, settings=settings)
        self.file = open(out / "metrics.jsonl", "a", encoding="utf-8")

    def _write(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        for tracker in self.trackers:
            tracker.log(row)

    def train(self, row: dict) -> None:
        self._write(row)
        every = self.cfg.logging_steps
        if every and (row["step"] % every == 0 or row["step"] == self.total):
            say(step_line(row, self.total))

    def evaluation(self, row: dict) -> None:
        self._write(row)
        say(eval_line(row))

    def close(self) -> None:
        self.file.close()
        for tracker in self.trackers:
            tracker.close()


def summary_line(result, start: int, seconds: float) -> str:
    """The closing line of a run."""
    if not result.losses:
        return f"lowrank: nothing to train (the checkpoint is at step {result.steps}); saved {result.adapter}"
    loss = f"loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}"
    if result.eval_loss is not None:
        loss += f", eval loss {result.eval_loss:.4f} (ppl {math.exp(min(result.eval_loss, 700)):.2f})"
    resumed = f" (resumed at step {start})" if start else ""
    return (f"lowrank: {result.steps - start} steps{resumed} in {seconds:.1f} s, {loss}, "
            f"{result.tokens_per_s:.0f} tokens/s, peak {result.peak_mem_mb:.0f} MB; saved {result.adapter}")


def write_loss_plot(out: Path) -> None:
    """loss.png beside metrics.jsonl, when matplotlib is installed (nothing and no error otherwise)."""
    from .plot import have_matplotlib, plot_runs

    if have_matplotlib():
        plot_runs([out], out / "loss.png")
