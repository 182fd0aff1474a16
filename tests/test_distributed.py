"""Data parallelism: two CPU processes under torchrun (gloo) give the run of one process with the
same global batch, also when the last step of an epoch leaves one rank without a micro-batch,
and a two-process run killed while writing a checkpoint resumes to the same result."""

import signal
from types import SimpleNamespace

import pytest
import torch

from lowrank.train.distributed import DistInfo
from lowrank.train.loss import IGNORE_INDEX
from lowrank.train.state import latest_checkpoint
from lowrank.train.loop import TrainConfig, finetune, step_share
from tests.train_helpers import adapter_tensors, cli_env, read_metrics, run_module, tiny_model_dir, write_pretokenized

TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def fake_run(grad_accum, world_size, rank):
    return SimpleNamespace(config=SimpleNamespace(grad_accum=grad_accum), dist=DistInfo(rank, world_size))


def test_ranks_share_out_exactly_the_micro_batches_of_one_process():
    batches = [{"input_ids": torch.full((2, 3), i), "labels": torch.full((2, 3), i)} for i in range(7)]
    for k in range(3):  # 7 micro-batches, 3 per step: the last step has one
        single = step_share(fake_run(3, 1, 0), batches, k)
        shares = [step_share(fake_run(1, 3, r), batches, k) for r in range(3)]
        real = [b for share in shares for b in share if (b["labels"] != IGNORE_INDEX).any()]
        assert sorted(int(b["input_ids"][0, 0]) for b in real) == [int(b["input_ids"][0, 0]) for b in single]
        assert all(len(share) == 1 for share in shares)  # every rank joins the all-reduce
    empty = step_share(fake_run(1, 3, 2), batches, 2)[0]
    assert (empty["labels"] == IGNORE_INDEX).all() and torch.equal(empty["input_ids"], batches[6]["input_ids"])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    # 11 examples, 2 held out for evaluation, 9 / batch 2 = 5 micro-batches, 2 per step: the third
    # step has one, rank 1 none.
    return root, tiny_model_dir(root / "model"), write_pretokenized(root / "data.jsonl", 11, seed=6)


def test_two_processes_match_one_and_resume_after_sigkill(setup, tmp_path):
    root, model, data = setup
    common = dict(method="lora", r=4, dropout=0.0, lr=5e-3, lr_scheduler="cosine", max_steps=6, save_every=2,
                  keep_checkpoints=0, batch_size=2, seed=3, dtype="float32", device="cpu", eval_split=0.2, eval_every=3)
    one = finetune(TrainConfig(model=str(model), data=str(data), output=str(tmp_path / "one"), grad_accum=2,
                               progress=False, **common))

    args = ["--model", model, "--data", data, "--output", tmp_path / "two", "--grad-accum", "1", "--no-progress"]
    for key, value in common.items():
        args += ["--lora-r" if key == "r" else f"--{key.replace('_', '-')}", value]  # torchrun would take --r
    crashed = run_module("lowrank.train", args, cwd=tmp_path, launcher=TORCHRUN,
                         env=cli_env(LOWRANK_CRASH_IN_CHECKPOINT="4"))
    assert crashed.returncode != 0
    assert f"exitcode  : -{int(signal.SIGKILL)}" in crashed.stderr or "SIGKILL" in crashed.stderr, crashed.stderr
    assert latest_checkpoint(tmp_path / "two" / "checkpoints").name == "step-2"

    resumed = run_module("lowrank.train", args + ["--resume"], cwd=tmp_path, launcher=TORCHRUN)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.count("lowrank: 4 steps (resumed at step 2)") == 1  # rank 0 alone reports

    rows_one, rows_two = read_metrics(tmp_path / "one")[0], read_metrics(tmp_path / "two")[0]
    assert [r["step"] for r in rows_two] == list(range(1, 7))
    for a, b in zip(rows_one, rows_two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert (b["tokens"], b["trained_tokens"]) == (a["tokens"], a["trained_tokens"])  # global counts
    evals_one, evals_two = read_metrics(tmp_path / "one")[1], read_metrics(tmp_path / "two")[1]
    assert [r["step"] for r in evals_two] == [3, 6]  # the eval batches are shared out over the ranks
    for a, b in zip(evals_one, evals_two):
        assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-5)
    a, b = adapter_tensors(tmp_path / "one"), adapter_tensors(tmp_path / "two")
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-4, msg=key)
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == ["step-2", "step-4", "step-6"]
