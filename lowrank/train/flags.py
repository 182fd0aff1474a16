"""The flags of `python -m lowrank.train`, one per TrainConfig field, made from the field's help
text (`lora_dropout` -> `--lora-dropout`), and the TrainConfig they give. Kept apart from
`__main__.py` so that tests and other command lines can parse the same flags without running one."""

from __future__ import annotations

import argparse
import dataclasses

from ..errors import ConfigError
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
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and status 2, as every other bad input
        self.exit(2, f"lowrank: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m lowrank.train", description="Fine-tune a Qwen / DeepSeek model with LoRA, "
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
            group.add_argument(*flags, action=argparse.BooleanOptionalAction, **kw)
        elif kind == "list":
            group.add_argument(*flags, nargs="+", metavar="NAME", **kw)
        elif kind == "dict":
            group.add_argument(*flags, action="append", metavar="KEY=VALUE", **kw)
        else:
            group.add_argument(*flags, type={"int": int, "float": float}.get(kind, str),
                               choices=f.metadata.get("choices"), metavar=None if "choices" in f.metadata else
                               name.upper(), **kw)
    return parser


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
