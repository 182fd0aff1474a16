"""Hugging Face-format model folders: config.json plus safetensors, single file or sharded.

Loading builds the module on the meta device and assigns the tensors read from the files,
so peak memory stays near one copy of the weights. Only safetensors are read: never pickle,
never remote code. Saving writes each file under a temporary name and renames it.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

from .. import host_memory
from ..errors import CheckpointError, ConfigError, LowrankError
from ..files import missing_folder_message, write_atomic
from .families import build_model, read_config
from .bnb_format import quantization_config
from .quantized import Quantizer, quantized_modules

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
# Buffers some old checkpoints carry that lowrank recomputes instead.
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")
# Kept in fp32 whatever dtype the model loads in, as transformers does: DeepSeek-V3's router
# bias decides expert choice by small differences that bf16 would erase.
_KEEP_FP32 = re.compile(r".*e_score_correction_bias$")


def _skipped(key: str, cfg) -> bool:
    """Tensors lowrank does not model: recomputed buffers, the copy of a tied head, and
    DeepSeek-V3's multi-token-prediction layers (numbered past num_hidden_layers)."""
    if _IGNORED.match(key) or (key == "lm_head.weight" and cfg.tie_word_embeddings):
        return True
    if cfg.hf.get("num_nextn_predict_layers"):
        m = re.match(r"model\.layers\.(\d+)\.", key)
        return bool(m) and int(m.group(1)) >= cfg.num_hidden_layers
    return False


def _cast(key: str, t: torch.Tensor, dtype) -> torch.Tensor:
    if dtype is None or not t.is_floating_point() or _KEEP_FP32.match(key):
        return t
    return t.to(dtype)


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a model folder, checked to exist."""
    if (folder / SINGLE).is_file():
        return [folder / SINGLE]
    index = folder / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({type(e).__name__}: {e})") from None
        files = [folder / n for n in names]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{index}: lists shard {f.name!r}, which is missing from {folder}")
        return files
    pickles = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
    hint = f" (found {', '.join(pickles)}: lowrank never loads pickle files; convert them to safetensors)" if pickles else ""
    raise CheckpointError(f"{folder}: no {SINGLE} or {INDEX}{hint}")


_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def read_header(path: Path) -> tuple[dict, int]:
    """The safetensors header {name: (dtype, shape, begin, end)} and where the data starts,
    checked against the file's size so a truncated or corrupt file fails here, by name."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
        if n < 2 or 8 + n > size:
            raise CheckpointError(f"{path}: not a safetensors file (header length {n}, file size {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    data_size, out = size - 8 - n, {}
    for key, info in header.items():
        try:
            dtype, shape, (begin, end) = _DTYPES[info["dtype"]], [int(d) for d in info["shape"]], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {key!r} has a malformed header entry {info!r}") from None
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        if not (0 <= begin <= end <= data_size) or end - begin != nbytes:
            raise CheckpointError(
                f"{path}: tensor {key!r} lies at bytes {begin}..{end} of {data_size} and needs {nbytes}: "
                "the file is truncated or corrupt"
            )
        out[key] = (dtype, shape, begin, end)
    return out, 8 + n


def read_tensor(f, start: int, dtype, shape, begin: int, end: int) -> torch.Tensor:
    """Read one tensor straight into its own storage: no second copy, no memory map."""
    buf = torch.empty(end - begin, dtype=torch.uint8)
    f.seek(start + begin)
    if f.readinto(buf.numpy()) != end - begin:
        raise CheckpointError(f"{f.name}: the file ended inside a tensor")
    return buf.view(dtype).reshape(shape)


def _expected(model) -> dict[str, torch.Tensor]:
    """Parameter name -> meta tensor, without the LM head when it is tied to the embeddings."""
    expected = dict(model.state_dict())
    if model.config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    return expected


# The dtypes a model computes in. Integer and float8 tensors hold weights only through a
# quantisation scheme (scales, codes) that a plain cast does not make.
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_compute_dtype(dtype) -> None:
    if dtype is not None and dtype not in COMPUTE_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in COMPUTE_DTYPES)
        raise ConfigError(f"dtype={dtype}: a model loads in one of {names}; integer and float8 weights need a "
                          "quantisation scheme (scales), which a cast does not give")


