"""QLoRA under torchrun: two CPU processes (gloo) training LoRA on an NF4 base give the losses and
the adapter of one process with the same global batch. Every rank quantises the same checkpoint
itself; only the adapter's gradients are all-reduced."""

import pytest
import torch

from lowrank.train.loop import TrainConfig, finetune
from tests.test_distributed import TORCHRUN
from tests.train_helpers import adapter_tensors, read_metrics, run_module, tiny_model_dir, write_pretokenized


def test_two_processes_on_an_nf4_base_match_one(tmp_path):
    model = tiny_model_dir(tmp_path / "model", "Qwen2.5-7B-Instruct", seed=5)
    # 9 examples / batch 2 = 5 micro-batches, 2 per step: the third step has one, rank 1 none.
    data = write_pretokenized(tmp_path / "data.jsonl", 9, seed=12)
    common = dict(method="lora", quantize="nf4", r=4, dropout=0.0, lr=1e-2, lr_scheduler="constant", max_steps=3,
                  batch_size=2, seed=2, dtype="float32", device="cpu")
    one = finetune(TrainConfig(model=str(model), data=str(data), output=str(tmp_path / "one"), grad_accum=2,
                               progress=False, **common))

    args = ["--model", model, "--data", data, "--output", tmp_path / "two", "--grad-accum", "1", "--no-progress"]
    for key, value in common.items():
        args += ["--lora-r" if key == "r" else f"--{key.replace('_', '-')}", value]  # torchrun would take --r
    two = run_module("lowrank.train", args, cwd=tmp_path, launcher=TORCHRUN)
    assert two.returncode == 0, two.stderr

    rows_one, rows_two = read_metrics(tmp_path / "one")[0], read_metrics(tmp_path / "two")[0]
    assert [r["step"] for r in rows_two] == [1, 2, 3] and one.losses[0] != one.losses[-1]
    for a, b in zip(rows_one, rows_two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert (b["tokens"], b["trained_tokens"]) == (a["tokens"], a["trained_tokens"])
    a, b = adapter_tensors(tmp_path / "one"), adapter_tensors(tmp_path / "two")
    assert set(a) == set(b) and len(a) == 2 * 7 * 2  # A and B of 7 projections in 2 layers
    # Adam divides by the gradient's own size, so where a gradient is near zero the fp32 rounding of
    # a different summation order (two ranks' shares, then the all-reduce) moves a weight by a share
    # of lr: hence atol lr/100. A lost or doubled micro-batch moves most of them by about lr.
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=common["lr"] / 100, rtol=1e-4, msg=key)
