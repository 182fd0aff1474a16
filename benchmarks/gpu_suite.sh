#!/usr/bin/env bash
# Every GPU check of lowrank in one command, sized for a short loan of one GPU (at most 9 minutes
# of a 10-minute command on an H100/H200): run from the repository root,
#
#     bash benchmarks/gpu_suite.sh            # results to benchmarks/results/ and, if set, $OUT
#
# 1. correctness on the GPU: the kernel tests, whose CUDA cases (bf16 included, which Triton's
#    CPU interpreter cannot check) run only there;
# 2. issue 18: the NF4 kernels against the bf16 base GEMM and dequantise-then-GEMM, Qwen2.5-7B's
#    q and down projections and q/k/v, gate/up merged, M = 4096 and 8192, r = 16 (target:
#    lowrank <= 1.15x base);
# 3. issue 16: the gated delta rule at Qwen3.5-9B's layer shape, Triton against
#    flash-linear-attention's kernel when `fla` imports (target: <= 1.2x its time);
# 4. the dense LoRA kernels, Qwen2.5-7B's q, down and q/k/v merged, M = 8192, r = 16.
# Each step has its own time limit and the suite goes on after a failed step; the log and every
# JSON go to $OUT as well (a device tool's return folder). Without a GPU each step runs its CPU
# mode on tiny shapes, which only checks that the suite itself works.
#
# flash-linear-attention: the machine may have no package index. Its ops are the pure-Python
# wheel `fla_core` (needs einops): put the wheel in .whl/ (git-ignored) and it is installed
# into a temporary folder first, e.g. `pip download --no-deps fla-core==0.5.2 -d .whl`.
set -uo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
results="$root/benchmarks/results"
out="${OUT:-}"
log="${out:-$results}/gpu_suite.log"
mkdir -p "$results" ${out:+"$out"}
: >"$log"
export PYTHONUNBUFFERED=1
py="$(command -v python3 || command -v python)"

# lowrank from this checkout, without installing it: a folder holding only a link to lowrank/
# (lowrank/__init__.py finds kernels/ beside the link's target). Nothing else of the repository
# root goes on sys.path, where transformers would import kernels/ as the PyPI package `kernels`.
site="$(mktemp -d)"
touch "$site/started"
ln -s "$root/lowrank" "$site/lowrank"
if compgen -G "$root/.whl/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$root"/.whl/*.whl \
        >>"$log" 2>&1 || echo "wheels in .whl/ did not install (see the log)" | tee -a "$log"
fi
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"

gpu=$("$py" -c "import torch; print(int(torch.cuda.is_available()))" 2>>"$log")
status=()
step() {  # step NAME SECONDS COMMAND...: run it from /tmp (so the repository root is not on sys.path)
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    echo "== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*" | tee -a "$log"
    (cd /tmp && timeout "$limit" "$@") >>"$log" 2>&1
    rc=$?
    status+=("$(printf '%-12s rc=%-3s %4ss' "$name" "$rc" $((SECONDS - start)))")
    tail -n 25 "$log"
}

{
    echo "lowrank $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo '?'), $(date -u +%F)"
    nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
    "$py" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
    "$py" -c "import fla; print('fla', getattr(fla, '__version__', '?'))" 2>/dev/null || echo "fla: not installed"
} 2>&1 | tee -a "$log"

if [ "$gpu" = 1 ]; then
    # the tests in three groups, each with its own limit, so that a slow first compile of one
    # group's kernels cannot starve the others
    step test-lora 120 "$py" -m pytest -q -p no:cacheprovider "$root/tests/test_lora_kernel.py" \
        "$root/tests/test_lora_nf4_kernel.py" "$root/tests/test_frozen_linear.py"
    step test-gdr 120 "$py" -m pytest -q -p no:cacheprovider "$root/tests/test_gated_delta_rule.py" \
        "$root/tests/test_causal_conv1d.py"
    step test-loss 45 "$py" -m pytest -q -p no:cacheprovider "$root/tests/test_linear_cross_entropy.py"
    step nf4 100 "$py" "$root/benchmarks/lora_matmul.py" --nf4 --models 7B --m 4096 8192 --r 16 --proj q down
    step gdr 90 "$py" "$root/benchmarks/gated_delta_rule.py" --t 1024 4096
    step lora 50 "$py" "$root/benchmarks/lora_matmul.py" --models 7B --m 8192 --r 16 --proj q down
else
    # the committed CPU results stay as they are: these tiny runs write to the temporary folder
    step test-lora 600 "$py" -m pytest -q -p no:cacheprovider "$root/tests/test_lora_kernel.py" -k benchmark
    step nf4 120 "$py" "$root/benchmarks/lora_matmul.py" --nf4 --quick --m 33 --reps 1 --proj k --out "$site/nf4.json"
    step gdr 120 "$py" "$root/benchmarks/gated_delta_rule.py" --quick --reps 1 --out "$site/gdr.json"
    step lora 120 "$py" "$root/benchmarks/lora_matmul.py" --quick --m 33 --reps 1 --proj k --out "$site/lora.json"
fi

if [ -n "$out" ]; then
    for f in "$results"/lora_matmul-*.json "$results"/gated_delta_rule-*.json; do
        [ -f "$f" ] && [ "$f" -nt "$site/started" ] && cp "$f" "$out/"
    done
fi
echo "== summary" | tee -a "$log"
printf '%s\n' "${status[@]}" | tee -a "$log"