def load_model(path, dtype: torch.dtype | None = None, device=None, quantize: str | None = None) -> torch.nn.Module:
    """Load a Hugging Face-format folder as a lowrank model.

    dtype: defaults to the dtype the weights are stored in. device: defaults to the CPU.
    quantize: None, or "nf4" / "int8" to store the decoder layers' projections quantised, each
    quantised as it is read (models/quantized.py). A folder saved by transformers + bitsandbytes
    (`*-bnb-4bit`) loads with its layers quantised as stored, quantize given or not.
    Raises CheckpointError, naming the file and key, on anything missing, extra or corrupt.
    """
    folder = Path(path)
    check_compute_dtype(dtype)
    if not folder.is_dir():
        raise CheckpointError(missing_folder_message(path))
    cfg = read_config(folder)
    files = weight_files(folder)
    with torch.device("meta"):
        model = build_model(cfg)
    expected = _expected(model)
    state: dict[str, torch.Tensor] = {}
    device = torch.device(device) if device is not None else torch.device("cpu")
    quantizer = Quantizer(model, quantize, device)
    # glibc's heap keeps freed blocks resident (host_memory.py): on a CPU, a checkpoint large next
    # to the machine's memory is quantised, and later trained, with the heap kept small
    small_heap = device.type == "cpu" and host_memory.heap_matters(sum(f.stat().st_size for f in files))
    if quantize and small_heap:
        host_memory.keep_heap_small()  # else the freed scratch of quantising stays resident
    # Checkpoint key -> module name, or None for weights beside the causal LM (a vision tower).
    model_key = getattr(model, "model_key", lambda k: k)
    outside: dict[str, str] = {}
    for f in files:
        header, start = read_header(f)
        with open(f, "rb") as fh:
            for key, (t_dtype, shape, begin, end) in header.items():
                name = model_key(key)
                if name is None:
                    outside[key] = str(f)
                    continue
                if _skipped(name, cfg):
                    continue
                read = lambda: _cast(name, read_tensor(fh, start, t_dtype, shape, begin, end), dtype)  # noqa: E731
                if quantizer.take(f, name, t_dtype, read):
                    continue
                if name not in expected:
                    raise CheckpointError(f"{f}: unexpected tensor {key!r} for a {cfg.model_type} model")
                if name in state:
                    raise CheckpointError(f"{f}: tensor {key!r} appears in more than one shard")
                if tuple(shape) != tuple(expected[name].shape):
                    raise CheckpointError(
                        f"{f}: tensor {key!r} has shape {shape}, the config implies {list(expected[name].shape)}"
                    )
                state[name] = _cast(name, read_tensor(fh, start, t_dtype, shape, begin, end), dtype).to(device)
    dtypes = {t.dtype for k, t in state.items() if t.is_floating_point() and not _KEEP_FP32.match(k)}
    settled = dtype or (cfg.dtype if cfg.dtype in dtypes or not dtypes else max(dtypes, key=lambda d: torch.finfo(d).bits))
    done = quantizer.finish(model, state, settled)
    missing = [k for k in expected if k not in state and k not in done]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(f"{folder}: the checkpoint lacks {', '.join(map(repr, missing[:3]))}{more}")
    dtypes = {t.dtype for k, t in state.items() if t.is_floating_point() and not _KEEP_FP32.match(k)}
    if len(dtypes) > 1:  # mixed storage: settle on the config's dtype, else the widest
        target = cfg.dtype if cfg.dtype in dtypes else max(dtypes, key=lambda d: torch.finfo(d).bits)
        state = {k: _cast(k, t, target) for k, t in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    if small_heap and quantized_modules(model):
        host_memory.keep_heap_small()  # for the steps to come, and the load's freed pages go back
    if outside:
        warnings.warn(f"{folder}: lowrank loads the language model only; {len(outside)} tensors beside it "
                      f"({', '.join(sorted({'.'.join(k.split('.')[:2 if k.startswith('model.') else 1]) for k in outside}))}.*) "
                      "are not loaded, and save_model copies them through from this folder", UserWarning,
                      stacklevel=2)
        model.outside_tensors = outside  # key -> file, for save_model
    return model


def _shard_bytes(size) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise LowrankError(f"max_shard_size {size!r}: expected bytes or a size such as '2GB' or '500MB'")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * mult)


