"""What python -m lowrank.train prints: what the data became (counted here from the untruncated
examples), PEFT's trainable-parameter line (peft's own print_trainable_parameters on the same
checkpoint), a log line every --logging-steps steps and every evaluation, with metrics.jsonl's
numbers."""

import re

import pytest
import torch

import lowrank
from tests.conftest import DATA, FIXTURES
from tests.train_helpers import read_metrics, cli, tiny_model_dir

QWEN = FIXTURES / "tokenizers" / "qwen2.5-instruct"
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    """A tiny tied Qwen2.5 with the real tokenizer's vocabulary, so text records train on it."""
    return tiny_model_dir(tmp_path_factory.mktemp("report") / "model", hidden_size=32, num_attention_heads=2,
                          num_key_value_heads=1, intermediate_size=48, vocab_size=151936)


def expected_data_counts(max_len: int) -> tuple[int, int, int]:
    """(kept, cut, skipped) of huanhuan-100 at max_len, from its untruncated examples: an example is
    cut when longer than max_len, and skipped when none of its first max_len tokens is trained."""
    full, _ = lowrank.load_dataset(DATA / "huanhuan-100.json", lowrank.load_tokenizer(QWEN), max_len=1 << 14)
    assert len(full) == 100
    cut = sum(len(e["input_ids"]) > max_len for e in full)
    skipped = sum(not any(label != -100 for label in e["labels"][1:max_len]) for e in full)
    return 100 - skipped, cut, skipped


def peft_trainable_line(model_dir, capsys) -> str:
    import peft
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=SEVEN))
    capsys.readouterr()
    pm.print_trainable_parameters()
    return capsys.readouterr().out.strip()


def test_start_lines_log_lines_and_eval_lines(text_model, tmp_path, monkeypatch, capsys):
    peft_line = peft_trainable_line(text_model, capsys)
    kept, cut, skipped = expected_data_counts(48)
    assert cut and skipped  # the case: most of huanhuan-100 is longer than 48 tokens
    out_dir = tmp_path / "run"
    status, out, err = cli("lowrank.train", [
        "--model", text_model, "--tokenizer", QWEN, "--data", DATA / "huanhuan-100.json", "--output", out_dir,
        "--max-len", "48", "--eval-split", "0.1", "--eval-every", "3", "--max-steps", "4", "--logging-steps", "2",
        "--batch-size", "5", "--device", "cpu", "--no-progress"], monkeypatch, capsys)
    assert status == 0, err
    lines = out.splitlines()

    data = [line for line in lines if line.startswith("lowrank: data: ")]
    assert data[0] == (f"lowrank: data: {DATA / 'huanhuan-100.json'}: 100 records -> {kept} examples ({cut} cut at "
                       f"max_len=48, {skipped} skipped: no trained token within max_len=48), "
                       f"{data[0].split('), ')[1]}")
    n_eval = round(0.1 * kept)
    assert data[1] == (f"lowrank: data: {n_eval} examples held out for evaluation (eval_split=0.1), "
                       f"{kept - n_eval} to train on")
    assert f"lowrank: {peft_line}" in lines

    train_rows, eval_rows = read_metrics(out_dir)
    logged = [line for line in lines if line.startswith("step ")]
    assert [int(re.match(r"step (\d+)/4:", line).group(1)) for line in logged] == [2, 4]
    for line, row in zip(logged, (train_rows[1], train_rows[3])):
        assert f"loss {row['loss']:.4f}, lr {row['lr']:.3g}, grad_norm {row['grad_norm']:.4g}" in line
    evals = [line for line in lines if line.startswith("eval at step ")]
    assert [row["step"] for row in eval_rows] == [3, 4]
    assert evals == [f"eval at step {r['step']}: loss {r['eval_loss']:.4f}, perplexity {r['eval_ppl']:.4g}"
                     for r in eval_rows]
    # Printed in the order they happen: the step-3 evaluation between the step-2 and step-4 lines.
    assert lines.index(logged[0]) < lines.index(evals[0]) < lines.index(logged[1]) < lines.index(evals[1])
    # At the end, the loss curve beside metrics.jsonl (matplotlib is in the test extra).
    assert (out_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

