"""Peak memory of lowrank.load_model against the size of the weights it reads.

The model is built on the meta device and the tensors are assigned from the safetensors
files, so the peak should stay near one copy of the weights. Run:

    python -m benchmarks.load_memory [--mb 300]

Each measurement runs in a fresh process and reads its peak resident set (VmHWM).
"""

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

import torch

from lowrank import ModelConfig, build_model, save_model

# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork and exec.
CHILD = """
import re, sys, torch, lowrank
def hwm_kb():
    return int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
# The first model built on the meta device imports torch's meta kernels (~150 MB, once per
# process, whatever the model size): pay that before measuring what the weights cost.
cfg = lowrank.read_config(sys.argv[1])
cfg.num_hidden_layers, cfg.vocab_size = 1, 8
with torch.device("meta"):
    lowrank.build_model(cfg)
before = hwm_kb()
model = lowrank.load_model(sys.argv[1])
# safetensors may hand back tensors that map the file lazily: touch every page.
torch.stack([p.detach().float().sum() for p in model.parameters()]).sum().item()
after = hwm_kb()
n = sum(p.numel() * p.element_size() for p in model.parameters())
print(before, after, n)
"""


def make_checkpoint(folder: Path, target_mb: int) -> int:
    # Qwen2-shaped: 896 wide, GQA 14/2, MLP 4864; layers added until the target size.
    layers = max(1, round(target_mb * 2**20 / 4 / (896 * 896 * 2 + 896 * 128 * 2 + 3 * 896 * 4864)))
    cfg = ModelConfig(model_type="qwen2", vocab_size=32000, hidden_size=896, intermediate_size=4864,
                      num_hidden_layers=layers, num_attention_heads=14, num_key_value_heads=2, head_dim=64,
                      qkv_bias=True, tie_word_embeddings=True)
    model = build_model(cfg)
    save_model(model, folder, max_shard_size="5GB")
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=300, help="approximate checkpoint size in MB")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        file_bytes = make_checkpoint(Path(tmp), args.mb)
        out = subprocess.run([sys.executable, "-c", CHILD, tmp], capture_output=True, text=True, check=True)
    before_kb, after_kb, param_bytes = map(int, out.stdout.split())
    result = {
        "date": str(date.today()), "machine": platform.machine(), "torch": torch.__version__,
        "checkpoint_mb": file_bytes / 2**20, "params_mb": param_bytes / 2**20,
        "rss_before_mb": before_kb / 1024, "rss_peak_mb": after_kb / 1024,
        "peak_over_weights": (after_kb - before_kb) * 1024 / file_bytes,
    }
    print(f"checkpoint {result['checkpoint_mb']:.0f} MB; process RSS {result['rss_before_mb']:.0f} MB before "
          f"loading, peak {result['rss_peak_mb']:.0f} MB; growth = {result['peak_over_weights']:.2f}x the weights")
    path = Path(__file__).parent / "results" / "load_memory-cpu.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
