"""A LoRA training step of a Qwen3.5-shaped hybrid model: lowrank against transformers + peft.

    python benchmarks/qwen3_5_step.py [--steps N] [--seq T]

(run as a script, not with -m: from the repository root transformers would import the top-level
kernels/ folder as the PyPI `kernels`.) One random Qwen3_5ForCausalLM checkpoint, shaped like
Qwen3.5-4B's text model but small (SHAPE: 8 layers, 3 Gated DeltaNet to 1 gated full attention,
2 value heads per key head, partial RoPE), is saved by transformers and read by both. Both train
LoRA r=8, alpha 16 on every projection of both layer kinds and the MLP, AdamW, on the same
batches, in one process, steps alternating between the two (and which goes first) so that a
busy machine slows both alike; the speedup of the median steps and of the best ones. lowrank:
its loss (fused LM head) and chunked gated delta rule; transformers: its torch fallback (no
flash-linear-attention / causal-conv1d on the CPU). Result: benchmarks/results/qwen3_5_step-cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

SHAPE = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=4,
             num_key_value_heads=2, head_dim=128, linear_num_key_heads=4, linear_num_value_heads=8,
             linear_key_head_dim=64, linear_value_head_dim=64, vocab_size=32000)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a",
           "out_proj", "gate_proj", "up_proj", "down_proj"]


def _config() -> dict:
    text = json.loads((Path(__file__).resolve().parents[2] / "shared/fixtures/configs/Qwen3.5-4B.json")
                      .read_text())["text_config"]
    n = SHAPE["num_hidden_layers"]
    text.update(SHAPE, layer_types=text["layer_types"][:n], tie_word_embeddings=True, dtype="float32",
                architectures=["Qwen3_5ForCausalLM"], eos_token_id=2)
    return text


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=512)
    args = ap.parse_args()
    import peft
    from transformers import AutoConfig, Qwen3_5ForCausalLM

    import lowrank
    from lowrank.adapters import LoraConfig, apply_lora
    from lowrank.train.loop import causal_lm_loss

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(_config()))
        hf = Qwen3_5ForCausalLM(AutoConfig.from_pretrained(tmp))
        hf.save_pretrained(tmp)
        ours = lowrank.load_model(tmp)
    apply_lora(ours, LoraConfig(r=8, alpha=16, target_modules=TARGETS))
    theirs = peft.get_peft_model(hf, peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    ours.train(), theirs.train()
    opts = {name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
            for name, m in (("lowrank", ours), ("peft", theirs))}
    g = torch.Generator().manual_seed(1)
    B, T = args.batch, args.seq

    def step(name, ids):
        opt = opts[name]
        opt.zero_grad()
        t0 = time.perf_counter()
        if name == "lowrank":
            batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
            loss_sum, count = causal_lm_loss(ours, batch)
            loss = loss_sum / count
        else:
            loss = theirs(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        return time.perf_counter() - t0, loss.item()

    times = {"lowrank": [], "peft": []}
    losses = {"lowrank": [], "peft": []}
    for i in range(args.steps + 1):  # the first step of each warms up
        ids = torch.randint(0, SHAPE["vocab_size"], (B, T), generator=g)
        for name in ("lowrank", "peft") if i % 2 == 0 else ("peft", "lowrank"):
            dt, loss = step(name, ids)
            if i:
                times[name].append(dt)
            losses[name].append(loss)
    result = {"date": str(date.today()), "machine": platform.processor() or platform.machine(),
              "torch_threads": torch.get_num_threads(), "shape": SHAPE, "batch": B, "seq": T,
              "lora": {"r": 8, "alpha": 16, "targets": TARGETS}, "variants": {}}
    for name in times:
        med = statistics.median(times[name])
        result["variants"][name] = {"tokens_per_s": B * T / med, "best_tokens_per_s": B * T / min(times[name]),
                                    "step_s": times[name], "losses": losses[name]}
    v = result["variants"]
    result["speedup"] = v["lowrank"]["tokens_per_s"] / v["peft"]["tokens_per_s"]  # of the medians
    # Of the best steps: on a shared machine the least disturbed step of each is the closest to its cost.
    result["speedup_best"] = v["lowrank"]["best_tokens_per_s"] / v["peft"]["best_tokens_per_s"]
    result["load_average"] = list(os.getloadavg())  # at the end: how shared the machine was
    out = Path(__file__).resolve().parent / "results" / "qwen3_5_step-cpu.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v["tokens_per_s"] for k, v in result["variants"].items()}),
          f"speedup {result['speedup']:.2f}x (median), {result['speedup_best']:.2f}x (best)")


if __name__ == "__main__":
    main()
