"""DPO LoRA step throughput and peak memory: lowrank against TRL's DPOTrainer, side by side.

    python -m benchmarks.preference [--steps N] [--threads N]

Both train the same random Qwen2-shaped checkpoint (written once with lowrank.save_model) on the
same pre-tokenized pairs (TRL's prompt_ids / chosen_ids / rejected_ids, so neither tokenizes):
LoRA r=8, alpha=16, no dropout, on all seven projections; beta 0.1; AdamW; clipping at 1.0; fp32
compute without gradient checkpointing (TRL's DPOConfig defaults to both bf16 and checkpointing:
turned off here, else TRL does other work); the
reference log-probabilities precomputed before training (lowrank --precompute-ref, TRL
precompute_ref_log_probs=True), so both steps are a policy forward and backward on 2B rows.
lowrank runs build_run + train_step (fused LM-head log-probs); TRL runs DPOTrainer.train() on a
PEFT model, its steps timed by a callback. Tokens/s counts the tokens of both sides of the pairs.

Each variant runs in a fresh process; peak memory is the process's VmHWM on the CPU and
torch.cuda.max_memory_allocated on a GPU. Results: benchmarks/results/preference-{cpu,cuda}.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Qwen2-shaped, small enough for a CPU run in a couple of minutes.
SHAPE = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2, vocab_size=32000, tie_word_embeddings=True)
WORKLOAD = dict(pairs=4, prompt=96, answer=(48, 128), warmup=1, steps=4)


def make_workload(folder: Path, w: dict) -> tuple[Path, Path]:
    import torch

    from benchmarks.train_throughput import hf_config
    from lowrank.models import build_model, config_from_dict
    from lowrank.models.checkpoint import save_model
    from lowrank.train.quickstart import init_weights_

    torch.manual_seed(0)
    model = build_model(config_from_dict(hf_config(SHAPE)))
    init_weights_(model)
    save_model(model, folder / "model")
    g = torch.Generator().manual_seed(1)
    lines = []
    for _ in range(w["pairs"] * (w["warmup"] + w["steps"])):
        ids = lambda n: torch.randint(0, SHAPE["vocab_size"], (n,), generator=g).tolist()  # noqa: E731
        n_c, n_r = torch.randint(w["answer"][0], w["answer"][1] + 1, (2,), generator=g).tolist()
        lines.append(json.dumps({"prompt_ids": ids(w["prompt"]), "chosen_ids": ids(n_c), "rejected_ids": ids(n_r)}))
    (folder / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "model", folder / "pairs.jsonl"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=WORKLOAD["steps"])
    ap.add_argument("--threads", type=int, help="torch threads per worker (default: torch's default)")
    args = ap.parse_args()
    if args.worker:
        variant, model, data, shape = args.worker
        print(json.dumps(worker(variant, model, data, json.loads(shape))))
        return

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    w = dict(WORKLOAD, steps=args.steps)
    row = {"workload": "qwen2-h512-l4-v32k-dpo", "config": SHAPE, **w, "variants": {}}
    with tempfile.TemporaryDirectory() as tmp:
        model, data = make_workload(Path(tmp), w)
        for variant in ("lowrank", "trl"):
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", variant, str(model), str(data),
                   json.dumps(w)]
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads)) if args.threads else None
            done = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, env=env)
            r = (json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else
                 {"error": (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]})
            row["variants"][variant] = r
            print(f"{variant:8s} " + (f"failed: {r['error']}" if "error" in r else
                                     f"{r['tokens_per_s']:8.0f} tokens/s   peak {r['peak_mem_mb']:7.0f} MB   "
                                     f"losses {[round(x, 4) for x in r['losses']]}"), flush=True)
    v = row["variants"]
    if all("tokens_per_s" in v[k] for k in v):
        row["lowrank_over_trl"] = {"tokens_per_s": v["lowrank"]["tokens_per_s"] / v["trl"]["tokens_per_s"],
                                   "peak_mem": v["lowrank"]["peak_mem_mb"] / v["trl"]["peak_mem_mb"]}
        print("lowrank / TRL: {tokens_per_s:.2f}x tokens/s, {peak_mem:.2f}x peak memory".format(
            **row["lowrank_over_trl"]))
    from benchmarks.train_throughput import _cpu_name

    row.update(date=date.today().isoformat(), threads=args.threads or torch.get_num_threads(),
               torch=torch.__version__, machine=torch.cuda.get_device_name() if device == "cuda" else _cpu_name())
    out = Path(__file__).resolve().parent / "results" / f"preference-{device}.json"
    out.write_text(json.dumps(row, indent=2) + "\n")
    print(f"wrote {out}")


def peak_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def worker(variant: str, model: str, data: str, w: dict) -> dict:
    import torch

    records = [json.loads(line) for line in open(data)]
    total = w["warmup"] + w["steps"]
    step_tokens = [sum(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"])
                       for r in records[s * w["pairs"]:(s + 1) * w["pairs"]]) for s in range(total)]
    times, losses = [], []
    if variant == "lowrank":
        from lowrank.train.loop import TrainConfig, build_run, epoch_batches, step_share, train_step

        cfg = TrainConfig(model=model, data=data, output=str(Path(data).parent / "unused"), objective="dpo",
                          precompute_ref=True, method="lora", r=8, alpha=16.0, dropout=0.0,
                          target_modules=PROJECTIONS, batch_size=w["pairs"], max_len=4096, shuffle=False, lr=1e-4,
                          lr_scheduler="constant", max_steps=total, max_grad_norm=1.0, progress=False)
        run = build_run(cfg)
        batches = epoch_batches(run, 0)
        for s in range(total):
            t0 = time.perf_counter()
            losses.append(train_step(run, step_share(run, batches, s), s)["loss"])
            times.append(time.perf_counter() - t0)
    else:
        from datasets import Dataset
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback
        from trl import DPOConfig, DPOTrainer

        hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
        hf = get_peft_model(hf, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=PROJECTIONS))
        from tokenizers import Tokenizer, models

        tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0}, unk_token="<pad>")),
                                      pad_token="<pad>", eos_token="<pad>")

        class Timer(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                self.t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                times.append(time.perf_counter() - self.t0)

            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "loss" in logs:
                    losses.append(logs["loss"])

        args = DPOConfig(output_dir=str(Path(data).parent / "trl"), beta=0.1, per_device_train_batch_size=w["pairs"],
                         max_steps=total, learning_rate=1e-4, lr_scheduler_type="constant", max_grad_norm=1.0,
                         logging_steps=1, report_to=[], use_cpu=not torch.cuda.is_available(), save_strategy="no",
                         precompute_ref_log_probs=True, max_length=None,
                         # DPOConfig's own defaults are bf16 autocast and gradient checkpointing;
                         # lowrank's CPU run is fp32 without checkpointing, so turn both off for the
                         # same work (bf16 on a CPU without AMX is ~10x slower than fp32).
                         bf16=False, gradient_checkpointing=False)
        trainer = DPOTrainer(model=hf, args=args, processing_class=tok, callbacks=[Timer()],
                             train_dataset=Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}]))
        # Hand TRL the token columns its own preparation would produce; then its precompute runs on them.
        tokenized = Dataset.from_list(records)
        trainer.train_dataset = trainer._precompute_ref_logps(tokenized, "train", w["pairs"])
        trainer.train()
    # TRL's sampler shuffles the pairs: both are credited the mean tokens of a step, over the median step time.
    return {"tokens_per_s": statistics.mean(step_tokens) / statistics.median(times[w["warmup"]:]), "step_s": times,
            "peak_mem_mb": peak_mb(),
            "losses": losses}


if __name__ == "__main__":
    main()
