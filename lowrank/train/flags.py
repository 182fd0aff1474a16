"""The flags of `python -m lowrank.train`, one per TrainConfig field, made from the field's help
text (`lora_dropout` -> `--lora-dropout`), and the TrainConfig they give. Kept apart from
`__main__.py` so that tests and other command lines can parse the same flags without running one.

A field's `aliases` (config.py) are more flags for it (`--learning-rate` for `--lr`); its
`switches` are flags that set it to a value (`--bf16` sets `dtype` to bfloat16). Every flag
also takes the underscore spelling transformers' scripts use (`--per_device_train_batch_size`),
left out of --help. Where two flags set one field, the last one given wins, as for any flag."""

from __future__ import annotations

import argparse
import dataclasses

from ..errors import CommandLineParser, ConfigError
from .config import FIELDS, TrainConfig, coerce

GROUPS = {
    "run": "model, data, output",
    "lora": "LoRA (--method lora)",
    "prefix": "prefix tuning / P-tuning v2 (--method prefix)",
    "freeze": "freeze tuning (--method freeze)",
    "data": "data and batches",
    "preference": "preference tuning (--objective dpo|orpo|simpo)",
    "optim": "optimization",
    "runtime": "runtime, checkpoints, resume",
    "logging": "watching a run: log lines, TensorBoard, wandb",
}


def build_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(prog="python -m lowrank.train", description="Fine-tune a Qwen / DeepSeek model with LoRA, "
                     "prefix tuning, freeze or full training. Settings: defaults < --config TOML < flags.")
    parser.add_argument("--config", metavar="TOML", default=argparse.SUPPRESS,
                        help="read settings from this TOML file (keys: the flag names); flags override it")
    parser.add_argument("--quickstart", action="store_true", default=argparse.SUPPRESS,
                        help="build a tiny Qwen2 model and tokenizer, LoRA-train it on the shipped identity data "
                             "and chat with it: the whole pipeline on the CPU, nothing downloaded "
                             "(--output defaults to ./lowrank-quickstart; other flags override its settings)")
    groups = {key: parser.add_argument_group(title) for key, title in GROUPS.items()}
    for name, f in FIELDS.items():
        kind = f.type.split(" | ")[0]
        flags = ["--" + n.replace("_", "-") for n in (f.metadata.get("flag", name), *f.metadata.get("aliases", ()))]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        help_text = f.metadata["help"]
        if f.metadata.get("required"):
            help_text += " (required)"
        elif default is not None:
            help_text += f" (default: {_show(default)})"
        kw = dict(dest=name, default=argparse.SUPPRESS, help=help_text.replace("%", "%%"))
        group = groups[f.metadata["group"]]
        if kind == "bool":
            spec = dict(action=argparse.BooleanOptionalAction)
        elif kind == "list":
            spec = dict(nargs="+", metavar="NAME")
        elif kind == "dict":
            spec = dict(action="append", metavar="KEY=VALUE")
        else:
            spec = dict(type={"int": int, "float": float}.get(kind, str), choices=f.metadata.get("choices"),
                        metavar=None if "choices" in f.metadata else name.upper())
        group.add_argument(*flags, **spec, **kw)
        _hidden(parser, flags, spec, name)
        if "off" in f.metadata:  # --no-data-cache: the field's "off" value
            group.add_argument("--no-" + flags[0][2:], action="store_const", const=f.metadata["off"], dest=name,
                               default=argparse.SUPPRESS, help=f"same as {flags[0]} {f.metadata['off']}")
        for switch, value in f.metadata.get("switches", {}).items():
            flags = ["--" + switch]
            group.add_argument(*flags, action="store_const", const=value, dest=name, default=argparse.SUPPRESS,
                               help=f"the same as --{name.replace('_', '-')} {value}")
            _hidden(parser, flags, dict(action="store_const", const=value), name)
    return parser


def _hidden(parser, flags: list[str], spec: dict, dest: str) -> None:
    """The underscore spellings of `flags`, accepted but not listed in --help."""
    spellings = [f"--{flag[2:].replace('-', '_')}" for flag in flags if "-" in flag[2:]]
    if spec.get("action") is argparse.BooleanOptionalAction:
        spec = dict(spec, action="store_true")  # its --no-x form is not copied
    if spellings:
        parser.add_argument(*spellings, **spec, dest=dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def _show(value) -> str:
    if isinstance(value, list):
        return ",".join(value) if value else "none"
    if isinstance(value, dict):
        return "none" if not value else " ".join(f"{k}={v}" for k, v in value.items())
    return str(value)


def config_from_args(args: dict, base: dict | None = None) -> TrainConfig:
    """TrainConfig from parsed flags over `base` values (a TOML file's, the quickstart's)."""
    values = dict(base or {})
    for name, value in args.items():
        kind = FIELDS[name].type.split(" | ")[0]
        if kind == "list":
            value = coerce(name, ",".join(value))
        elif kind == "dict":
            pairs = [item.partition("=") for item in value]
            bad = [item for item, (k, eq, _) in zip(value, pairs) if not (k and eq)]
            if bad:
                raise ConfigError(f"--{FIELDS[name].metadata.get('flag', name)} {bad[0]!r}: expected KEY=VALUE")
            value = {**values.get(name, {}), **{k: v for k, _, v in pairs}}
        values[name] = value
    return TrainConfig(**values)
