"""Time the gated delta rule: the recurrence, the chunked torch path, Triton, and fla if installed.

    python -m benchmarks.gated_delta_rule                       # GPU: Qwen3.5-9B linear-attention shapes, bf16
    python -m benchmarks.gated_delta_rule --t 4096 --batch 1    # one shape
    python -m benchmarks.gated_delta_rule --quick               # tiny shape, fp32, CPU (the default without a GPU)
    python -m benchmarks.gated_delta_rule --compile-only        # build every kernel for sm_90, no GPU: ptxas's report

Shapes are one Gated DeltaNet layer of Qwen3.5-9B (config.json: linear_num_value_heads = 32,
linear_key_head_dim = 128, linear_value_head_dim = 128; the 16 key heads are repeated to the 32
value heads before the call). Per implementation, forward alone and forward + backward
(grads of q, k, v, g, beta), median of --reps after a warm-up:
  recurrence     gated_delta_rule_reference, a token at a time (the spec; skipped for long T)
  torch-chunked  chunk_gated_delta_rule_torch (the CPU path and fallback)
  triton         chunk_gated_delta_rule with LOWRANK_KERNEL=triton (CUDA only)
  fla            fla.ops.gated_delta_rule.chunk_gated_delta_rule, if `fla` imports (CUDA only)
Writes benchmarks/results/gated_delta_rule-<device>.json.
"""

import argparse
import datetime
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lowrank.kernels import chunk_gated_delta_rule, gated_delta_rule_reference
from lowrank.kernels.gated_delta_rule import chunk_gated_delta_rule_torch

RESULTS = Path(__file__).resolve().parent / "results"
QWEN35_9B = dict(heads=32, k=128, v=128)  # linear_num_value_heads, linear_key_head_dim, linear_value_head_dim
TINY = dict(heads=2, k=32, v=32)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MAX_RECURRENCE_T = 1024  # a token at a time in Python: longer sequences take minutes


def make_inputs(batch, t, shape, dtype, device):
    g = torch.Generator(device).manual_seed(0)
    H, K, V = shape["heads"], shape["k"], shape["v"]
    q = torch.randn(batch, t, H, K, device=device, generator=g)
    k = F.normalize(torch.randn(batch, t, H, K, device=device, generator=g), dim=-1)
    v = torch.randn(batch, t, H, V, device=device, generator=g)
    gate = -F.softplus(torch.randn(batch, t, H, device=device, generator=g))
    beta = torch.rand(batch, t, H, device=device, generator=g)
    return [x.to(dtype).requires_grad_() for x in (q, k, v)] + [x.requires_grad_() for x in (gate, beta)]


def torch_chunked(q, k, v, g, beta):
    return chunk_gated_delta_rule_torch(q, k, v, g, beta, None, q.shape[-1] ** -0.5)[0]


def implementations(device):
    impls = {"recurrence": lambda *x: gated_delta_rule_reference(*x)[0],
             "torch-chunked": torch_chunked}
    if device == "cuda":
        def triton_path(*x):
            os.environ["LOWRANK_KERNEL"] = "triton"
            try:
                return chunk_gated_delta_rule(*x)[0]
            finally:
                os.environ.pop("LOWRANK_KERNEL")

        impls["triton"] = triton_path
        try:
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk

            impls["fla"] = lambda *x: fla_chunk(*x)[0]
        except ImportError:
            pass
        except Exception as e:  # fla 0.5.2 under triton 3.9 fails while decorating its kernels
            print(f"fla is installed but does not import ({type(e).__name__}: {e}); timing without it")
    return impls


