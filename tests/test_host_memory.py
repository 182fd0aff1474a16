"""lowrank/host_memory.py: freed tensors' memory goes back to the OS on glibc.

Each case runs in a fresh process (malloc's settings are the process's): 40 blocks of 5 MB are
allocated, each followed by a small tensor that outlives it, and then freed, after a freed
30 MB block has raised glibc's own mmap threshold (as quantising a checkpoint does). Without
`keep_heap_small` the blocks come from the heap and freeing them gives nothing back (only
malloc_trim does); with it they are mapped on their own and freeing them gives it all back.
"""

import ctypes
import json
import os
import subprocess
import sys

import pytest

try:
    GLIBC = sys.platform.startswith("linux") and hasattr(ctypes.CDLL("libc.so.6"), "mallopt")
except OSError:
    GLIBC = False
pytestmark = pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")

PROBE = r"""
import json, sys
import torch
import lowrank.host_memory as hm

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

def in_heap(t):
    for line in open("/proc/self/maps"):
        if line.rstrip().endswith("[heap]"):
            lo, hi = (int(v, 16) for v in line.split()[0].split("-"))
            return lo <= t.data_ptr() < hi
    return False

fixed = sys.argv[1] == "fixed" and hm.keep_heap_small()
t = torch.ones(30 << 20, dtype=torch.uint8)
del t
scratch, keep = [], []
for i in range(40):
    scratch.append(torch.ones(5 << 20, dtype=torch.uint8))
    keep.append(torch.ones(64 << 10, dtype=torch.uint8))
heap = in_heap(scratch[0])
before = rss()
del scratch
freed = before - rss()
trimmed = before - rss() if hm.trim() else 0
print(json.dumps({"fixed": fixed, "in_heap": heap, "freed_mb": freed >> 20, "trimmed_mb": trimmed >> 20}))
"""


def probe(mode, **env):
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1", **env), check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_glibc_keeps_freed_blocks_until_trimmed():
    r = probe("dynamic")
    assert not r["fixed"] and r["in_heap"]
    assert r["freed_mb"] < 50 <= 150 <= r["trimmed_mb"]  # 200 MB freed, resident until malloc_trim


def test_keep_heap_small_maps_large_blocks_so_freeing_returns_them():
    r = probe("fixed")
    assert r["fixed"] and not r["in_heap"]
    assert r["freed_mb"] >= 150


def test_lowrank_malloc_default_leaves_malloc_alone():
    r = probe("fixed", LOWRANK_MALLOC="default")
    assert not r["fixed"] and r["in_heap"] and r["freed_mb"] < 50 and r["trimmed_mb"] == 0


def test_a_quantised_cpu_load_keeps_the_heap_small_when_the_checkpoint_is_large(monkeypatch, tmp_path):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    import lowrank
    from lowrank import host_memory

    calls = []
    monkeypatch.setattr(host_memory, "keep_heap_small", lambda: calls.append(1) or True)
    monkeypatch.delenv("LOWRANK_MALLOC", raising=False)
    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128)
    Qwen2ForCausalLM(cfg).save_pretrained(tmp_path)
    size = (tmp_path / "model.safetensors").stat().st_size
    assert host_memory.physical_memory() > 100 * size  # this machine's, or its cgroup's
    lowrank.load_model(tmp_path, quantize="nf4")
    assert calls == []  # a checkpoint small next to the machine's memory: malloc as it is
    monkeypatch.setattr(host_memory, "physical_memory", lambda: 3 * size)  # the checkpoint is a third of it
    lowrank.load_model(tmp_path)
    assert calls == []  # a full-precision load leaves malloc as it is
    lowrank.load_model(tmp_path, quantize="nf4")
    assert calls == [1, 1]  # before reading (quantising makes the scratch), and after
    monkeypatch.setattr(host_memory, "physical_memory", lambda: 5 * size)  # a fifth: under MEMORY_SHARE
    calls.clear()
    lowrank.load_model(tmp_path, quantize="nf4")
    assert calls == []
    monkeypatch.setenv("LOWRANK_MALLOC", "small")
    lowrank.load_model(tmp_path, quantize="nf4")
    assert calls == [1, 1]
    monkeypatch.setenv("LOWRANK_MALLOC", "default")
    monkeypatch.setattr(host_memory, "physical_memory", lambda: 3 * size)
    calls.clear()
    lowrank.load_model(tmp_path, quantize="nf4")
    assert calls == []


def test_a_misspelt_lowrank_malloc_is_refused_by_name(monkeypatch):
    from lowrank import host_memory
    from lowrank.errors import ConfigError

    monkeypatch.setenv("LOWRANK_MALLOC", "smal")
    with pytest.raises(ConfigError, match="LOWRANK_MALLOC='smal': expected 'small'"):
        host_memory.heap_matters(1)
    monkeypatch.setenv("LOWRANK_MALLOC", "auto")
    assert host_memory.heap_matters(1) is False
