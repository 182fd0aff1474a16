"""The result of a fine-tune as a complete Hugging Face folder: what transformers, vLLM, llama.cpp's
`convert_hf_to_gguf.py` and `python -m lowrank.generate` each load without help.

    export_model("Qwen2.5-0.5B-Instruct", "runs/a/adapter", "runs/a/merged")   # LoRA, merged
    export_model("runs/b/adapter", None, "runs/b/export")                       # freeze / full
    export_model("Qwen2.5-7B-Instruct", "runs/q/adapter", "runs/q/nf4", quantize="nf4")   # bnb 4-bit

The folder holds the weights (a LoRA adapter folded in: W + scale * B @ A, computed in fp32 and
rounded once), config.json, the tokenizer files, the chat template (written out as
chat_template.jinja when the tokenizer's came from lowrank's defaults or an override) and
generation_config.json (copied, or made from the model's bos / eos ids). `save_model` alone
writes only config and weights, which a tokenizer-less consumer refuses or misreads.

quantize="nf4" | "int8" quantises the merged projections afterwards (what `load_model(quantize=)`
quantises, as it does) and writes transformers + bitsandbytes' layout: the merge is into the
full-precision weights, so export from the unquantised base (docs/quantization.md says why); a
`*-bnb-4bit` base is merged into its dequantised weights and its layers without an adapter are
kept as stored, not rounded twice.

Everything is checked before anything is written; the folder is written under `<output>.partial`
and renamed into place, so a failed export leaves no half folder under the real name.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..data.tokenizer import load_tokenizer
from ..errors import CheckpointError, ConfigError
from ..files import missing_folder_message, read_json_object, write_atomic
from ..models.checkpoint import load_model, save_model
from ..models.config import DTYPES
from ..models.families import read_config
from ..models.quantized import FORMATS, quantize_model, quantized_modules
from .loop import TOKENIZER_FILES


def export_model(model_dir, adapter_dir, output, dtype: torch.dtype | str | None = None, *,
                 tokenizer_dir=None, chat_template: str | None = None, quantize: str | None = None) -> Path:
    """Write `model_dir` with the adapter in `adapter_dir` merged (None: the model as it is, for a
    freeze or full fine-tune) as a complete Hugging Face folder at `output`; returns it.

    dtype: of the written weights ("bfloat16", torch.bfloat16, ...); default the checkpoint's.
    tokenizer_dir: where the tokenizer files are (default model_dir). chat_template: a built-in
    name, a .jinja file or Jinja source to ship instead of the tokenizer's own. quantize: None,
    or "nf4" / "int8" to write the merged projections quantised, in bitsandbytes' layout.
    """
    model_dir, output = Path(model_dir), Path(output)
    dtype = _dtype(dtype)
    if quantize not in (None, *FORMATS):
        raise ConfigError(f"quantize={quantize!r}: expected None, 'nf4' or 'int8' (bitsandbytes' fp4 is not written)")
    if not model_dir.is_dir():
        raise CheckpointError(missing_folder_message(model_dir))
    config = read_config(model_dir)
    kind = _adapter_kind(Path(adapter_dir)) if adapter_dir is not None else None
    tok_dir = Path(tokenizer_dir) if tokenizer_dir is not None else model_dir
    if not any((tok_dir / n).is_file() for n in ("tokenizer.json", "vocab.json", "tokenizer.model")):
        raise CheckpointError(f"{tok_dir}: no tokenizer files (tokenizer.json, vocab.json + merges.txt or "
                              "tokenizer.model) to ship with the model; pass the base model's folder as tokenizer")
    tokenizer = load_tokenizer(tok_dir, chat_template=chat_template)
    if output.resolve() in (model_dir.resolve(), tok_dir.resolve()) or (
            adapter_dir is not None and output.resolve() == Path(adapter_dir).resolve()):
        raise ConfigError(f"{output}: the export would overwrite its own input; choose a new folder")
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ConfigError(f"{output}: exists and is not empty; export into a new folder (or delete it first)")
    dtype = dtype or config.dtype or torch.float32

    model = load_model(model_dir, dtype=dtype)
    if kind is not None:
        from ..adapters.lora import merge_adapter
        from ..adapters.peft_format import load_adapter

        load_adapter(model, adapter_dir)
        if kind == "LORA":
            merge_adapter(model)
    if quantize is not None:
        _quantize(model, quantize, model_dir)

    partial = output.with_name(output.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    save_model(model, partial, dtype=dtype)
    for name in TOKENIZER_FILES:
        if (tok_dir / name).is_file():
            shutil.copy2(tok_dir / name, partial / name)
    if chat_template is not None or not _ships_template(tok_dir):
        if tokenizer.chat_template is not None:
            write_atomic(partial / "chat_template.jinja", lambda p: p.write_text(tokenizer.chat_template,
                                                                                encoding="utf-8"))
    if not (partial / "generation_config.json").is_file():
        gen = _generation_config(config, tokenizer)
        write_atomic(partial / "generation_config.json", lambda p: p.write_text(json.dumps(gen, indent=2) + "\n"))
    if output.exists():
        output.rmdir()  # empty, checked above
    partial.rename(output)
    return output


def _quantize(model, fmt: str, model_dir: Path):
    """Quantise every full-precision projection `load_model(quantize=fmt)` would; a layer the
    folder stores quantised and the adapter left alone stays as stored."""
    stored = {m.format for _, m in quantized_modules(model)} - {fmt}
    if stored:
        raise ConfigError(f"{model_dir}: its projections are stored as {stored.pop()}; quantize={fmt!r} would "
                          "quantise them twice: export from the full-precision model, or in the stored format")
    quantize_model(model, fmt)


def _dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _adapter_kind(folder: Path) -> str:
    """LORA for an adapter folder; refuses a whole model and a prefix (not a weight update)."""
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such adapter folder")
    if not (folder / "adapter_config.json").is_file():
        if (folder / "config.json").is_file():
            raise ConfigError(f"{folder}: a whole model (a freeze or full fine-tune), not an adapter; "
                              "pass it as the model, without an adapter")
        raise CheckpointError(f"{folder}: no adapter_config.json")
    kind = read_json_object(folder / "adapter_config.json").get("peft_type")
    if kind == "PREFIX_TUNING":
        raise ConfigError(f"{folder}: a prefix-tuning adapter adds key/value prefixes, not a weight update, so it "
                          "cannot be merged into a model folder; serve it with PEFT or lowrank")
    if kind != "LORA":
        raise CheckpointError(f"{folder / 'adapter_config.json'}: peft_type {kind!r}; lowrank exports LORA adapters")
    return kind


def _ships_template(folder: Path) -> bool:
    """Whether the folder's files carry a chat template that transformers and llama.cpp read."""
    if (folder / "chat_template.jinja").is_file():
        return True
    config = folder / "tokenizer_config.json"
    return config.is_file() and bool(read_json_object(config).get("chat_template"))


def _generation_config(config, tokenizer) -> dict:
    """The ids generation stops at: the config's eos and the tokenizer's (a chat model's <|im_end|>)."""
    eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    eos = [i for i in dict.fromkeys(eos + [tokenizer.eos_token_id]) if i is not None]
    gen = {"bos_token_id": config.bos_token_id if config.bos_token_id is not None else tokenizer.bos_token_id,
           "eos_token_id": eos[0] if len(eos) == 1 else eos}
    if tokenizer.pad_token_id is not None:
        gen["pad_token_id"] = tokenizer.pad_token_id
    return {k: v for k, v in gen.items() if v not in (None, [])}
