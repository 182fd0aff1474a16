"""--report-to tensorboard / wandb: the scalars each tracker holds, read back with its own reader
(TensorBoard's EventAccumulator; wandb's offline run file through wandb's protobuf), equal the
rows of metrics.jsonl step for step, under transformers' Trainer names; a tracker whose optional
extra is missing is a one-line error before anything is written."""

import json
import struct

import pytest

from lowrank.train import trackers
from tests.train_helpers import read_metrics, cli, tiny_model_dir, write_pretokenized

# metrics.jsonl key -> the name transformers' Trainer logs it under
TRAINER_NAMES = {"loss": "train/loss", "lr": "train/learning_rate", "grad_norm": "train/grad_norm",
                 "epoch": "train/epoch", "eval_loss": "eval/loss"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("trackers")
    return tiny_model_dir(root / "model"), write_pretokenized(root / "data.jsonl", 11, seed=3)


def train(setup, output, monkeypatch, capsys, *extra):
    model, data = setup
    return cli("lowrank.train", ["--model", model, "--data", data, "--output", output, "--batch-size", "3",
                                     "--max-steps", "4", "--eval-split", "0.25", "--eval-every", "2", "--lr", "1e-2",
                                     "--device", "cpu", "--no-progress", *extra], monkeypatch, capsys)


def expected_scalars(output) -> dict[str, dict[int, float]]:
    """{tracker name: {step: value}} from metrics.jsonl, every numeric key."""
    rows, evals = read_metrics(output)
    out = {}
    for row in rows + evals:
        for key, value in row.items():
            if key != "step":
                out.setdefault(trackers.tracker_name(key), {})[row["step"]] = float(value)
    return out


def test_tensorboard_scalars_equal_metrics_jsonl(setup, tmp_path, monkeypatch, capsys):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output = tmp_path / "run"
    status, out, err = train(setup, output, monkeypatch, capsys, "--report-to", "tensorboard")
    assert status == 0, err
    events = EventAccumulator(str(output / "runs"), size_guidance={"scalars": 0})
    events.Reload()
    expected = expected_scalars(output)
    assert set(TRAINER_NAMES.values()) <= set(expected)
    assert sorted(events.Tags()["scalars"]) == sorted(expected)
    for name, by_step in expected.items():
        got = {e.step: e.value for e in events.Scalars(name)}
        assert got == pytest.approx(by_step, rel=1e-6), name  # TensorBoard stores float32
    assert sorted(expected["train/loss"]) == [1, 2, 3, 4] and sorted(expected["eval/loss"]) == [2, 4]
    # --logging-steps 0 (the default): no step lines, but each evaluation is printed.
    assert not [line for line in out.splitlines() if line.startswith("step ")]
    assert len([line for line in out.splitlines() if line.startswith("eval at step ")]) == 2


def wandb_history(run_file) -> dict[int, dict[str, float]]:
    """{step: {name: value}} of an offline wandb run file: LevelDB-style log blocks of wandb Records."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, record, out = run_file.read_bytes(), 7, b"", {}  # 7: the ":W&B" header, version, magic
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a record header is padding
            pos += 32768 - pos % 32768
            continue
        _, size, kind = struct.unpack("<IHB", data[pos:pos + 7])
        record += data[pos + 7:pos + 7 + size]
        pos += 7 + size
        if kind in (1, 4):  # FULL or LAST: a whole record
            r = pb.Record()
            r.ParseFromString(record)
            record = b""
            if r.WhichOneof("record_type") == "history":
                items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
                out.setdefault(r.history.step.num, {}).update(
                    {k: v for k, v in items.items() if not k.startswith("_")})
    return out


def test_wandb_offline_history_equals_metrics_jsonl(setup, tmp_path, monkeypatch, capsys):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    output = tmp_path / "run"
    status, out, err = train(setup, output, monkeypatch, capsys, "--report-to", "wandb", "--logging-dir",
                             tmp_path / "logs")
    assert status == 0, err
    run_files = list((tmp_path / "logs" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 1
    history = wandb_history(run_files[0])
    expected = expected_scalars(output)
    assert history == {step: {name: pytest.approx(by_step[step], rel=1e-12) for name, by_step in expected.items()
                              if step in by_step} for step in range(1, 5)}


@pytest.mark.parametrize("tracker", ["tensorboard", "wandb"])
def test_missing_extra_is_one_line_and_writes_nothing(setup, tmp_path, monkeypatch, capsys, tracker):
    monkeypatch.setitem(trackers.PACKAGES, tracker, "lowrank_test_not_installed")
    status, out, err = train(setup, tmp_path / "run", monkeypatch, capsys, "--report-to", tracker)
    assert status == 2
    assert err.strip() == (f"lowrank: error: report_to={tracker!r}: lowrank_test_not_installed is not installed; "
                           f'pip install "lowrank[{tracker}]"')
    assert not (tmp_path / "run").exists()
