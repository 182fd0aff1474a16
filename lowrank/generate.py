"""`python -m lowrank.generate`: chat with a model, or a fine-tune of it, to check it by eye.

    python -m lowrank.generate --model DIR [--adapter DIR]                      # interactive chat
    python -m lowrank.generate --model DIR [--adapter DIR] --prompt "你是谁?"    # one answer per --prompt
    python -m lowrank.generate --model DIR --raw --prompt $'Human: hi\\nAssistant:' --stop Human:

Without --prompt it reads stdin line by line: each line is a user message, the answer streams to
stdout as it is generated, and the conversation is kept (`/reset` clears it, `/exit` or the end
of input ends). Prompts go through the model's chat template (or --chat-template) with the
generation prompt; --raw sends the text as it is, without a template (and without history). The
sampling settings default to the model folder's generation_config.json (an R1 distill samples at
temperature 0.6), else greedy; --greedy forces greedy decoding. --adapter takes a PEFT folder
(LoRA or prefix); a freeze / full fine-tune is a whole model folder: pass it as --model. Only
parses and prints: the functions are lowrank.generate (lowrank/models/generation.py) and
TextStream (lowrank/data/text_stream.py); nothing imports this module.
"""

from __future__ import annotations

import argparse
import sys

from .errors import CommandLineParser


