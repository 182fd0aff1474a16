"""Helpers shared by the training tests: tiny checkpoints, pre-tokenized data, CLI runs.

Checkpoints are built with lowrank itself (no transformers import) from a real config shrunk by
conftest.shrink; data is pre-tokenized JSONL over that tiny vocabulary, with a masked prompt
of random length in every record, so micro-batches carry unequal numbers of trained tokens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from lowrank.models.checkpoint import save_model
from lowrank.models import build_model, config_from_dict
from tests.conftest import ROOT, randomize_, real_config, shrink

VOCAB = 257


def tiny_model_dir(folder, name: str = "Qwen2.5-0.5B-Instruct", seed: int = 0, **overrides) -> Path:
    """A random tiny checkpoint shaped like `name` (2 layers, vocab 257), saved with save_model."""
    config = shrink(real_config(name))
    config.update(overrides)
    torch.manual_seed(seed)
    model = randomize_(build_model(config_from_dict(config)), seed)
    return save_model(model, folder)


def write_pretokenized(path, n: int, seed: int = 0, min_len: int = 5, max_len: int = 23) -> Path:
    """n records {"input_ids", "labels"}: random ids, the first 1..len-2 labels masked with -100."""
    g = torch.Generator().manual_seed(seed)
    lines = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        ids = torch.randint(0, VOCAB, (length,), generator=g).tolist()
        prompt = int(torch.randint(1, length - 1, (1,), generator=g))
        lines.append(json.dumps({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]}))
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    return path


def read_metrics(output) -> tuple[list[dict], list[dict]]:
    """(training rows, eval rows) of an output folder's metrics.jsonl."""
    rows = [json.loads(line) for line in (Path(output) / "metrics.jsonl").read_text().splitlines() if line]
    return [r for r in rows if "loss" in r], [r for r in rows if "eval_loss" in r]


def adapter_tensors(output) -> dict[str, torch.Tensor]:
    return load_file(str(Path(output) / "adapter" / "adapter_model.safetensors"))


def cli_env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    env.pop("LOWRANK_CRASH_IN_CHECKPOINT", None) if "LOWRANK_CRASH_IN_CHECKPOINT" not in extra else None
    return env


def run_module(module: str, args: list[str], cwd, env: dict | None = None, launcher: list[str] | None = None,
               timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m module args` (or `launcher ... -m module args`) in cwd, outside the repository, so
    the installed lowrank is the one imported."""
    cmd = [sys.executable, *(launcher or []), "-m", module, *map(str, args)]
    assert Path(cwd).resolve() != ROOT
    return subprocess.run(cmd, cwd=cwd, env=env or cli_env(), capture_output=True, text=True, timeout=timeout)


def cli(module, args, monkeypatch, capsys, stdin: str | None = None):
    """(exit status, stdout, stderr) of `python -m module args`, run in this process by runpy;
    `stdin` is piped in as text."""
    import io
    import runpy

    import pytest

    monkeypatch.setattr(sys, "argv", [module, *map(str, args)])
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def copy_tokenizer(folder, name: str = "qwen2.5-instruct-tokenizer-json") -> Path:
    """Put the real tokenizer files of shared/fixtures/tokenizers/<name> into a model folder."""
    import shutil

    from tests.conftest import FIXTURES

    for f in (FIXTURES / "tokenizers" / name).iterdir():
        shutil.copy2(f, Path(folder) / f.name)
    return Path(folder)


def interrupted_run(monkeypatch, finetune_call, at_step: int):
    """Run `finetune_call()` with a KeyboardInterrupt raised as step `at_step` (0-based) starts,
    as a bare Ctrl-C would; train_step is restored afterwards."""
    import pytest

    import lowrank.train.loop as training

    real = training.train_step

    def interrupted(run, micro_batches, step):
        if step == at_step:
            raise KeyboardInterrupt
        return real(run, micro_batches, step)

    monkeypatch.setattr(training, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        finetune_call()
    monkeypatch.setattr(training, "train_step", real)


def tiny_chat_model_dir(folder, name: str = "Qwen2.5-0.5B-Instruct", seed: int = 0, **overrides) -> Path:
    """tiny_model_dir with a real tokenizer beside it: the quickstart's 1,024-id byte-level BPE and
    ChatML template, so text records (chat templates, answer masks) train it."""
    from lowrank.train.quickstart import save_tokenizer

    vocab = save_tokenizer(folder).get_vocab_size()
    return tiny_model_dir(folder, name, seed, **{"vocab_size": vocab, **overrides})


WORDS = ("I am an assistant made by the lowrank team who are you hello what can do help me "
         "with questions answer the model name is trained on data").split()


def write_preference_records(path, n: int, seed: int = 0, fmt: str = "trl") -> Path:
    """n preference records of random words (prompts of 2-9 words, answers of 1-12), in the TRL
    format {"prompt", "chosen", "rejected"} ("trl"), TRL's conversational one ("trl_messages"),
    LLaMA-Factory's alpaca ("alpaca") or sharegpt ("sharegpt") one."""
    g = torch.Generator().manual_seed(seed)

    def text(lo, hi):
        k = int(torch.randint(lo, hi + 1, (1,), generator=g))
        return " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (k,), generator=g).tolist())

    records = []
    for _ in range(n):
        prompt, chosen, rejected = text(2, 9), text(1, 12), text(1, 12)
        if fmt == "trl":
            records.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        elif fmt == "trl_messages":
            records.append({"prompt": [{"role": "user", "content": prompt}],
                            "chosen": [{"role": "assistant", "content": chosen}],
                            "rejected": [{"role": "assistant", "content": rejected}]})
        elif fmt == "alpaca":
            records.append({"instruction": prompt, "input": "", "chosen": chosen, "rejected": rejected})
        else:
            records.append({"conversations": [{"from": "human", "value": prompt}],
                            "chosen": {"from": "gpt", "value": chosen}, "rejected": {"from": "gpt", "value": rejected}})
    path = Path(path)
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path
