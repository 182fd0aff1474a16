"""`python -m lowrank.generate`: chat with a model, or a fine-tune of it, to check it by eye.

    python -m lowrank.generate --model DIR [--adapter DIR] --prompt "你是谁?"

The prompt goes through the model's chat template (with the generation prompt), the answer is
decoded without special tokens. --adapter takes a PEFT folder (LoRA or prefix, lowrank's or
PEFT's); a freeze / full fine-tune is a whole model folder: pass it as --model. Only parses: the
function is lowrank.generate (lowrank/models/generation.py); nothing imports this module.
"""

from __future__ import annotations

import argparse
import sys


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"lowrank: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m lowrank.generate", description="Answer a prompt with a model (and an adapter), "
                "through the model's chat template.")
    p.add_argument("--model", required=True, help="Hugging Face-format model folder")
    p.add_argument("--adapter", help="PEFT adapter folder (LoRA or prefix) to apply to the model")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the model folder)")
    p.add_argument("--prompt", required=True, action="append",
                   help="the user message; repeat the flag for several prompts, each answered on its own")
    p.add_argument("--system", help="a system message before the prompt")
    p.add_argument("--max-new-tokens", type=int, default=256, help="answer length limit (default: 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy decoding (default: 0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="weights dtype: auto is the checkpoint's on GPU, float32 on the CPU (default: auto)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="(default: auto)")
    p.add_argument("--quantize", choices=("nf4", "int8"), help="store the decoder layers' projections quantised as "
                   "they load (a bitsandbytes-quantised folder loads quantised anyway)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .errors import ConfigError, LowrankError

    try:
        if args.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens {args.max_new_tokens}: expected >= 1")
        if args.temperature < 0 or not 0 < args.top_p <= 1:
            raise ConfigError("--temperature must be >= 0 and --top-p in (0, 1]")
        for answer in answers(args):
            print(answer, flush=True)
    except LowrankError as e:
        print(f"lowrank: error: {e}", file=sys.stderr)
        return 2
    return 0


def answers(args):
    import torch

    from .models.checkpoint import load_model
    from .errors import ConfigError
    from .train.distributed import pick_device
    from .models.generation import generate
    from .data.tokenizer import load_tokenizer

    device = pick_device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(args.dtype)
    if dtype is None and device.type == "cpu":
        dtype = torch.float32  # half-precision matmuls are slow on most CPUs
    model = load_model(args.model, dtype=dtype, device=device, quantize=args.quantize)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    if args.adapter:
        from pathlib import Path

        from .adapters.peft_format import load_adapter

        if (Path(args.adapter) / "config.json").is_file() and not (Path(args.adapter) / "adapter_config.json").is_file():
            raise ConfigError(f"{args.adapter}: a whole model (a freeze or full fine-tune), not an adapter; "
                              "pass it as --model")

        load_adapter(model, args.adapter)
    model.eval()
    generator = torch.Generator(device=device).manual_seed(args.seed)
    eos = [i for i in (tokenizer.eos_token_id, tokenizer.token_to_id("<|im_end|>")) if i is not None]
    for prompt in args.prompt:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
                   [{"role": "user", "content": prompt}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        out = generate(model, torch.tensor(ids, device=device), args.max_new_tokens, temperature=args.temperature,
                       top_p=args.top_p, eos_token_id=eos or None, generator=generator)
        yield tokenizer.decode(out[len(ids):].tolist(), skip_special_tokens=True).strip()


if __name__ == "__main__":
    sys.exit(main())