def build_parser() -> argparse.ArgumentParser:
    p = CommandLineParser(prog="python -m lowrank.generate", description="Chat with a model (and an adapter) through its chat "
                "template, or answer --prompt once. Sampling defaults come from the model's generation_config.json.")
    p.add_argument("--model", required=True, help="Hugging Face-format model folder")
    p.add_argument("--adapter", help="PEFT adapter folder (LoRA or prefix) to apply to the model")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the model folder)")
    p.add_argument("--chat-template", help="'chatml', 'deepseek', a .jinja file or Jinja source (default: the "
                   "tokenizer's)")
    p.add_argument("--prompt", action="append", help="answer this user message and exit; repeat the flag for several "
                   "prompts, each answered on its own (default: chat on stdin)")
    p.add_argument("--system", help="a system message before the conversation")
    p.add_argument("--raw", action="store_true", help="send the prompt text as it is, without the chat template")
    g = p.add_argument_group("sampling (default: the model's generation_config.json, else greedy)")
    g.add_argument("--max-new-tokens", type=int, help="answer length limit (default: 256)")
    g.add_argument("--temperature", type=float, help="0 is greedy decoding")
    g.add_argument("--top-p", type=float, help="nucleus sampling mass, in (0, 1]")
    g.add_argument("--top-k", type=int, help="sample among the k likeliest tokens (0: all)")
    g.add_argument("--repetition-penalty", type=float, help="divide the logits of tokens already seen (1: none)")
    g.add_argument("--greedy", action="store_true", help="greedy decoding whatever generation_config.json says")
    g.add_argument("--stop", action="append", default=[], help="stop the answer at this text (repeatable)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="weights dtype: auto is the checkpoint's on GPU, float32 on the CPU (default: auto)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="(default: auto)")
    p.add_argument("--quantize", choices=("nf4", "int8"), help="store the decoder layers' projections quantised as "
                   "they load (a bitsandbytes-quantised folder loads quantised anyway)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .errors import LowrankError

    try:
        session = Session(args)
        if args.prompt:
            for prompt in args.prompt:
                print(session.answer(prompt, []), flush=True)
        else:
            chat(session, sys.stdin, sys.stdout, sys.stderr)
    except LowrankError as e:
        print(f"lowrank: error: {e}", file=sys.stderr)
        return 2
    return 0


def chat(session, lines, out, err) -> None:
    """The interactive loop: one user message per line, answers streamed, history kept."""
    interactive = lines.isatty()
    if interactive:
        print("lowrank chat: /reset clears the conversation, /exit (or Ctrl-D) ends it", file=err)
    history: list[dict] = []
    while True:
        if interactive:
            print("> ", end="", file=err, flush=True)
        line = lines.readline()
        if not line:
            break
        text = line.strip()
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = []
            print("(conversation cleared)", file=err, flush=True)
            continue
        if not text:
            continue
        answer = session.answer(text, history, write=lambda s: print(s, end="", file=out, flush=True))
        print(file=out, flush=True)
        if not session.raw:
            history += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]


class Session:
    """A loaded model, tokenizer and sampling settings; answer() runs one turn."""

    def __init__(self, args):
        import torch

        from .data.tokenizer import load_tokenizer
        from .errors import ConfigError
        from .models.checkpoint import load_model
        from .models.generation import check_sampling, generation_defaults
        from .train.distributed import pick_device

        defaults = generation_defaults(args.model)
        self.temperature = 0.0 if args.greedy else _given(args.temperature, defaults["temperature"])
        self.top_p = _given(args.top_p, defaults["top_p"])
        self.top_k = _given(args.top_k, defaults["top_k"])
        self.repetition_penalty = _given(args.repetition_penalty, defaults["repetition_penalty"])
        self.max_new_tokens = _given(args.max_new_tokens, defaults["max_new_tokens"] or 256)
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens {self.max_new_tokens}: expected >= 1")
        check_sampling(self.temperature, self.top_p, self.top_k, self.repetition_penalty)
        self.raw, self.system, self.stop = args.raw, args.system, args.stop

        device = pick_device(args.device)
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(args.dtype)
        if dtype is None and device.type == "cpu":
            dtype = torch.float32  # half-precision matmuls are slow on most CPUs
        self.tokenizer = load_tokenizer(args.tokenizer or args.model, chat_template=args.chat_template)
        self.model = load_model(args.model, dtype=dtype, device=device, quantize=args.quantize)
        if args.adapter:
            from pathlib import Path

            from .adapters.peft_format import load_adapter

            folder = Path(args.adapter)
            if (folder / "config.json").is_file() and not (folder / "adapter_config.json").is_file():
                raise ConfigError(f"{args.adapter}: a whole model (a freeze or full fine-tune), not an adapter; "
                                  "pass it as --model")
            load_adapter(self.model, args.adapter)
        self.model.eval()
        self.device, self.generator = device, torch.Generator(device=device).manual_seed(args.seed)
        tok = self.tokenizer
        eos = (defaults["eos_token_id"] or []) + [tok.eos_token_id, tok.token_to_id("<|im_end|>")]
        self.eos = [i for i in dict.fromkeys(eos) if i is not None] or None

    def answer(self, prompt: str, history: list[dict], write=None) -> str:
        """The model's answer to `prompt` after `history`, passed to `write` as it comes."""
        import torch

        from .data.text_stream import TextStream
        from .errors import ConfigError
        from .models.generation import generate

        tok = self.tokenizer
        if self.raw:
            ids = tok.encode(prompt, add_special_tokens=True)
        else:
            system = [{"role": "system", "content": self.system}] if self.system else []
            messages = system + history + [{"role": "user", "content": prompt}]
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        vocab = self.model.config.vocab_size
        if max(ids, default=0) >= vocab:
            raise ConfigError(f"{tok.path}: the tokenizer gives id {max(ids)}, the model's vocabulary has {vocab} "
                              "ids: a tokenizer of another model? (--tokenizer)")
        stream = TextStream(tok, self.stop, write)
        generate(self.model, torch.tensor(ids, device=self.device), self.max_new_tokens, self.temperature,
                 self.top_p, eos_token_id=self.eos, generator=self.generator, top_k=self.top_k,
                 repetition_penalty=self.repetition_penalty, on_token=stream.push)
        return stream.close().strip()


def _given(flag, default):
    return default if flag is None else flag


if __name__ == "__main__":
    sys.exit(main())
