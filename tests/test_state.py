"""Checkpoints and --resume: a run killed with SIGKILL halfway through writing a checkpoint,
then resumed, ends exactly where the uninterrupted run ends."""

import json
import signal
import tomllib

import pytest
import torch

from lowrank.errors import ConfigError
from lowrank.train.state import latest_checkpoint, prune_checkpoints, truncate_metrics
from lowrank.train.loop import TrainConfig, finetune
from tests.train_helpers import (adapter_tensors, cli_env, interrupted_run, read_metrics, run_module, tiny_model_dir,
                                 write_pretokenized)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    return root, tiny_model_dir(root / "model"), write_pretokenized(root / "data.jsonl", 13, seed=4)


def train_args(setup, output, *extra):
    _, model, data = setup
    # 13 examples / batch 3 = 5 micro-batches, 2 per step: 3 steps per epoch, so 6 steps cross an
    # epoch boundary (a new shuffle) and end each epoch on a short step. Dropout exercises the RNG.
    return ["--model", model, "--data", data, "--output", output, "--method", "lora", "--r", "4", "--dropout", "0.1",
            "--batch-size", "3", "--grad-accum", "2", "--max-steps", "6", "--save-every", "2", "--keep-checkpoints",
            "2", "--lr", "5e-3", "--lr-scheduler", "cosine", "--warmup-steps", "2", "--dtype", "float32",
            "--device", "cpu", "--no-progress", *extra]


def test_sigkill_while_writing_a_checkpoint_then_resume_matches_the_uninterrupted_run(setup, tmp_path):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    done = run_module("lowrank.train", train_args(setup, straight), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "lowrank: 6 steps" in done.stdout

    killed = run_module("lowrank.train", train_args(setup, crashed), cwd=tmp_path,
                        env=cli_env(LOWRANK_CRASH_IN_CHECKPOINT="4"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    checkpoints = crashed / "checkpoints"
    assert (checkpoints / "step-4.partial" / "trainable.safetensors").is_file()  # died mid-write
    assert latest_checkpoint(checkpoints).name == "step-2"
    assert not (crashed / "adapter").exists()

    resumed = run_module("lowrank.train", train_args(setup, crashed, "--resume"), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed at step 2" in resumed.stdout

    rows_a, rows_b = read_metrics(straight)[0], read_metrics(crashed)[0]
    assert [r["step"] for r in rows_b] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(rows_a, rows_b):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=1e-9)
        assert b["lr"] == a["lr"] and b["trained_tokens"] == a["trained_tokens"]
    a, b = adapter_tensors(straight), adapter_tensors(crashed)
    assert set(a) == set(b) and len(a) == 2 * 7 * 2  # A and B of 7 projections in 2 layers
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0, msg=key)
    # --keep-checkpoints 2 pruned step-2; the stale .partial folder was cleared by the next write.
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-4", "step-6"]
    run_toml = (crashed / "run.toml").read_text()
    assert "resume = true" in run_toml and "batch_size = 3" in run_toml


@pytest.mark.parametrize("method", ["full", "prefix"])
def test_resume_through_the_python_api_matches(setup, tmp_path, monkeypatch, method):
    root, model, data = setup
    base = dict(model=str(model), data=str(data), method=method, batch_size=4, max_steps=5, lr=3e-3,
                lr_scheduler="linear", save_every=3, progress=False, device="cpu", dtype="float32", seed=7)
    straight = finetune(TrainConfig(output=str(tmp_path / "a"), **base))

    # Ctrl-C as step 5 starts, after checkpoint step-3
    interrupted_run(monkeypatch, lambda: finetune(TrainConfig(output=str(tmp_path / "b"), **base)), at_step=4)
    assert latest_checkpoint(tmp_path / "b" / "checkpoints").name == "step-3"
    resumed = finetune(TrainConfig(output=str(tmp_path / "b"), resume=True, **base))

    assert resumed.losses == pytest.approx(straight.losses[3:], rel=1e-6)
    assert [r["loss"] for r in read_metrics(tmp_path / "b")[0]] == pytest.approx(straight.losses, rel=1e-6)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0, msg=key)


def test_existing_checkpoints_need_resume_and_the_same_batches(setup, tmp_path):
    root, model, data = setup
    base = dict(model=str(model), data=str(data), output=str(tmp_path / "out"), method="lora", batch_size=4,
                max_steps=2, progress=False, device="cpu")
    finetune(TrainConfig(**base))
    assert tomllib.loads((tmp_path / "out" / "run.toml").read_text())["lr"] == 2e-4  # LoRA's default, written out
    listing = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*")}
    with pytest.raises(ConfigError, match="holds checkpoints of an earlier run; pass --resume"):
        finetune(TrainConfig(**base))
    with pytest.raises(ConfigError, match="batch_size=4, this run has batch_size=3"):
        finetune(TrainConfig(**dict(base, batch_size=3, resume=True)))
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*")} == listing


def test_checkpoint_folder_rules(tmp_path):
    for step in (2, 4, 6, 8):
        (tmp_path / f"step-{step}").mkdir()
        (tmp_path / f"step-{step}" / "state.json").write_text("{}")
    (tmp_path / "step-10.partial").mkdir()  # a write that never finished
    (tmp_path / "step-12").mkdir()  # no state.json: not a checkpoint
    assert latest_checkpoint(tmp_path).name == "step-8"
    prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir() if (p / "state.json").exists()) == ["step-6", "step-8"]
    assert (tmp_path / "step-10.partial").exists()

    metrics = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 1.0 / s} for s in range(1, 6)] + [{"step": 4, "eval_loss": 2.0}]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "lo')  # torn last line
    truncate_metrics(metrics, 4)
    kept = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert kept == [r for r in rows if r["step"] <= 4]


