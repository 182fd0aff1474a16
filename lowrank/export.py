"""`python -m lowrank.export`: a fine-tune as a complete Hugging Face folder, ready for transformers,
vLLM, llama.cpp's converter and `python -m lowrank.generate`.

    python -m lowrank.export --model BASE --adapter runs/a/adapter --output runs/a/merged [--dtype bfloat16]
    python -m lowrank.export --model runs/b/adapter --output runs/b/export      # freeze / full: no --adapter
    python -m lowrank.export --model BASE --adapter A --output OUT --quantize nf4   # bitsandbytes 4-bit (or int8)

Only parses: the function is lowrank.export_model (lowrank/train/export.py); nothing imports this
module. Exit status 0 done, 2 bad input (one line, nothing written).
"""

from __future__ import annotations

import argparse
import sys

from .errors import CommandLineParser


def build_parser() -> argparse.ArgumentParser:
    p = CommandLineParser(prog="python -m lowrank.export", description="Merge a LoRA adapter into its base model and write a "
                "complete Hugging Face folder: weights, config, tokenizer, chat template, generation_config.json.")
    p.add_argument("--model", required=True, help="base model folder (or a freeze / full fine-tune's folder)")
    p.add_argument("--adapter", help="LoRA adapter folder (PEFT format) to merge; leave out for freeze / full")
    p.add_argument("--output", required=True, help="the folder to write (new, or empty)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="dtype of the written weights (default: the checkpoint's)")
    p.add_argument("--quantize", choices=("nf4", "int8"),
                   help="write the merged decoder projections quantised, as transformers + bitsandbytes save "
                   "them (nf4: 4-bit, blocks of 64, double quantised; int8: per-row absmax)")
    p.add_argument("--tokenizer", help="folder with the tokenizer files (default: --model)")
    p.add_argument("--chat-template", help="a built-in name, a .jinja file or Jinja source to ship instead of the "
                   "tokenizer's own")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .errors import LowrankError
    from .train.export import export_model

    try:
        folder = export_model(args.model, args.adapter, args.output, args.dtype, tokenizer_dir=args.tokenizer,
                              chat_template=args.chat_template, quantize=args.quantize)
    except LowrankError as e:
        print(f"lowrank: error: {e}", file=sys.stderr)
        return 2
    merged = f" with {args.adapter} merged" if args.adapter else ""
    quantized = f" ({args.quantize})" if args.quantize else ""
    print(f"lowrank: exported {args.model}{merged} to {folder}{quantized}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