def _outside_tensors(model, dtype) -> dict[str, torch.Tensor]:
    """The tensors load_model left aside (a vision tower), read again from their files."""
    by_file: dict[str, list[str]] = {}
    for key, f in getattr(model, "outside_tensors", {}).items():
        by_file.setdefault(f, []).append(key)
    out = {}
    for f, keys in by_file.items():
        if not Path(f).is_file():
            raise LowrankError(f"save_model: {f}, which holds {keys[0]!r} (not part of the language model), is "
                               "gone; the folder the model was loaded from must still be there to copy it through")
        header, start = read_header(Path(f))
        with open(f, "rb") as fh:
            for k in keys:
                out[k] = _cast(k, read_tensor(fh, start, *header[k]), dtype)
    return out


def save_model(model, path, max_shard_size="5GB", dtype: torch.dtype | None = None) -> Path:
    """Write `model` as a Hugging Face folder that transformers' from_pretrained loads.

    The config is written in the 4.x layout; tensors larger than max_shard_size are split
    across shards with a `model.safetensors.index.json`. Adapters must be merged first.
    Quantised layers are written as transformers + bitsandbytes write them, with the
    `quantization_config` that makes from_pretrained load them so (models/bnb_format.py).
    """
    folder = Path(path)
    check_compute_dtype(dtype)
    with torch.device("meta"):
        reference = build_model(model.config)
    expected = _expected(reference)
    state = model.state_dict()
    # The bitsandbytes tensors of quantised layers, written as they are (never cast).
    quantized = {k for p, _ in quantized_modules(model) for k in state if k.startswith(p + ".") and k != p + ".bias"}
    extra = [k for k in state if k not in expected and k not in quantized and k != "lm_head.weight"]
    if extra:
        raise LowrankError(
            f"save_model: the model holds {extra[0]!r}, which is not a base-model weight: "
            "merge the adapter (lowrank.merge_adapter) or save it with lowrank.save_adapter"
        )
    tensors = {}
    checkpoint_key = getattr(model, "checkpoint_key", lambda k: k)
    for k in [*expected, *sorted(quantized - expected.keys())]:
        t = state[k].detach() if k in quantized else _cast(k, state[k].detach(), dtype)
        tensors[checkpoint_key(k)] = t.to("cpu").contiguous()
    tensors.update(_outside_tensors(model, dtype))
    limit = _shard_bytes(max_shard_size)
    shards: list[dict] = [{}]
    size = 0
    for k, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += nbytes
    folder.mkdir(parents=True, exist_ok=True)
    saved_dtype = next((t.dtype for k, t in tensors.items() if t.is_floating_point() and k not in quantized), None)
    config = model.config.to_hf_dict(dtype=saved_dtype)
    config.pop("quantization_config", None)  # from a quantised folder; rewritten for what the model holds now
    try:
        if (q := quantization_config(model, (model.config.hf.get("quantization_config") or {}).get(
                "bnb_4bit_compute_dtype"))) is not None:
            config["quantization_config"] = q
    except ValueError as e:
        raise LowrankError(f"save_model: {e}") from None
    write_atomic(folder / "config.json", lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))
    meta = {"format": "pt"}
    if len(shards) == 1:
        names = [SINGLE]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        write_atomic(folder / name, lambda p, s=shard: save_file(s, str(p), metadata=meta))
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
            "weight_map": {k: name for name, shard in zip(names, shards) for k in shard},
        }
        write_atomic(folder / INDEX, lambda p: p.write_text(json.dumps(index, indent=2) + "\n"))
    # Weights from an earlier save in another layout would shadow or confuse the new ones.
    for old in folder.glob("model*.safetensors*"):
        if old.name not in names and old.name != (INDEX if len(shards) > 1 else None):
            old.unlink()
    return folder
