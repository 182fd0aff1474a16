"""`python -m lowrank.train`: the command line of lowrank.training.finetune. It only parses.

    python -m lowrank.train --model DIR --data FILE --output DIR [--method lora|prefix|freeze|full] ...
    python -m lowrank.train --config run.toml [flags that override it]
    python -m lowrank.train --quickstart          # the whole pipeline on a tiny embedded model, on the CPU
    torchrun --nproc_per_node N -m lowrank.train ...   # data-parallel

One flag per TrainConfig field, made from the field's help text. Exit status: 0 done, 1 the loss
diverged (the last good checkpoint is kept), 2 bad flags or inputs (nothing written).
Nothing imports this module: the package's function is lowrank.training.finetune.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from .errors import ConfigError, LowrankError
from .train_config import FIELDS, TrainConfig, coerce, read_toml

GROUPS = {
    "run": "model, data, output",
    "lora": "LoRA (--method lora)",
    "prefix": "prefix tuning / P-tuning v2 (--method prefix)",
    "freeze": "freeze tuning (--method freeze)",
    "data": "data and batches",
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


def main(argv=None) -> int:
    args = vars(build_parser().parse_args(argv))
    config_file, quickstart = args.pop("config", None), args.pop("quickstart", False)
    try:
        base = {}
        if quickstart:
            from .quickstart import quickstart_settings

            base = quickstart_settings(args.get("output"))
        if config_file:
            base.update(read_toml(config_file))
        config = config_from_args(args, base)
        if quickstart:
            from .quickstart import run_quickstart

            run_quickstart(config)
        else:
            from .training import finetune

            finetune(config)
    except LowrankError as e:
        from .training import NonFiniteLossError

        print(f"lowrank: error: {e}", file=sys.stderr)
        return 1 if isinstance(e, NonFiniteLossError) else 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
