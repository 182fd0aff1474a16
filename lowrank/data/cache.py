"""The token cache: a data file tokenised once, memory-mapped by every later run and every rank.

A cache entry is a folder ``<cache dir>/<file stem>-<key>/`` holding the arrays of
`lowrank.data.examples` as raw files and ``meta.json`` (the key's inputs, each array's length,
the DataReport). The key hashes everything that changes the examples: the data file's bytes and
suffix, the tokenizer (its files, added tokens, chat template and special tokens), max_len,
train_on, replacements, system, and CACHE_VERSION (raised whenever the way examples are made
changes). A changed file or option is another key, so it misses.

Writes are atomic: an entry is built in a hidden temporary folder beside its final name and
renamed into place when complete, so a crash mid-write leaves nothing a later run trusts. What
it does leave, a ``.<entry>.tmp-<pid>-<random>`` folder, is removed by the next build in the same
cache folder once nothing in it has been written for STALE_AFTER seconds. Age, not the pid: the
cache folder may be shared by nodes, where a pid names a process of another machine (or one reused
since), while a live build writes its files every chunk of records, seconds apart. An entry whose
files do not match meta.json (a truncated file, a missing one) is removed with a warning and
rebuilt.

Under torchrun the local rank 0 of each node builds a missing entry while the other ranks wait
in a collective, then every rank maps it: one tokenisation per node (per cluster when the cache
folder is shared; two nodes racing to build the same entry both succeed, one rename wins).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
import warnings
from pathlib import Path

import numpy as np
import torch.distributed as dist

from ..errors import DataError
from .examples import ARRAYS, Examples, ExampleWriter

CACHE_VERSION = 1
STALE_AFTER = 3600  # seconds without a write after which a build's temporary folder is left over
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")


def default_cache_dir() -> Path:
    """$LOWRANK_CACHE/datasets, else $XDG_CACHE_HOME/lowrank/datasets, else ~/.cache/lowrank/datasets."""
    if os.environ.get("LOWRANK_CACHE"):
        return Path(os.environ["LOWRANK_CACHE"]) / "datasets"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lowrank" / "datasets"


def file_digest(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> dict | None:
    """What of a tokenizer changes the examples; None for a tokenizer lowrank cannot describe
    (such a load is not cached)."""
    backend = getattr(tokenizer, "backend", None)
    folder = getattr(tokenizer, "path", None)
    if backend is None or folder is None:
        size = getattr(tokenizer, "vocab_size", None)  # train.prepare's stand-in for pre-tokenized data
        return {"vocab_only": size} if type(tokenizer).__name__ == "_VocabOnly" and size else None
    files = {name: file_digest(Path(folder) / name) for name in TOKENIZER_FILES if (Path(folder) / name).is_file()}
    added = []
    if hasattr(backend, "tok"):  # tokenizers: the added tokens as registered, flags included
        added = sorted((i, t.content, t.special, t.single_word, t.lstrip, t.rstrip, t.normalized)
                       for i, t in backend.tok.get_added_tokens_decoder().items())
    elif hasattr(backend, "added"):
        added = sorted((i, t, t in backend.added_special) for t, i in backend.added.items())
    return {"backend": type(backend).__name__, "files": files, "added": added,
            "chat_template": tokenizer.chat_template, "template_tokens": tokenizer.template_tokens}


def cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:24]


def load_or_build(folder: Path, parts: dict, build):
    """(Examples, report dict, whether this process built it) of the entry `folder`, built with
    `build(writer) -> report dict` when it is missing or corrupt. Under torchrun, see the module doc."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return _load_or_build_here(folder, parts, build)
    builder = int(os.environ.get("LOCAL_RANK", dist.get_rank())) == 0
    result, failure = None, None
    if builder:
        try:
            result = _load_or_build_here(folder, parts, build)
        except Exception as e:  # every rank must reach the collective below, or the others hang
            failure = f"{type(e).__name__}: {e}"
            error = e
    failures = [None] * dist.get_world_size()
    dist.all_gather_object(failures, failure)
    if failure is not None:
        raise error
    for rank, message in enumerate(failures):
        if message is not None:
            raise DataError(f"rank {rank} could not build the token cache {folder}: {message}")
    return result if builder else _load_or_build_here(folder, parts, build)


def _load_or_build_here(folder: Path, parts: dict, build):
    if folder.exists():
        try:
            return (*open_entry(folder, parts), False)
        except _Corrupt as e:
            warnings.warn(f"{folder}: corrupt token cache ({e}); rebuilding it", stacklevel=4)
            shutil.rmtree(folder, ignore_errors=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_builds(folder.parent)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        files = {name: open(tmp / name, "wb") for name in ARRAYS}
        try:
            writer = ExampleWriter(files)
            report = build(writer)
        finally:
            for f in files.values():
                f.close()
        meta = {"version": CACHE_VERSION, "parts": parts, "counts": writer.counts(), "report": report}
        (tmp / "meta.json").write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
        try:
            os.rename(tmp, folder)  # the commit point: the entry appears whole or not at all
        except OSError:
            if not folder.is_dir():  # not a lost race with another builder
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return (*open_entry(folder, parts), True)


def remove_stale_builds(cache_dir: Path, now: float | None = None) -> list[Path]:
    """Delete the temporary folders of builds that stopped (see the module doc); the ones deleted."""
    now = time.time() if now is None else now
    removed = []
    for tmp in cache_dir.glob(".*.tmp-*"):
        try:
            last = max([tmp.stat().st_mtime] + [f.stat().st_mtime for f in tmp.iterdir()])
        except OSError:  # removed meanwhile by its builder or another sweep
            continue
        if now - last > STALE_AFTER:
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


class _Corrupt(Exception):
    pass


def open_entry(folder: Path, parts: dict) -> tuple[Examples, dict]:
    """Memory-map a complete entry; _Corrupt when its files are not what meta.json says."""
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        counts, report = meta["counts"], meta["report"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise _Corrupt(f"meta.json unreadable: {e}") from None
    if meta.get("version") != CACHE_VERSION or meta.get("parts") != json.loads(json.dumps(parts)):
        raise _Corrupt("meta.json does not describe this key")
    arrays = {}
    for name, dtype in ARRAYS.items():
        path = folder / name
        expected = int(counts.get(name, -1)) * dtype.itemsize
        size = path.stat().st_size if path.is_file() else -1
        if size != expected:
            raise _Corrupt(f"{name} holds {size} bytes, meta.json says {expected}")
        # np.memmap refuses empty files; an empty array needs no map.
        arrays[name] = np.memmap(path, dtype=dtype, mode="r") if size else np.zeros(0, dtype)
    offsets = arrays["offsets"]
    if offsets[0] != 0 or offsets[-1] != counts["input_ids"] or (np.diff(offsets) < 0).any():
        raise _Corrupt("offsets out of order")
    return Examples(arrays), report
