"""Loss curves: lowrank.train.plot reads metrics.jsonl's train and eval losses; `python -m lowrank.plot`
draws one panel per run into a PNG; without matplotlib a run writes no picture and no error, and
the plot command says what to install."""

import json
import sys

import pytest
import torch

from lowrank.train.plot import read_curves
from tests.train_helpers import cli, tiny_model_dir, write_pretokenized


def fake_run(folder, steps: int, seed: int):
    """A run folder whose metrics.jsonl has `steps` random train rows and an eval row every 3 steps."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for step in range(1, steps + 1):
        rows.append({"step": step, "loss": 3 + float(torch.rand((), generator=g)), "lr": 1e-4, "grad_norm": 1.0})
        if step % 3 == 0:
            rows.append({"step": step, "eval_loss": 2 + float(torch.rand((), generator=g)), "eval_ppl": 9.0})
    folder.mkdir()
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_read_curves(tmp_path):
    rows = fake_run(tmp_path / "a", 7, seed=1)
    curves = read_curves(tmp_path / "a")
    assert curves["loss"] == [(r["step"], r["loss"]) for r in rows if "loss" in r]
    assert curves["eval_loss"] == [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    assert [s for s, _ in curves["eval_loss"]] == [3, 6]


def test_plot_cli_draws_runs_side_by_side(tmp_path, monkeypatch, capsys):
    image = pytest.importorskip("matplotlib.image")
    fake_run(tmp_path / "a", 11, seed=2)
    fake_run(tmp_path / "b", 5, seed=3)
    for runs, name in (([tmp_path / "a"], "one.png"), ([tmp_path / "a", tmp_path / "b"], "two.png")):
        status, out, err = cli("lowrank.plot", [*runs, "--output", tmp_path / name], monkeypatch, capsys)
        assert status == 0, err
        assert out.strip() == f"wrote {tmp_path / name}"
    one, two = image.imread(tmp_path / "one.png"), image.imread(tmp_path / "two.png")
    assert one.shape[0] == two.shape[0] and two.shape[1] == 2 * one.shape[1]  # a panel per run, side by side
    assert one[..., :3].std() > 0.05  # something is drawn


def test_plot_cli_bad_folder_is_one_line(tmp_path, monkeypatch, capsys):
    status, out, err = cli("lowrank.plot", [tmp_path, "--output", tmp_path / "x.png"], monkeypatch, capsys)
    assert status == 2 and err.strip() == f"lowrank: error: {tmp_path / 'metrics.jsonl'}: no such file " \
                                          f"(is {tmp_path} a lowrank.train output folder?)"
    assert not (tmp_path / "x.png").exists()


def test_without_matplotlib_a_run_writes_no_picture_and_plot_says_why(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    model, data = tiny_model_dir(tmp_path / "model"), write_pretokenized(tmp_path / "data.jsonl", 5)
    status, out, err = cli("lowrank.train", ["--model", model, "--data", data, "--output", tmp_path / "run",
                                                 "--max-steps", "1", "--device", "cpu", "--no-progress"],
                               monkeypatch, capsys)
    assert status == 0, err
    assert (tmp_path / "run" / "metrics.jsonl").is_file() and not (tmp_path / "run" / "loss.png").exists()
    status, out, err = cli("lowrank.plot", [tmp_path / "run"], monkeypatch, capsys)
    assert status == 2 and err.strip() == 'lowrank: error: drawing loss curves needs matplotlib: ' \
                                          'pip install "lowrank[plot]"'
