"""Peak memory and time of the LM-head loss, unfused (full logits + F.cross_entropy) vs fused.

    python -m benchmarks.fused_loss [--tokens 2048] [--hidden 896] [--vocab 151936] [--dtype fp32]

Each variant runs in a fresh subprocess so its peak is its own: on the CPU the peak resident
set (ru_maxrss) minus the resident set once the inputs exist; on a GPU the peak allocated by
torch's caching allocator above the inputs. One variant is one forward + backward of the loss
for hidden states that require grad, with the head frozen (LoRA) or trained (tied embeddings,
full fine-tuning). Writes benchmarks/results/fused_loss-<device>.json.
"""

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from lowrank.kernels.linear_cross_entropy import (
    linear_cross_entropy,
    linear_cross_entropy_reference,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
VARIANTS = [("unfused", False), ("fused", False), ("unfused", True), ("fused", True)]
RESULTS = Path(__file__).resolve().parent / "results"


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_variant(args):
    """In the child: build the inputs, then time forward + backward and record the peak."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    g = torch.Generator(device).manual_seed(0)
    # Filled in place: a temporary copy of the weight would set the CPU's lifetime peak.
    hidden = torch.empty(args.tokens, args.hidden, device=device, dtype=dtype).normal_(generator=g)
    weight = torch.empty(args.vocab, args.hidden, device=device, dtype=dtype)
    weight.normal_(std=0.02, generator=g)
    labels = torch.randint(0, args.vocab, (args.tokens,), device=device, generator=g)
    hidden.requires_grad_()
    weight.requires_grad_(args.train_head)
    loss_fn = linear_cross_entropy if args.variant == "fused" else linear_cross_entropy_reference

    def step():
        hidden.grad = weight.grad = None
        loss, count = loss_fn(hidden, weight, labels)
        (loss / count).backward()
        return loss

    if device.type == "cuda":
        step()  # warm-up: kernel compilation and cuBLAS handles are not the loss's memory
        hidden.grad = weight.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
        step()  # warm-up: first-touch page faults would be timed otherwise; the peak counts it
    times, cpu_times = [], []
    for _ in range(args.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        loss = step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    result = dict(base_bytes=base, peak_bytes=peak, seconds=times, cpu_seconds=cpu_times)
    print(json.dumps(dict(loss=loss.item(), **result)))


def machine(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=896)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--dtype", choices=DTYPES, default="fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--variant", choices=["unfused", "fused"], help=argparse.SUPPRESS)
    p.add_argument("--train-head", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        return run_variant(args)

    rows = []
    for variant, train_head in VARIANTS:
        cmd = [sys.executable, "-m", "benchmarks.fused_loss", "--variant", variant]
        for key in ("tokens", "hidden", "vocab", "dtype", "device", "repeats"):
            cmd += [f"--{key}", str(getattr(args, key))]
        cmd += ["--train-head"] if train_head else []
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        rows.append(dict(variant=variant, head="trained" if train_head else "frozen", **r))

    print(f"N={args.tokens} H={args.hidden} V={args.vocab} {args.dtype} on {machine(args.device)}")
    print(f"{'variant':8} {'head':8} {'loss memory':>12} {'peak':>10} {'wall s':>7} {'cpu s':>7}")
    for r in rows:
        extra = (r["peak_bytes"] - r["base_bytes"]) / 2**20
        print(
            f"{r['variant']:8} {r['head']:8} {extra:>9.0f} MiB {r['peak_bytes'] / 2**20:>6.0f} MiB"
            f" {min(r['seconds']):>7.2f} {min(r['cpu_seconds']):>7.2f}"
        )
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"fused_loss-{args.device}.json"
    meta = dict(
        date=datetime.date.today().isoformat(),
        machine=machine(args.device),
        torch=torch.__version__,
        shape=dict(tokens=args.tokens, hidden=args.hidden, vocab=args.vocab, dtype=args.dtype),
        note="loss memory = peak - memory once the inputs exist; times: best of the repeats; "
        "cpu s = process CPU time (all threads), less sensitive than wall time to other load",
        load_average=os.getloadavg(),
    )
    path.write_text(json.dumps(dict(**meta, results=rows), indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