def test_step_checkpoints_hold_a_peft_adapter_peft_loads(setup, tmp_path):
    """checkpoints/step-N/ is a PEFT adapter folder too: PeftModel.from_pretrained loads it with
    logits equal to lowrank's, its weights are the checkpoint's, and --init-adapter takes it."""
    import peft
    from transformers import AutoModelForCausalLM

    import lowrank
    from lowrank.train.loop import build_run
    from safetensors.torch import load_file

    root, model, data = setup
    finetune(TrainConfig(model=str(model), data=str(data), output=str(tmp_path / "out"), r=4, batch_size=3,
                         max_steps=4, save_every=2, lr=1e-2, progress=False, device="cpu"))
    step2 = tmp_path / "out" / "checkpoints" / "step-2"
    ids = torch.randint(0, 257, (2, 11), generator=torch.Generator().manual_seed(3))
    ours = lowrank.load_adapter(lowrank.load_model(model).eval(), step2)
    hf = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32), step2).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    trained = load_file(str(step2 / "trainable.safetensors"))
    state = ours.state_dict()
    assert trained and all(torch.equal(state[k], v) for k, v in trained.items())
    lora_b = [v for k, v in trained.items() if "lora_B" in k]
    assert all(v.abs().sum() > 0 for v in lora_b)  # trained: B has left zero
    # --init-adapter step-2: the run starts from the checkpoint's weights.
    run = build_run(TrainConfig(model=str(model), data=str(data), output=str(tmp_path / "next"),
                                init_adapter=str(step2), progress=False, device="cpu"))
    state = run.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in trained.items())


def test_freeze_step_checkpoints_are_model_folders_transformers_loads(setup, tmp_path):
    from transformers import AutoModelForCausalLM

    import lowrank

    root, model, data = setup
    finetune(TrainConfig(model=str(model), data=str(data), output=str(tmp_path / "out"), method="freeze",
                         trainable_layers=1, batch_size=3, max_steps=2, save_every=1, lr=1e-2, progress=False,
                         device="cpu"))
    step1 = tmp_path / "out" / "checkpoints" / "step-1"
    ids = torch.randint(0, 257, (2, 9), generator=torch.Generator().manual_seed(4))
    ours, base = lowrank.load_model(step1).eval(), lowrank.load_model(model).eval()
    hf = AutoModelForCausalLM.from_pretrained(step1, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(ours(ids), base(ids))  # step 1's weights, not the base's
