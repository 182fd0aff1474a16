"""What a training run loads before its first step: the tokenizer, the examples, the model
with its method applied, and the compute precision. Used by lowrank.train.loop.build_run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..data.batching import IndexGroups, pack_lengths
from ..data.cache import default_cache_dir
from ..data.dataset import load_dataset
from ..data.examples import Examples, example_lengths
from ..data.preference import load_preference_dataset
from ..errors import CheckpointError, ConfigError, DataError
from ..files import missing_folder_message
from .config import TrainConfig


def apply_method(model, cfg: TrainConfig) -> None:
    """Make the parameters of `cfg.method` trainable and freeze the rest."""
    if cfg.method in ("freeze", "full"):
        from ..models.quantized import quantized_modules

        if quantized := quantized_modules(model):
            raise ConfigError(f"{cfg.model}: {quantized[0][0]} (and every quantised layer) is stored quantised, "
                              f"which method={cfg.method!r} cannot train; use method='lora' (QLoRA) or 'prefix', "
                              "or the unquantised model")
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif cfg.method == "lora":
        from ..adapters.lora import LoraConfig, apply_lora
        from ..adapters.peft_format import load_adapter

        if cfg.init_adapter:
            load_adapter(model, cfg.init_adapter, trainable=True)  # its config sets r, alpha and targets
        else:
            targets = cfg.target_modules
            # "all-linear" (every linear layer of the decoder layers) is LoraConfig's own keyword.
            targets = targets[0] if targets == ["all-linear"] else list(targets)
            apply_lora(model, LoraConfig(r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, target_modules=targets,
                                         use_rslora=cfg.use_rslora))
    elif cfg.method == "prefix":
        from ..adapters.prefix import PrefixConfig, apply_prefix

        apply_prefix(model, PrefixConfig(num_virtual_tokens=cfg.num_virtual_tokens, projection=cfg.prefix_projection))
    elif cfg.method == "freeze":
        from ..adapters.freeze import FreezeConfig, apply_freeze

        apply_freeze(model, FreezeConfig(trainable_layers=cfg.trainable_layers,
                                         trainable_modules=cfg.trainable_modules))


def autocast_dtype_for(choice: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a `dtype` setting on `device`; None runs in fp32 without autocast."""
    if choice == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[choice]


def forward_autocast(run):
    """Autocast for a run's forwards (a no-op without one). Only forwards: a backward under
    autocast would recast the matmuls of custom backwards (frozen_linear's fp32 dx) to half
    precision, against PyTorch's advice."""
    return torch.autocast(run.device.type, dtype=run.autocast_dtype, enabled=run.autocast_dtype is not None)


class _VocabOnly:
    """Stands in for a tokenizer when the model folder has none: enough for pre-tokenized data."""

    pad_token_id = None

    def __init__(self, vocab_size: int, folder: str):
        self.vocab_size, self.folder = vocab_size, folder

    def __len__(self):
        return self.vocab_size

    def apply_chat_template(self, *args, **kwargs):
        raise DataError(f"a text record needs a tokenizer, and {self.folder} has none (give --tokenizer, or "
                        "pre-tokenized records with input_ids)")

    encode = apply_chat_template  # {"text": ...} records need one too


def load_tokenizer_for(cfg: TrainConfig):
    """The tokenizer of --tokenizer or the model folder; a vocabulary-size stand-in when the model
    folder has no tokenizer files (enough for pre-tokenized data)."""
    from ..models import read_config
    from ..data.tokenizer import load_tokenizer

    folder = Path(cfg.tokenizer or cfg.model)
    if not Path(cfg.model).is_dir():
        raise CheckpointError(missing_folder_message(cfg.model))
    names = ("tokenizer.json", "vocab.json", "tokenizer.model")
    if cfg.tokenizer is None and not any((folder / n).is_file() for n in names):
        return _VocabOnly(read_config(cfg.model).vocab_size, str(folder))
    return load_tokenizer(folder, chat_template=cfg.chat_template)


def check_max_len(cfg: TrainConfig) -> None:
    """max_len within the model's max_position_embeddings: longer rows use positions the model never
    saw, and a packed row that long asked for a terabyte-sized attention mask."""
    from ..models import read_config

    limit = read_config(cfg.model).max_position_embeddings
    if cfg.max_len > limit:
        raise ConfigError(f"max_len={cfg.max_len} is above the model's max_position_embeddings={limit} "
                          f"({Path(cfg.model) / 'config.json'}); use --max-len {limit} or less")


def load_examples(cfg: TrainConfig, tokenizer) -> tuple[Examples, Examples, list]:
    """(training examples, eval examples, the DataReport of each file read): --eval-data, or an
    eval_split held out by a seeded draw. With a preference objective the examples are plain lists
    of chosen / rejected pair dicts (data/preference.py; no token cache) and the reports are the
    PreferenceReports."""
    if cfg.objective != "sft":
        return _load_preference_examples(cfg, tokenizer)
    cache_dir = None if cfg.data_cache == "off" else default_cache_dir() if cfg.data_cache == "auto" else cfg.data_cache
    kw = dict(train_on=cfg.train_on, replacements=cfg.replacements or None, system=cfg.system, cache_dir=cache_dir,
              chat_template_kwargs=None if cfg.enable_thinking is None else {"enable_thinking": cfg.enable_thinking})
    train, report = load_dataset(cfg.data, tokenizer, cfg.max_len, **kw)
    if cfg.eval_data:
        evals, eval_report = load_dataset(cfg.eval_data, tokenizer, cfg.max_len, **kw)
        return train, evals, [report, eval_report]
    if not cfg.eval_split:
        return train, train.subset([]), [report]
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed))
    n_eval = max(1, round(cfg.eval_split * len(train)))
    if n_eval >= len(train):
        raise ConfigError(f"eval_split={cfg.eval_split} leaves no training example of {len(train)}")
    held = np.zeros(len(train), dtype=bool)
    held[order[:n_eval].numpy()] = True
    return train.subset(np.flatnonzero(~held)), train.subset(np.flatnonzero(held)), [report]


def _load_preference_examples(cfg: TrainConfig, tokenizer) -> tuple[list[dict], list[dict], list]:
    """load_examples for dpo / orpo / simpo: lists of pair dicts, split as the SFT examples are."""
    kw = dict(replacements=cfg.replacements or None, system=cfg.system)
    train, report = load_preference_dataset(cfg.data, tokenizer, cfg.max_len, **kw)
    reports = [] if report is None else [report]
    if cfg.eval_data:
        evals, eval_report = load_preference_dataset(cfg.eval_data, tokenizer, cfg.max_len, **kw)
        return train, evals, reports + ([] if eval_report is None else [eval_report])
    if not cfg.eval_split:
        return train, [], reports
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    n_eval = max(1, round(cfg.eval_split * len(train)))
    if n_eval >= len(train):
        raise ConfigError(f"eval_split={cfg.eval_split} leaves no training example of {len(train)}")
    held = set(order[:n_eval])
    return [e for i, e in enumerate(train) if i not in held], [train[i] for i in sorted(held)], reports


def pack_rows(examples, cfg: TrainConfig) -> IndexGroups:
    """Example indices of each packed row, packed once per run in a seeded order (see epoch_batches)."""
    order = np.arange(len(examples))
    if cfg.shuffle:
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(cfg.seed)).numpy()
    rows = pack_lengths(example_lengths(examples)[order], cfg.max_len)
    return IndexGroups(order[rows.flat], rows.bounds)