def timed(fn, inputs, backward, reps, device):
    def once():
        for x in inputs:
            x.grad = None
        o = fn(*inputs)
        if backward:
            o.float().sum().backward()

    once()  # warm-up: compilation, autotuning, allocator
    times = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        once()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def compile_check() -> bool:
    """Compile every forward and backward kernel for sm_90 without a GPU, at the Qwen3.5-9B shape
    (K = V = 128, bf16 q/k/v) with the launchers' meta-parameters: catches what the interpreter
    cannot (types, layouts, shared memory) and prints ptxas's registers and spills per kernel.
    False if a kernel needs more shared memory than an H100 has."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from benchmarks.lora_matmul import _ptxas_registers
    from lowrank.kernels import gated_delta_rule_triton_bwd as bwd
    from lowrank.kernels import gated_delta_rule_triton_fwd as fwd

    if not hasattr(fwd._wy_kernel, "params"):
        raise SystemExit("TRITON_INTERPRET=1 is set: unset it to compile")
    smem_limit = 232448  # H100: 227 KB of shared memory per block
    low_precision = {"q_ptr", "k_ptr", "v_ptr", "o_ptr", "do_ptr", "dq_ptr", "dk_ptr", "dv_ptr"}

    def signature(fn):  # 16-divisible pointers, as a launch on these shapes would specialise them
        sig, attrs = {}, {}
        for i, param in enumerate(fn.params):
            name = param.name
            if param.is_constexpr:
                sig[name] = "constexpr"
            elif name.endswith("_ptr"):
                sig[name] = "*bf16" if name in low_precision else "*fp32"
                attrs[(i,)] = [["tt.divisibility", 16]]
            else:
                sig[name] = "fp32" if name == "scale" else "i32"
        return sig, attrs

    BK, BV_full, BV_seq, BV_par = fwd.blocks(QWEN35_9B["k"], QWEN35_9B["v"], on_gpu=True)
    common = dict(BT=fwd.CHUNK, BK=BK, BV=BV_seq, PRECISION="tf32", HAS_INITIAL=True, HAS_FINAL_GRAD=True)
    jobs = [(fwd._wy_kernel, dict(BV=BV_full)), (fwd._state_kernel, {}), (fwd._output_kernel, dict(BV=BV_par)),
            (bwd._dv_local_kernel, dict(BV=BV_par)), (bwd._dstate_kernel, {}), (bwd._dqk_kernel, {}),
            (bwd._dwy_kernel, {})]
    fits = True
    for fn, meta in jobs:
        sig, attrs = signature(fn)
        consts = {k: v for k, v in {**common, **meta}.items() if k in sig}
        out = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                             target=GPUTarget("cuda", 90, 32), options=dict(num_warps=fwd.NUM_WARPS))
        regs, spilled = _ptxas_registers(out.asm["ptx"])
        fits &= out.metadata.shared <= smem_limit
        print(f"{fn.__name__:>16} BV={consts['BV']} warps={fwd.NUM_WARPS}: {out.metadata.shared / 1024:.0f} KB shared"
              f"{'' if out.metadata.shared <= smem_limit else ' TOO BIG'}, {regs} registers, {spilled} bytes spilled",
              flush=True)
    return fits


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny shape, fp32 (the default without a GPU)")
    p.add_argument("--t", type=int, nargs="+", help="sequence lengths (default 1024 4096, quick: 100)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=DTYPES)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", type=Path)
    p.add_argument("--compile-only", action="store_true",
                   help="compile every kernel for sm_90 (no GPU needed) and print ptxas's registers and spills")
    args = p.parse_args(argv)
    if args.compile_only:
        raise SystemExit(0 if compile_check() else 1)
    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    quick = args.quick or device == "cpu"
    shape = TINY if quick else QWEN35_9B
    lengths = args.t or ([100] if quick else [1024, 4096])
    dtype = DTYPES[args.dtype or ("fp32" if quick else "bf16")]

    rows = []
    for t in lengths:
        inputs = make_inputs(args.batch, t, shape, dtype, device)
        # Every implementation's output against the chunked torch path on fp32 copies of the same
        # inputs: a timing of something that computes another function (a layout or gate
        # convention of fla's read wrong, say) shows as a large error, not as a speed-up.
        with torch.no_grad():
            ref = torch_chunked(*(x.detach().float() for x in inputs))
        for name, fn in implementations(device).items():
            if name == "recurrence" and t > MAX_RECURRENCE_T:
                continue
            with torch.no_grad():
                err = ((fn(*inputs).float() - ref).norm() / ref.norm()).item()
            for backward in (False, True):
                ms = timed(fn, inputs, backward, args.reps, device)
                rows.append(dict(impl=name, T=t, batch=args.batch, backward=backward, ms=ms,
                                 tokens_per_s=args.batch * t / ms * 1e3, rel_err=err))

    print(f"heads={shape['heads']} K={shape['k']} V={shape['v']} batch={args.batch} "
          f"{str(dtype).removeprefix('torch.')} on {device}")
    print(f"{'impl':14} {'T':>6} {'pass':>8} {'ms':>10} {'tokens/s':>12} {'rel err':>9}")
    for r in rows:
        print(f"{r['impl']:14} {r['T']:>6} {'fwd+bwd' if r['backward'] else 'fwd':>8} {r['ms']:>10.2f} "
              f"{r['tokens_per_s']:>12.0f} {r['rel_err']:>9.1e}")
    out = args.out or RESULTS / f"gated_delta_rule-{device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(date=datetime.date.today().isoformat(), torch=torch.__version__,
                device=torch.cuda.get_device_name() if device == "cuda" else f"cpu, {os.cpu_count()} cores",
                shape=dict(shape, dtype=str(dtype).removeprefix("torch.")),
                note="median ms of the repeats after one warm-up; fwd+bwd: grads of q, k, v, g, beta",
                load_average=os.getloadavg())
    out.write_text(json.dumps(dict(**meta, rows=rows), indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
