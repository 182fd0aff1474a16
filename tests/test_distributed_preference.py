"""Preference tuning under torchrun: two CPU processes (gloo) give the run of one process with the
same global batch, for DPO (its reference log-probabilities precomputed, the work shared out
over the ranks) killed while writing a checkpoint and resumed, and for the reference-free SimPO.

The step's loss is the mean over all of its pairs, as TRL normalises per pair: 9 training pairs
in micro-batches of 2 make micro-batches of 2, 2, 2, 2 and 1 pairs, two per step, so the third
step has one pair on rank 0 and nothing on rank 1 (step_share's stand-in): a mean of the ranks'
means (DDP averages gradients over ranks) would give it half its weight."""

import signal

import pytest
import torch

from lowrank.train.loop import TrainConfig, finetune
from lowrank.train.preference import METRICS  # TRL's names
from lowrank.train.state import latest_checkpoint
from tests.train_helpers import (adapter_tensors, cli_env, read_metrics, run_module, tiny_chat_model_dir,
                                 write_preference_records)
from tests.test_distributed import TORCHRUN


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp-preference")
    # 11 pairs, 2 held out for evaluation (one eval batch: rank 1 evaluates nothing)
    return tiny_chat_model_dir(root / "model", seed=5), write_preference_records(root / "pairs.jsonl", 11, seed=3)


def flags(settings: dict) -> list:
    args = []
    for key, value in settings.items():
        flag = "--lora-r" if key == "r" else f"--{key.replace('_', '-')}"  # torchrun would take --r
        args += [flag] if value is True else [flag, value]
    return args


def one_and_two(setup, tmp_path, crash_at: str | None = None, **settings):
    """(output of one process with 2 micro-batches a step, output of two with 1 each); with
    crash_at, the two-process run is SIGKILLed while writing that step's checkpoint, then resumed."""
    model, data = setup
    common = dict(method="lora", r=4, alpha=8.0, dropout=0.0, lr=1e-2, lr_scheduler="cosine", batch_size=2, seed=1,
                  dtype="float32", device="cpu", eval_split=0.2, **settings)
    finetune(TrainConfig(model=str(model), data=str(data), output=str(tmp_path / "one"), grad_accum=2,
                         progress=False, **common))
    args = ["--model", model, "--data", data, "--output", tmp_path / "two", "--grad-accum", "1", "--no-progress",
            *flags(common)]
    if crash_at:
        crashed = run_module("lowrank.train", args, cwd=tmp_path, launcher=TORCHRUN,
                             env=cli_env(LOWRANK_CRASH_IN_CHECKPOINT=crash_at))
        assert crashed.returncode != 0
        assert f"exitcode  : -{int(signal.SIGKILL)}" in crashed.stderr or "SIGKILL" in crashed.stderr, crashed.stderr
        kept = int(latest_checkpoint(tmp_path / "two" / "checkpoints").name.removeprefix("step-"))
        assert kept == int(crash_at) - settings["save_every"]
        args.append("--resume")
    done = run_module("lowrank.train", args, cwd=tmp_path, launcher=TORCHRUN)
    assert done.returncode == 0, done.stderr
    if crash_at:  # rank 0 alone reports
        assert done.stdout.count(f"lowrank: {settings['max_steps'] - kept} steps (resumed at step {kept})") == 1
    return tmp_path / "one", tmp_path / "two"


def assert_same_run(one, two, steps: int, eval_steps: list[int]):
    rows_one, rows_two = read_metrics(one)[0], read_metrics(two)[0]
    assert [r["step"] for r in rows_two] == [r["step"] for r in rows_one] == list(range(1, steps + 1))
    for a, b in zip(rows_one, rows_two):
        assert (b["pairs"], b["tokens"], b["trained_tokens"]) == (a["pairs"], a["tokens"], a["trained_tokens"])
        for key in ("loss", "grad_norm", *METRICS):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (b["step"], key)
    assert [r["pairs"] for r in rows_one[:3]] == [4, 4, 1]  # the third step: one pair, on rank 0 alone
    evals_one, evals_two = read_metrics(one)[1], read_metrics(two)[1]
    assert [r["step"] for r in evals_two] == [r["step"] for r in evals_one] == eval_steps
    for a, b in zip(evals_one, evals_two):
        for key in ("eval_loss", *(f"eval_{m}" for m in METRICS)):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (b["step"], key)
    a, b = adapter_tensors(one), adapter_tensors(two)
    assert set(a) == set(b)
    for key in a:
        assert not torch.equal(a[key], torch.zeros_like(a[key])) or "lora_B" not in key, key  # it trained
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-4, msg=key)


def test_dpo_two_processes_match_one_and_resume_after_sigkill(setup, tmp_path):
    one, two = one_and_two(setup, tmp_path, crash_at="4", objective="dpo", beta=0.2, precompute_ref=True,
                           max_steps=5, save_every=2, keep_checkpoints=0, eval_every=2)
    assert_same_run(one, two, 5, [2, 4, 5])


def test_simpo_two_processes_match_one(setup, tmp_path):
    one, two = one_and_two(setup, tmp_path, objective="simpo", beta=2.0, simpo_gamma=0.3, max_steps=4)
    assert_same_run(one, two, 4, [4])
