"""Data at scale: lowrank's first load (tokenise + write the cache), its cached load, and bare
`tokenizers` encode_batch on the same rendered texts, side by side; then the training loop's
memory over its first 50 steps on a tenth of the records and on all of them. Run:

    python -m benchmarks.data_load [--records 200000]

The records are the shipped alpaca demos (English and Chinese) repeated, each instruction
numbered so that no two are the same: 200,000 of them are 147 MB of JSON Lines and 36 M tokens
with Qwen2.5's tokenizer. Every measurement runs in its own process and reads its own peak
resident set (VmHWM of /proc/self/status), reported above the process's RSS once lowrank is
imported (`peak_rss_mb`) and above its RSS once the tokenizer and the inputs are ready
(`peak_over_ready_mb`: for bare encode_batch, the rendered texts are made before the clock).
Bare encode_batch takes the texts 2,048 records' worth at a time, as lowrank's load does.
The loop runs 50 steps of a one-layer, 32-wide Qwen2 (full vocabulary, fused loss) on shuffled
batches of 4 (no grouping by length, so both data sizes draw batches of the same shapes); its
peak RSS is reset after build_run (/proc/self/clear_refs), so it is the steps' own.
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

MAX_LEN = 4096  # no alpaca demo is longer: every token is kept, and the loop maps the same cache entry

CHILD = r"""
import json, re, sys, time

def rss_kb(key):
    return int(re.search(key + r":\s+(\d+)", open("/proc/self/status").read()).group(1))

import lowrank
from lowrank.data.dataset import CHUNK, conversation_spans, iter_records, record_to_messages
imported = rss_kb("VmRSS")
what, data, cache, max_len = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[5])
tok = lowrank.load_tokenizer(sys.argv[4])
if what == "bare":  # the texts lowrank tokenises, rendered before the clock starts
    texts = [t for r in iter_records(data) for t, _ in conversation_spans(record_to_messages(r), tok)]
ready = rss_kb("VmRSS")
t0 = time.perf_counter()
if what == "bare":
    encode, tokens = tok.backend.tok.encode_batch, 0
    for i in range(0, len(texts), CHUNK):
        tokens += sum(len(e.ids) for e in encode(texts[i:i + CHUNK], add_special_tokens=False))
else:
    examples, report = lowrank.load_dataset(data, tok, max_len, cache_dir=cache)
    tokens = report.n_tokens
    assert report.from_cache == (what == "cached"), report
seconds = time.perf_counter() - t0
peak = rss_kb("VmHWM")
print(json.dumps({"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
                  "peak_rss_mb": (peak - imported) / 1024, "peak_over_ready_mb": (peak - ready) / 1024,
                  "rss_lowrank_imported_mb": imported / 1024}))
"""

LOOP = r"""
import json, re, sys
import torch
import lowrank
from lowrank.models import ModelConfig, build_model, save_model
from lowrank.train.loop import TrainConfig, build_run, epoch_batches, step_share, train_step

def rss_kb(key):
    return int(re.search(key + r":\s+(\d+)", open("/proc/self/status").read()).group(1))

data, cache, tokenizer, model_dir, max_len = sys.argv[1:6]
if not (Path := __import__("pathlib").Path)(model_dir, "config.json").is_file():
    cfg = ModelConfig(model_type="qwen2", vocab_size=151936, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16, qkv_bias=True,
                      max_position_embeddings=int(max_len))
    save_model(build_model(cfg), model_dir)
cfg = TrainConfig(model=model_dir, tokenizer=tokenizer, data=data, output=model_dir + "-out", data_cache=cache,
                  max_len=int(max_len), batch_size=4, max_steps=50, dtype="float32", device="cpu", progress=False,
                  group_by_length=False)
run = build_run(cfg)
assert run.data_reports[0].from_cache, run.data_reports[0]  # mapped: the steps, not a build, are measured
after_build = rss_kb("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # VmHWM restarts from the current RSS
batches = epoch_batches(run, 0)
step_rss = []
for k in range(50):
    train_step(run, step_share(run, batches, k), k)
    step_rss.append(rss_kb("VmRSS") / 1024)
print(json.dumps({"examples": len(run.train_examples), "rss_after_build_mb": after_build / 1024,
                  "rss_after_step_1_mb": step_rss[0], "rss_after_step_50_mb": step_rss[-1],
                  "peak_rss_over_50_steps_mb": rss_kb("VmHWM") / 1024,
                  "growth_over_50_steps_mb": (rss_kb("VmHWM") - after_build) / 1024}))
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
    load = os.getloadavg()[0]
    out = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env,
                         check=False)
    if out.returncode:
        raise SystemExit(out.stderr)
    # The machine may be shared: the 1-minute load average before and after each measurement.
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "load_avg": [load, os.getloadavg()[0]]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "data_load-cpu.json"))
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
            result[what] = child(CHILD, what, data, cache, QWEN, MAX_LEN)
            print(what, result[what], flush=True)
        result["first_vs_bare"] = result["first"]["tokens_per_s"] / result["bare"]["tokens_per_s"]
        small = tmp / "small.jsonl"
        make_records(small, args.records // 10)
        # Its first load builds the cache the loop maps, and shows the first load's memory by size.
        result["first_tenth"] = child(CHILD, "first", small, cache, QWEN, MAX_LEN)
        print("first_tenth", result["first_tenth"], flush=True)
        result["loop"] = {}
        for name, path in (("tenth", small), ("all", data)):
            result["loop"][name] = child(LOOP, path, cache, QWEN, tmp / "model", MAX_LEN)
            print("loop", name, result["loop"][name], flush=True)
    loop = result["loop"]
    result["targets"] = {
        "first_vs_bare >= 0.6": result["first_vs_bare"] >= 0.6,
        "cached seconds <= 3": result["cached"]["seconds"] <= 3,
        "cached peak_rss_mb <= 300": result["cached"]["peak_rss_mb"] <= 300,
        "loop peak: all - tenth (MB)": loop["all"]["peak_rss_over_50_steps_mb"] - loop["tenth"]["peak_rss_over_50_steps_mb"],
    }
    out = Path(args.out)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
