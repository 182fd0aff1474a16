"""LoRA training throughput and peak memory: lowrank's loop against transformers + peft.

    python -m benchmarks.train_throughput [--steps N] [--only NAME] [--variants lowrank,peft]

Both train the same random checkpoint (written once with lowrank.save_model, read by both) on the
same batches: LoRA r=8 (or the workload's r), alpha=2r, no dropout, on all seven projections; AdamW;
gradient clipping at 1.0; activation checkpointing where the workload says so; every token trained,
or (the "-sft" workload) only the second half of each row, the answer of SFT data whose prompt is
masked. lowrank runs its own loop (lowrank.train.loop.build_run + train_step,
fused LM-head loss; "lowrank-plain" is the same loop on full logits); transformers + peft run the
usual `model(input_ids, labels=...)`, `loss.backward()`, `optimizer.step()`. On the CPU in fp32; on
a GPU with bf16 weights for the frozen base and bf16 autocast, as each library's own recipe does.

Each variant runs in a fresh process (this file run as a script, so the repository root is not on
sys.path: there transformers would import the top-level kernels/ folder as the PyPI `kernels`).
Peak memory is the process's VmHWM on the CPU (not ru_maxrss, which Linux carries over from the
parent) and torch.cuda.max_memory_allocated on a GPU. Results go to
benchmarks/results/train_throughput-{cpu,cuda}.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QWEN25_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)
QWEN25_15B = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                  num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)
QWEN25_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                 num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False)
QWEN2_H512 = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=2, vocab_size=32000, tie_word_embeddings=True)
# masked: the share of each row that is prompt (label -100), as in SFT data; 0 trains every token.
# r: the LoRA rank (default 8, alpha = 2r); checkpointing: recompute each layer in the backward;
# dtype: the checkpoint's on disk (default float32).
WORKLOADS = {
    "cpu": [
        dict(name="qwen2-h512-l8-v32k", batch=4, seq=256, masked=0.0, warmup=1, steps=4, config=QWEN2_H512,
             variants=("lowrank", "lowrank-plain", "peft")),
        dict(name="qwen2-h512-l8-v32k-sft", batch=4, seq=256, masked=0.5, warmup=1, steps=4, config=QWEN2_H512,
             variants=("lowrank", "peft")),
        dict(name="qwen2.5-0.5b-4-layers", batch=2, seq=1024, masked=0.0, warmup=1, steps=2,
             config=dict(QWEN25_05B, num_hidden_layers=4), variants=("lowrank", "peft")),
        # QLoRA against LoRA on the bf16 base, same shape, both in bf16 autocast: the step-time ratio.
        dict(name="qwen2-h512-l8-v32k-bf16", batch=4, seq=256, masked=0.0, warmup=1, steps=4, config=QWEN2_H512,
             dtype="bfloat16", compute="bfloat16", variants=("lowrank", "lowrank-nf4")),
        # Issue 18's memory target: Qwen2.5-7B's shape trains with an NF4 base in <= 7.5 GB peak RSS,
        # loading included. The bf16 checkpoint (15 GB) is written shard by shard (stream=True);
        # one step takes many minutes on a small CPU.
        dict(name="qwen2.5-7b-qlora-r16-gc", batch=2, seq=256, masked=0.0, warmup=0, steps=1, config=QWEN25_7B,
             r=16, checkpointing=True, dtype="bfloat16", compute="bfloat16", stream=True,
             variants=("lowrank-nf4",)),
    ],
    "cuda": [
        dict(name="qwen2.5-0.5b", batch=8, seq=1024, masked=0.0, warmup=3, steps=10, config=QWEN25_05B,
             variants=("lowrank", "lowrank-plain", "peft")),
        dict(name="qwen2.5-1.5b", batch=4, seq=1024, masked=0.0, warmup=3, steps=10, config=QWEN25_15B,
             variants=("lowrank", "lowrank-plain", "peft")),
        # Issue 7's target: lowrank fits this in <= 26 GB.
        dict(name="qwen2.5-7b-r16-gc", batch=8, seq=2048, masked=0.0, warmup=1, steps=3, config=QWEN25_7B,
             r=16, checkpointing=True, dtype="bfloat16", variants=("lowrank", "lowrank-nf4", "peft")),
        # The same with each MLP over 4 slices of the tokens (--mlp-tiles 4): issue 18's <= 12 GB.
        dict(name="qwen2.5-7b-r16-gc-tiled", batch=8, seq=2048, masked=0.0, warmup=1, steps=3, config=QWEN25_7B,
             r=16, checkpointing=True, mlp_tiles=4, dtype="bfloat16", variants=("lowrank", "lowrank-nf4")),
    ],
}
# lowrank-nf4: lowrank's loop with the base quantised to NF4 as it loads (QLoRA).
VARIANTS = ("lowrank", "lowrank-plain", "lowrank-nf4", "peft")


# ---- the parent: build the checkpoint and data, run each variant, compare --------------------

def hf_config(shape: dict, dtype: str = "float32") -> dict:
    """The transformers config.json of a Qwen2 model of `shape` (one of the dicts above)."""
    return dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", max_position_embeddings=4096,
                rms_norm_eps=1e-6, rope_theta=1000000.0, hidden_act="silu", use_sliding_window=False,
                torch_dtype=dtype, **shape)


def make_workload(folder: Path, w: dict) -> tuple[Path, Path]:
    import torch

    from lowrank.models.checkpoint import save_model
    from lowrank.models import build_model, config_from_dict
    from lowrank.train.quickstart import init_weights_

    dtype = w.get("dtype", "float32")
    hf = hf_config(w["config"], dtype)
    if w.get("stream"):
        write_streamed(folder / "model", hf)
        return folder / "model", write_data(folder, w, hf)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # a 7B init on the CPU takes minutes
        model = build_model(config_from_dict(hf))
    init_weights_(model)
    save_model(model, folder / "model", dtype=getattr(torch, dtype))
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # else this process keeps the init's memory while the workers run
    return folder / "model", write_data(folder, w, hf)


def write_data(folder: Path, w: dict, hf: dict) -> Path:
    import torch

    g = torch.Generator().manual_seed(1)
    n = w["batch"] * (w["warmup"] + w["steps"])
    ids = torch.randint(0, hf["vocab_size"], (n, w["seq"]), generator=g).tolist()
    prompt = int(w["masked"] * w["seq"])
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps({"input_ids": row, "labels": [-100] * prompt + row[prompt:]}) + "\n"
                            for row in ids))
    return data


def write_streamed(folder: Path, hf: dict):
    """A random checkpoint of config `hf` written one decoder layer per shard, never whole in memory
    (a 7B model in bf16 is 15 GB): normal(0, 0.02) weights, ones for the norms."""
    import torch
    from safetensors.torch import save_file

    from lowrank.models import build_model, config_from_dict

    dtype = getattr(torch, hf["torch_dtype"])
    with torch.device("meta"):
        shapes = {k: t.shape for k, t in build_model(config_from_dict(hf)).state_dict().items()}
    if hf.get("tie_word_embeddings"):
        shapes.pop("lm_head.weight")
    groups: dict[str, dict] = {}
    for k, shape in shapes.items():
        groups.setdefault(".".join(k.split(".")[:3]) if k.startswith("model.layers.") else "rest", {})[k] = shape
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    names, weight_map = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))], {}
    for name, group in zip(names, groups.values()):
        tensors = {k: (torch.ones(shape, dtype=dtype) if "norm" in k else
                       (torch.randn(shape, generator=g) * 0.02).to(dtype)) for k, shape in group.items()}
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
        del tensors
    (folder / "config.json").write_text(json.dumps(hf, indent=2))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def step_shape(w: dict) -> dict:
    """What a worker needs of workload `w`: batch, steps and LoRA set-up, the defaults filled in."""
    return {"batch": w["batch"], "seq": w["seq"], "warmup": w["warmup"], "steps": w["steps"],
            "r": w.get("r", 8), "checkpointing": w.get("checkpointing", False), "compute": w.get("compute", "auto"),
            "mlp_tiles": w.get("mlp_tiles", 1)}


def run_variant(variant: str, model: Path, data: Path, w: dict, device: str, cwd: str, threads: int | None) -> dict:
    args = [sys.executable, str(Path(__file__).resolve()), "--worker", variant, str(model), str(data),
            json.dumps(step_shape(w)), device]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads else None
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    ap.add_argument("--only", help="run only the workload with this name")
    ap.add_argument("--steps", type=int, help="timed steps per variant (default: per workload)")
    ap.add_argument("--threads", type=int, help="torch threads per worker (default: torch's default)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="run each variant this many times, alternating, and keep its fastest run: on a shared "
                         "machine other processes only ever slow a run down (default: 1)")
    ap.add_argument("--variants", help="comma list of " + ", ".join(VARIANTS) + " (default: per workload)")
    args = ap.parse_args()
    if args.worker:
        variant, model, data, shape, device = args.worker
        print(json.dumps(worker(variant, model, data, json.loads(shape), device)))
        return

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = []
    for w in WORKLOADS[device]:
        if args.only and w["name"] != args.only:
            continue
        w = dict(w, steps=args.steps or w["steps"])
        with tempfile.TemporaryDirectory() as tmp:
            model, data = make_workload(Path(tmp), w)
            shape = step_shape(w)
            row = {"workload": w["name"], "batch": shape["batch"], "seq": shape["seq"], "masked": w["masked"],
                   "steps": shape["steps"], "r": shape["r"], "checkpointing": shape["checkpointing"],
                   "config": w["config"], "variants": {}}
            variants = args.variants.split(",") if args.variants else w["variants"]
            for _ in range(args.repeats):
                for variant in variants:
                    r = run_variant(variant, model, data, w, device, tmp, args.threads)
                    print(f"{w['name']:24s} {variant:14s} {_fmt(r)}", flush=True)
                    best = row["variants"].get(variant)
                    if best is None or r.get("tokens_per_s", 0) > best.get("tokens_per_s", 0):
                        row["variants"][variant] = r
        results.append(row)
    print()
    for row in results:
        v = row["variants"]
        if "tokens_per_s" in v.get("lowrank", {}) and "tokens_per_s" in v.get("peft", {}):
            speed = v["lowrank"]["tokens_per_s"] / v["peft"]["tokens_per_s"]
            mem = v["lowrank"]["peak_mem_mb"] / v["peft"]["peak_mem_mb"]
            row["lowrank_over_peft"] = {"tokens_per_s": speed, "peak_mem": mem}
            print(f"{row['workload']}: lowrank / transformers+peft: {speed:.2f}x tokens/s, {mem:.2f}x peak memory")
    out = Path(__file__).resolve().parent / "results" / f"train_throughput-{device}.json"
    out.parent.mkdir(exist_ok=True)
    machine = torch.cuda.get_device_name() if device == "cuda" else _cpu_name()
    for row in results:
        row.update(date=date.today().isoformat(), machine=machine, threads=args.threads or torch.get_num_threads(),
                   repeats=args.repeats, torch=torch.__version__)
    # Each row names its machine: a run of some workloads (--only, as a time-limited GPU session
    # must) replaces the rows of those workloads on this machine and keeps every other row, so the
    # sessions' different machines do not erase each other's results.
    old = json.loads(out.read_text()) if out.exists() else {}
    kept = [dict(r, machine=r.get("machine", old.get("machine"))) for r in old.get("results", [])]
    ran = {(row["workload"], machine) for row in results}
    order = [w["name"] for w in WORKLOADS[device]]
    results = sorted([r for r in kept if (r["workload"], r["machine"]) not in ran] + results,
                     key=lambda r: (order.index(r["workload"]) if r["workload"] in order else len(order),
                                    r["machine"]))
    out.write_text(json.dumps({"date": date.today().isoformat(), "results": results}, indent=2) + "\n")
    print(f"wrote {out}")


def _fmt(r: dict) -> str:
    if "error" in r:
        return f"failed: {r['error']}"
    return (f"{r['tokens_per_s']:9.0f} tokens/s   peak {r['peak_mem_mb']:7.0f} MB   "
            f"(after load {r['loaded_mem_mb']:6.0f} MB)   first loss {r['losses'][0]:.4f}")


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---- a worker: one variant in its own process -------------------------------------------------

def peak_mb(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def worker(variant: str, model: str, data: str, shape: dict, device: str) -> dict:
    import torch

    steps, warmup = shape["steps"], shape["warmup"]
    tokens = shape["batch"] * shape["seq"]
    losses, times = [], []
    if variant.startswith("lowrank"):
        from lowrank.train.loop import TrainConfig, build_run, epoch_batches, step_share, train_step

        cfg = TrainConfig(model=model, data=data, output=str(Path(data).parent / "unused"), method="lora",
                          r=shape["r"], alpha=2.0 * shape["r"], dropout=0.0, target_modules=PROJECTIONS,
                          batch_size=shape["batch"],
                          max_len=shape["seq"], shuffle=False, lr=1e-4, lr_scheduler="constant",
                          max_steps=warmup + steps, max_grad_norm=1.0, device=device,
                          dtype=shape.get("compute", "auto"), gradient_checkpointing=shape["checkpointing"],
                          mlp_tiles=shape.get("mlp_tiles", 1),
                          quantize="nf4" if variant == "lowrank-nf4" else "none",
                          loss="plain" if variant == "lowrank-plain" else "fused", progress=False)
        run = build_run(cfg)
        loaded = peak_mb(device)
        batches = epoch_batches(run, 0)

        def step(s):
            return train_step(run, step_share(run, batches, s), s)["loss"]
    else:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        hf = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).to(device)
        if shape["checkpointing"]:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        hf = get_peft_model(hf, LoraConfig(r=shape["r"], lora_alpha=2 * shape["r"], lora_dropout=0.0,
                                           target_modules=PROJECTIONS))
        hf.train()
        loaded = peak_mb(device)
        params = [p for p in hf.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        rows = [json.loads(line) for line in open(data)]

        def step(s):
            batch = rows[s * shape["batch"]:(s + 1) * shape["batch"]]
            ids = torch.tensor([r["input_ids"] for r in batch], device=device)
            labels = torch.tensor([r["labels"] for r in batch], device=device)
            with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
                loss = hf(input_ids=ids, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.item()

    for s in range(warmup + steps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        losses.append(step(s))  # .item() inside: the step has finished
        if s >= warmup:
            times.append(time.perf_counter() - t0)
    # The median step: this machine is shared, and one slow step says more about it than about the code.
    return {"tokens_per_s": tokens / statistics.median(times), "step_s": times, "peak_mem_mb": peak_mb(device),
            "loaded_mem_mb": loaded, "losses": losses}


if __name__ == "__main__":
    main()
