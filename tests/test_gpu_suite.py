"""benchmarks/gpu_suite.sh, the one command a lent GPU runs, in its CPU mode: each step must run
(so the script does not rot between the rare sessions that have a GPU), and its summary and log
must come back in $OUT. The CPU mode writes nothing under benchmarks/results/."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the suite is the real, minutes-long run")
@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_gpu_suite_runs_every_step_in_cpu_mode(tmp_path):
    results = ROOT / "benchmarks" / "results"
    before = {p.name: p.stat().st_mtime_ns for p in results.iterdir()}
    env = dict(os.environ, OUT=str(tmp_path), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    summary = done.stdout.split("== summary", 1)[1].split()
    steps = dict(zip(summary[0::3], summary[1::3]))
    assert steps == {name: "rc=0" for name in ("test-lora", "nf4", "gdr", "lora")}, done.stdout[-3000:]
    log = (tmp_path / "gpu_suite.log").read_text()
    assert "1 passed" in log and "dequant+gemm" in log and "torch-chunked" in log
    assert {p.name: p.stat().st_mtime_ns for p in results.iterdir()} == before
