"""The two file operations every folder lowrank reads or writes goes through."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from .errors import CheckpointError


def read_json_object(path: Path) -> dict:
    """A JSON object from `path`; CheckpointError naming the file if it is not one."""
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


def write_atomic(path: Path, write) -> None:
    """Call `write(tmp)` on a temporary name beside `path`, then rename it into place, so a
    crash mid-write never leaves a half-written file under the real name."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


# "Qwen/Qwen2.5-0.5B-Instruct": what a transformers user passes as a model. Two names joined
# by one slash, each of the hub's characters.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def missing_folder_message(path, what: str = "model folder") -> str:
    """Why `path` is not a folder: for a hub id, that lowrank reads local folders and how to get one."""
    text = str(path)
    if _HUB_ID.fullmatch(text) and not text.startswith((".", "/")):
        local = text.split("/")[1]
        return (f"{text}: no such {what}. lowrank reads local folders and never downloads; for the hub model "
                f"{text!r}: huggingface-cli download {text} --local-dir {local}, then pass {local}")
    return f"{text}: no such {what}"
