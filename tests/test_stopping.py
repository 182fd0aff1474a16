"""Ctrl-C and SIGTERM: the run finishes its step, writes a checkpoint, says how to continue and
exits 130 / 143; --resume then ends exactly where the uninterrupted run ends. A second signal
stops at once."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import lowrank.train.loop as loop
from lowrank.train.state import latest_checkpoint
from lowrank.train.stopping import Stopped
from tests.train_helpers import adapter_tensors, cli_env, read_metrics, cli, tiny_model_dir, write_pretokenized


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("stopping")
    return tiny_model_dir(root / "model"), write_pretokenized(root / "data.jsonl", 13, seed=6)


def train_args(setup, output, *extra):
    model, data = setup
    # 3 steps per epoch; dropout exercises the per-step reseeding across the stop.
    return ["--model", model, "--data", data, "--output", output, "--r", "4", "--dropout", "0.1", "--batch-size", "3",
            "--grad-accum", "2", "--max-steps", "12", "--save-every", "5", "--lr", "5e-3", "--warmup-steps", "3",
            "--dtype", "float32", "--device", "cpu", "--no-progress", *extra]


def test_sigint_checkpoints_exits_130_and_resume_matches_the_uninterrupted_run(setup, tmp_path, monkeypatch,
                                                                                capsys):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    status, _, err = cli("lowrank.train", train_args(setup, straight), monkeypatch, capsys)
    assert status == 0, err

    cmd = [sys.executable, "-m", "lowrank.train", *map(str, train_args(setup, stopped))]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    metrics, deadline = stopped / "metrics.jsonl", time.monotonic() + 240
    while not (metrics.is_file() and metrics.read_text()) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)  # Ctrl-C as soon as the first step is logged
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err
    step = int(err.strip().splitlines()[-1].split("stopped at step ")[1].split(";")[0])
    assert err.strip().splitlines()[-1] == f"lowrank: stopped at step {step}; continue with --resume"
    assert "Traceback" not in err and 1 <= step < 12
    assert latest_checkpoint(stopped / "checkpoints").name == f"step-{step}"
    assert not (stopped / "adapter").exists()  # the run is not done
    assert [r["step"] for r in read_metrics(stopped)[0]] == list(range(1, step + 1))

    status, out, err = cli("lowrank.train", train_args(setup, stopped, "--resume"), monkeypatch, capsys)
    assert status == 0, err
    assert f"resumed at step {step}" in out
    rows_a, rows_b = read_metrics(straight)[0], read_metrics(stopped)[0]
    assert [r["step"] for r in rows_b] == list(range(1, 13))
    for a, b in zip(rows_a, rows_b):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=1e-9)
        assert b["lr"] == a["lr"] and b["trained_tokens"] == a["trained_tokens"]
    a, b = adapter_tensors(straight), adapter_tensors(stopped)
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0, msg=key)


def signalling(monkeypatch, at_step: int, signals):
    """train_step that sends this process `signals` during step `at_step` (1-based)."""
    real = loop.train_step

    def step(run, micro_batches, k):
        if k == at_step - 1:
            for s in signals:
                os.kill(os.getpid(), s)
        return real(run, micro_batches, k)

    monkeypatch.setattr(loop, "train_step", step)


def test_sigterm_finishes_the_step_and_exits_143(setup, tmp_path, monkeypatch, capsys):
    signalling(monkeypatch, 2, [signal.SIGTERM])
    status, out, err = cli("lowrank.train", train_args(setup, tmp_path / "out"), monkeypatch, capsys)
    assert status == 143
    assert err.strip() == "lowrank: stopped at step 2; continue with --resume"
    assert latest_checkpoint(tmp_path / "out" / "checkpoints").name == "step-2"
    assert len(read_metrics(tmp_path / "out")[0]) == 2
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are put back


def test_python_api_raises_stopped_after_the_checkpoint(setup, tmp_path, monkeypatch):
    model, data = setup
    signalling(monkeypatch, 3, [signal.SIGINT])
    with pytest.raises(Stopped) as stopped:
        loop.finetune(loop.TrainConfig(model=str(model), data=str(data), output=str(tmp_path / "out"), max_steps=6,
                                       progress=False, device="cpu"))
    assert (stopped.value.step, stopped.value.exit_status) == (3, 130)
    assert stopped.value.checkpoint == tmp_path / "out" / "checkpoints" / "step-3"
    assert isinstance(stopped.value, KeyboardInterrupt)  # a script that does not catch it ends as on Ctrl-C


def test_a_second_signal_stops_at_once(setup, tmp_path, monkeypatch, capsys):
    signalling(monkeypatch, 2, [signal.SIGINT, signal.SIGINT])
    status, out, err = cli("lowrank.train", train_args(setup, tmp_path / "out"), monkeypatch, capsys)
    assert status == 130
    assert err.strip() == "lowrank: interrupted; --resume continues from the newest checkpoint, if any"
    assert latest_checkpoint(tmp_path / "out" / "checkpoints") is None  # stopped inside step 2, before any save
    assert len(read_metrics(tmp_path / "out")[0]) == 1
