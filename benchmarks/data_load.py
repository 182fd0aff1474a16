"""Data at scale: lowrank's first load (tokenise + write the cache), its cached load, and bare
`tokenizers` encode_batch on the same rendered texts, side by side; then the training loop's
memory over its first 50 steps on a tenth of the records and on all of them. Run:

    python -m benchmarks.data_load [--records 200000]

The records are the shipped alpaca demos (English and Chinese) repeated, each instruction
numbered so that no two are the same. Every measurement runs in its own process and reads its
own peak resident set (VmHWM), minus the process's RSS once lowrank and the tokenizer are loaded.
Results go to benchmarks/results/data_load-cpu.json.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
QWEN = ROOT.parent / "shared" / "fixtures" / "tokenizers" / "qwen2.5-instruct"

CHILD = r"""
import json, re, sys, time
import lowrank
from lowrank.data.dataset import conversation_spans, read_records, record_to_messages

def rss_kb(key):
    return int(re.search(key + r":\s+(\d+)", open("/proc/self/status").read()).group(1))

what, data, cache = sys.argv[1], sys.argv[2], sys.argv[3]
tok = lowrank.load_tokenizer(sys.argv[4])
if what == "bare":  # the texts lowrank tokenises, rendered before the clock starts
    texts = [t for r in read_records(data) for t, _ in conversation_spans(record_to_messages(r), tok)]
base = rss_kb("VmRSS")
t0 = time.perf_counter()
if what == "bare":
    tokens = sum(len(e.ids) for e in tok.backend.tok.encode_batch(texts, add_special_tokens=False))
else:
    examples, report = lowrank.load_dataset(data, tok, 1 << 15, cache_dir=cache)
    tokens = report.n_tokens
    assert report.from_cache == (what == "cached"), report
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
                  "peak_rss_mb": (rss_kb("VmHWM") - base) / 1024}))
"""

LOOP = r"""
import json, re, sys
import torch
import lowrank
from lowrank.models import ModelConfig, build_model, save_model
from lowrank.train.loop import TrainConfig, build_run, epoch_batches, step_share, train_step

def rss_kb(key):
    return int(re.search(key + r":\s+(\d+)", open("/proc/self/status").read()).group(1))

data, cache, tokenizer, model_dir = sys.argv[1:5]
if not (Path := __import__("pathlib").Path)(model_dir, "config.json").is_file():
    cfg = ModelConfig(model_type="qwen2", vocab_size=151936, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16, qkv_bias=True)
    save_model(build_model(cfg), model_dir)
cfg = TrainConfig(model=model_dir, tokenizer=tokenizer, data=data, output=model_dir + "-out", data_cache=cache,
                  max_len=512, batch_size=4, max_steps=50, dtype="float32", device="cpu", progress=False,
                  group_by_length=True)
run = build_run(cfg)
after_build = rss_kb("VmRSS")
batches = epoch_batches(run, 0)
for k in range(50):
    train_step(run, step_share(run, batches, k), k)
print(json.dumps({"examples": len(run.train_examples), "rss_after_build_mb": after_build / 1024,
                  "peak_rss_mb": rss_kb("VmHWM") / 1024, "growth_over_50_steps_mb": (rss_kb("VmHWM") - after_build) / 1024}))
"""


def make_records(path: Path, n: int) -> None:
    base = [r for name in ("alpaca_en_demo.json", "alpaca_zh_demo.json")
            for r in json.loads((DATA / name).read_text(encoding="utf-8"))]
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            r = base[i % len(base)]
            f.write(json.dumps(dict(r, instruction=f"{r['instruction']} (#{i})"), ensure_ascii=False) + "\n")


def child(code: str, *args) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env,
                         check=False)
    if out.returncode:
        raise SystemExit(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=200_000)
    args = ap.parse_args()
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores", "date":
              str(date.today()), "records": args.records,
              "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                       cwd=ROOT).stdout.strip()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data, cache = tmp / "records.jsonl", tmp / "cache"
        make_records(data, args.records)
        result["data_mb"] = data.stat().st_size / 2**20
        for what in ("bare", "first", "cached"):
            result[what] = child(CHILD, what, data, cache, QWEN)
            print(what, result[what], flush=True)
        result["first_vs_bare"] = result["first"]["tokens_per_s"] / result["bare"]["tokens_per_s"]
        small = tmp / "small.jsonl"
        make_records(small, args.records // 10)
        child(CHILD, "first", small, cache, QWEN)  # build its cache; the loop maps it
        result["loop"] = {}
        for name, path in (("tenth", small), ("all", data)):
            result["loop"][name] = child(LOOP, path, cache, QWEN, tmp / "model")
            print("loop", name, result["loop"][name], flush=True)
    out = ROOT / "benchmarks" / "results" / "data_load-cpu.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
