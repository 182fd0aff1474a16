"""Time lowrank's fused LoRA matmul against the base GEMM and PEFT's unfused computation.

    python -m benchmarks.lora_matmul                        # GPU: all Qwen2.5 shapes below, bf16
    python -m benchmarks.lora_matmul --models 7B --m 8192 --r 16 --proj q k v   # a subset
    python -m benchmarks.lora_matmul --quick                # tiny shapes, fp32 (default without a GPU)
    python -m benchmarks.lora_matmul --nf4 --models 7B --m 4096 8192 --r 16   # QLoRA: the NF4 kernels
    python -m benchmarks.lora_matmul --nf4 --compile-only   # the NF4 GEMMs compiled for sm_90, no GPU
    python -m benchmarks.lora_matmul --roofline             # FLOPs, bytes, intensity: no timing
    python -m benchmarks.lora_matmul --compile-only         # build every kernel/config for sm_90, no GPU:
                                                            # shared memory, registers, spills

Per projection of Qwen2.5-0.5B/1.5B/7B (q, k, v, o, gate, up, down), M tokens, rank r:
  base     F.linear(x, W, bias), the frozen GEMM alone
  peft     lora_linear_reference: base + scale * (dropout(x) @ A.T) @ B.T, as PEFT runs it
  lowrank  lora_linear (the fused Triton kernels on a GPU, the torch reference elsewhere)
each forward alone and forward + backward (grads of x, A, B; W frozen), with and without
dropout; and q/k/v merged: lora_linear_merged against its one wide base GEMM, three separate
lora_linear calls and three PEFT calls. Writes benchmarks/results/lora_matmul-<device>.json.

With --nf4, the same projections (and q/k/v, gate/up merged) on an NF4 base, double-quantised
as bitsandbytes stores it (issue 18's target: lowrank <= 1.15x base at M >= 4096):
  base          F.linear(x, W) on the bf16 weight, the GEMM QLoRA has to compete with
  dequant       dequantize_nf4 alone, into the compute dtype
  dequant_gemm  dequantise, then lora_linear on the dense weight (what unsloth and peft +
                bitsandbytes do: a weight-sized buffer, then a GEMM that reads it)
  lowrank       lora_linear on the NF4Weight (the fused kernels read 0.5 byte per weight)
Written to benchmarks/results/lora_matmul-nf4-<device>.json.
Without a GPU the same tables run on the torch path at tiny sizes, so the script is exercised.
"""

import argparse
import datetime
import itertools
import json
import re
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lowrank.kernels import (dequantize_nf4, lora_linear, lora_linear_merged, lora_linear_reference, quantize_nf4,
                             use_triton)

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = {  # Qwen2.5 config.json values; "tiny" is for --quick
    "0.5B": dict(hidden=896, heads=14, kv_heads=2, head_dim=64, intermediate=4864),
    "1.5B": dict(hidden=1536, heads=12, kv_heads=2, head_dim=128, intermediate=8960),
    "7B": dict(hidden=3584, heads=28, kv_heads=4, head_dim=128, intermediate=18944),
    "tiny": dict(hidden=128, heads=4, kv_heads=2, head_dim=32, intermediate=384),
}
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
# H100 SXM datasheet: dense bf16 tensor-core peak and HBM3 bandwidth.
H100_FLOPS, H100_BYTES_PER_S = 989e12, 3.35e12


def projection_shapes(cfg: dict) -> dict:
    """name -> (K in, N out, has bias): Qwen2 puts a bias on q, k and v only."""
    h, q, kv, i = cfg["hidden"], cfg["heads"] * cfg["head_dim"], cfg["kv_heads"] * cfg["head_dim"], cfg["intermediate"]
    return {"q": (h, q, True), "k": (h, kv, True), "v": (h, kv, True), "o": (q, h, False),
            "gate": (h, i, False), "up": (h, i, False), "down": (i, h, False)}


def flops(M, K, N, r, backward: bool, lora=True) -> float:
    """Base 2MNK (forward) + 2MNK (dx; W is frozen); LoRA 2Mr(K+N) forward, 4Mr(K+N) backward."""
    base = 2 * M * N * K * (2 if backward else 1)
    return base + (2 * M * r * (K + N) * (3 if backward else 1) if lora else 0)


def kernel_bytes(M, K, N, r, backward: bool, elt=2) -> float:
    """HBM traffic of the fused kernels, each operand moved once per kernel that needs it:
    x is read twice forward (xs pass, GEMM) and once more backward (dA); dy twice (dxs/dB pass,
    dx GEMM); W once each way; the r-wide xs/dxs and A, B; dA, dB in fp32 (zeroed, cast).
    The fp32 atomics into dA and dB stay in L2 and are not counted."""
    fwd = elt * (2 * M * K + N * K + M * N + 2 * M * r + r * (K + N))
    bwd = elt * (2 * M * N + N * K + 2 * M * K + 4 * M * r + 2 * r * (K + N)) + 4 * 2 * r * (K + N)
    return fwd + (bwd if backward else 0)


def roofline_table(m: int, r: int, ranks) -> str:
    """Markdown: per projection (and q/k/v merged), fwd+bwd FLOPs and bytes at (m, r), the H100
    floor, and the LoRA term's share of the fwd+bwd FLOPs at each rank."""
    head = (f"| model | proj | K | N | GFLOP | MB | FLOP/B | H100 bound | floor (us) | "
            + " | ".join(f"LoRA r={k}" for k in ranks) + " |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for model in ("0.5B", "1.5B", "7B"):
        shapes = projection_shapes(MODELS[model])
        rows = {proj: [(K, N)] for proj, (K, N, _) in shapes.items()}
        rows["qkv merged"] = [shapes[p][:2] for p in ("q", "k", "v")]
        for proj, segs in rows.items():
            K, N = segs[0][0], sum(n for _, n in segs)
            f = sum(flops(m, K, n, r, True) for _, n in segs)
            b = kernel_bytes(m, K, N, r * len(segs), True)
            bound = "compute" if f / H100_FLOPS > b / H100_BYTES_PER_S else "memory"
            floor = max(f / H100_FLOPS, b / H100_BYTES_PER_S)
            lora_share = [1 - flops(m, K, N, 0, True) / sum(flops(m, K, n, k, True) for _, n in segs) for k in ranks]
            shares = " | ".join(f"{100 * share:.1f}%" for share in lora_share)
            lines.append(f"| {model} | {proj} | {K} | {N} | {f / 1e9:.1f} | {b / 1e6:.0f} | {f / b:.0f} | {bound} "
                         f"| {floor * 1e6:.0f} | {shares} |")
    return "\n".join(lines)


def timer(device: torch.device, reps: int):
    """Median milliseconds of fn(): triton's do_bench on a GPU, perf_counter on the CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median")

    def cpu_time(fn):
        fn()
        samples = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t) * 1e3)
        return statistics.median(samples)

    return cpu_time


def make_inputs(M, K, widths, biases, r, dtype, device, seed=0):
    g = torch.Generator(device).manual_seed(seed)
    x = torch.randn(M, K, generator=g, device=device).to(dtype).requires_grad_()
    params = []
    for n, bias in zip(widths, biases):
        w = (torch.randn(n, K, generator=g, device=device) / K**0.5).to(dtype)
        b = torch.randn(n, generator=g, device=device).to(dtype) if bias else None
        a = (torch.randn(r, K, generator=g, device=device) / K**0.5).to(dtype).requires_grad_()
        bb = (torch.randn(n, r, generator=g, device=device) / r**0.5).to(dtype).requires_grad_()
        params.append((w, b, a, bb))
    return x, params


def step(outputs_fn, inputs, backward: bool):
    """fn() running the forward, and the backward into `inputs` when asked."""
    if not backward:
        return outputs_fn

    def run():
        outs = outputs_fn()
        outs = outs if isinstance(outs, (list, tuple)) else [outs]
        torch.autograd.grad(outs, inputs, [torch.ones_like(o) for o in outs])

    return run


def bench_projection(t, model, proj, M, r, p, backward, dtype, device) -> dict:
    K, N, has_bias = projection_shapes(MODELS[model])[proj]
    x, [(w, b, a, bb)] = make_inputs(M, K, [N], [has_bias], r, dtype, device)
    scale = 2.0
    times = {
        "base": t(step(lambda: F.linear(x, w, b), [x], backward)),
        "peft": t(step(lambda: lora_linear_reference(x, w, b, a, bb, scale, p), [x, a, bb], backward)),
        "lowrank": t(step(lambda: lora_linear(x, w, b, a, bb, scale, p), [x, a, bb], backward)),
    }
    return dict(model=model, proj=proj, M=M, K=K, N=N, r=r, dropout=p, backward=backward,
                flops=flops(M, K, N, r, backward), base_flops=flops(M, K, N, r, backward, lora=False),
                ms=times)


def bench_merged_qkv(t, model, M, r, p, backward, dtype, device) -> dict:
    shapes = projection_shapes(MODELS[model])
    K = shapes["q"][0]
    widths = [shapes[n][1] for n in ("q", "k", "v")]
    x, params = make_inputs(M, K, widths, [True] * 3, r, dtype, device)
    ws, bs, As, Bs = (list(z) for z in zip(*params))
    w_cat, b_cat = torch.cat(ws), torch.cat(bs)
    lora_params = [x] + As + Bs
    scales = [2.0] * 3
    times = {
        "base": t(step(lambda: F.linear(x, w_cat, b_cat), [x], backward)),
        "peft": t(step(lambda: [lora_linear_reference(x, *pr, 2.0, p) for pr in params], lora_params, backward)),
        "lowrank_separate": t(step(lambda: [lora_linear(x, *pr, 2.0, p) for pr in params], lora_params, backward)),
        "lowrank": t(step(lambda: lora_linear_merged(x, ws, bs, As, Bs, scales, p), lora_params, backward)),
    }
    N = sum(widths)
    return dict(model=model, proj="qkv", M=M, K=K, N=N, r=r, dropout=p, backward=backward,
                flops=sum(flops(M, K, n, r, backward) for n in widths),
                base_flops=flops(M, K, N, r, backward, lora=False), ms=times)


def bench_nf4(t, model, projs, M, r, backward, dtype, device) -> dict:
    """One NF4 row: `projs` is one projection, or several of one input run as one merged call."""
    shapes = projection_shapes(MODELS[model])
    K = shapes[projs[0]][0]
    widths, biases = [shapes[p][1] for p in projs], [shapes[p][2] for p in projs]
    x, params = make_inputs(M, K, widths, biases, r, dtype, device)
    ws, bs, As, Bs = (list(z) for z in zip(*params))
    qws = [quantize_nf4(w, 64, double_quant=True) for w in ws]
    w_cat, b_cat = torch.cat(ws), (torch.cat(bs) if all(b is not None for b in bs) else None)
    lora_params = [x] + As + Bs
    scales = [2.0] * len(projs)

    def lora(weights):
        if len(projs) == 1:
            return lora_linear(x, weights[0], bs[0], As[0], Bs[0], 2.0)
        return lora_linear_merged(x, weights, bs, As, Bs, scales)

    times = {
        "base": t(step(lambda: F.linear(x, w_cat, b_cat), [x], backward)),
        "dequant": t(lambda: [dequantize_nf4(q, dtype) for q in qws]),
        "dequant_gemm": t(step(lambda: lora([dequantize_nf4(q, dtype) for q in qws]), lora_params, backward)),
        "lowrank": t(step(lambda: lora(qws), lora_params, backward)),
    }
    N = sum(widths)
    return dict(model=model, proj="_".join(projs) if len(projs) > 1 else projs[0], M=M, K=K, N=N, r=r,
                dropout=0.0, backward=backward, weight="nf4-double",
                flops=sum(flops(M, K, n, r, backward) for n in widths),
                base_flops=flops(M, K, N, r, backward, lora=False), ms=times)


def print_nf4_row(row):
    ms = row["ms"]
    print(f"{row['model']:>5} {row['proj']:>9} {row['M']:>6} {row['r']:>3} {'f+b' if row['backward'] else 'fwd':>3} | "
          f"base {ms['base']:8.3f} dequant {ms['dequant']:8.3f} dequant+gemm {ms['dequant_gemm']:8.3f} "
          f"lowrank {ms['lowrank']:8.3f} | lowrank/base {ms['lowrank'] / ms['base']:5.2f} "
          f"dequant+gemm/lowrank {ms['dequant_gemm'] / ms['lowrank']:5.2f}", flush=True)


def print_row(row):
    ms = row["ms"]
    tflops = row["flops"] / (ms["lowrank"] * 1e-3) / 1e12
    extra = f" sep {ms['lowrank_separate']:8.3f}" if "lowrank_separate" in ms else " " * 13
    print(f"{row['model']:>5} {row['proj']:>4} {row['M']:>6} {row['r']:>3} {row['dropout']:>4} "
          f"{'f+b' if row['backward'] else 'fwd':>3} | base {ms['base']:8.3f} peft {ms['peft']:8.3f} "
          f"lowrank {ms['lowrank']:8.3f}{extra} | {tflops:7.3g} TFLOP/s | peft/base {ms['peft'] / ms['base']:5.2f} "
          f"lowrank/base {ms['lowrank'] / ms['base']:5.2f} peft/lowrank {ms['peft'] / ms['lowrank']:5.2f}",
          flush=True)


def device_slug(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def run(args, save=lambda result: None) -> dict:
    """The table `args` asks for; `save(result so far)` after each row, so a run stopped at a
    time limit keeps what it measured."""
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    quick = args.quick or device.type == "cpu"
    models = args.models or (["tiny"] if quick else ["0.5B", "1.5B", "7B"])
    ms_list = args.m or ([64, 256] if quick else [4096, 8192, 16384])
    ranks = args.r or ([8] if quick else [8, 16, 64])
    dtype = torch.float32 if quick else torch.bfloat16  # bf16 matmuls on a CPU measure nothing useful
    t = timer(device, reps=args.reps)
    rows = []
    path = "triton" if use_triton(torch.empty(0, device=device)) else "torch reference"
    print(f"device {device_slug(device)}, {dtype}, lowrank = {path}, times in ms (median)")

    def add(row, show):
        rows.append(row)
        show(row)
        save(_result(rows, device, dtype, quick, path))

    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)  # tiny matmuls: more threads only add scheduling noise
    try:
        if args.nf4:
            groups = [(p,) for p in args.proj or PROJECTIONS] + [("q", "k", "v"), ("gate", "up")]
            for model, M, r, backward in itertools.product(models, ms_list, ranks, (False, True)):
                for projs in groups:
                    add(bench_nf4(t, model, projs, M, r, backward, dtype, device), print_nf4_row)
        else:
            for model, M, r, p, backward in itertools.product(models, ms_list, ranks, (0.0, 0.1), (False, True)):
                for proj in args.proj or PROJECTIONS:
                    add(bench_projection(t, model, proj, M, r, p, backward, dtype, device), print_row)
                add(bench_merged_qkv(t, model, M, r, p, backward, dtype, device), print_row)
    finally:
        torch.set_num_threads(threads)
    return _result(rows, device, dtype, quick, path)


def _result(rows, device, dtype, quick, path) -> dict:
    return {"date": str(datetime.date.today()), "device": device_slug(device), "torch": torch.__version__,
            "dtype": str(dtype).removeprefix("torch."), "quick": quick, "lowrank_path": path,
            "note": "ms = median time; flops count the LoRA term, base_flops the GEMM alone", "rows": rows}


def compile_check(r_pad: int = 128, dropout: bool = True, nf4: bool = False) -> bool:
    """Compile every kernel and autotune config for sm_90 without a GPU, for q/k/v merged at rank
    r_pad: catches what the interpreter cannot (types, layouts, shared memory, register spills).
    Arguments get the specialisations a launch on Qwen shapes would give them: 16-divisible
    pointers and sizes, and x's unit stride as a constant. nf4: the two GEMMs that read a
    double-quantised NF4 weight (lora_nf4.py) instead of the dense ones."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lowrank.kernels import lora_merged as lm

    if not hasattr(lm._fwd_kernel, "params"):
        raise SystemExit("TRITON_INTERPRET=1 is set: unset it to compile")
    nseg, smem_limit = 3, 232448  # H100: 227 KB of shared memory per block
    aligned = {"M", "K", "R_TOTAL", "N_TOTAL", "stride_xm", "n_sizes", "M_BUCKET"}
    # element types where a name's default (bf16 pointers, i32 scalars) is not it
    types = {"da_ptrs": "*fp32", "db_ptrs": "*fp32", "scales": "fp32", "inv_keep": "fp32",
             "code_ptr": "*fp32", "dyn_ptr": "*fp32", "packed_ptrs": "*u8", "absmax_ptrs": "*u8",
             "nested_ptrs": "*fp32", "offsets": "fp32"}
    per_segment = {"n_sizes", "r_sizes", "scales", "offsets"}

    def signature(fn):
        sig, attrs = {}, {}
        for i, param in enumerate(fn.params):
            name = param.name
            if param.is_constexpr or name == "stride_xk":
                sig[name] = "constexpr"
                continue
            one = types.get(name, "*bf16" if name.endswith(("_ptr", "_ptrs")) else "i32")
            sig[name] = (one,) * nseg if name.endswith("_ptrs") or name in per_segment else one
            if isinstance(sig[name], tuple) and (name.endswith("_ptrs") or name in aligned):
                attrs.update({(i, j): [["tt.divisibility", 16]] for j in range(nseg)})
            elif name.endswith("_ptr") or name in aligned:
                attrs[(i,)] = [["tt.divisibility", 16]]
        return sig, attrs

    small = lm.small_kernel_meta(True, r_pad)
    warps = small.pop("num_warps")
    common = dict(stride_xk=1, NSEG=nseg, R_PAD=r_pad, PRECISION="tf32", DROPOUT=dropout, HAS_BIAS=True,
                  NESTED=True, QBLOCK=64)
    if nf4:
        from lowrank.kernels import lora_nf4

        fwd, dx = lora_nf4._fwd_nf4_kernel, lora_nf4._dx_nf4_kernel
    else:
        fwd, dx = lm._fwd_kernel, lm._dx_kernel
    jobs = [(fwd, c.kwargs, c.num_warps, c.num_stages) for c in lm.gemm_configs("BLOCK_N", "BLOCK_K")]
    jobs += [(dx, c.kwargs, c.num_warps, c.num_stages) for c in lm.gemm_configs("BLOCK_K", "BLOCK_N")]
    if not nf4:  # the r-wide kernels are the same in both
        jobs += [(k, dict(small, SPLIT_M=4), warps, 3) for k in (lm._xs_kernel, lm._lora_bwd_kernel, lm._da_kernel)]
    fits = True
    for fn, meta, num_warps, num_stages in jobs:
        sig, attrs = signature(fn)
        consts = {k: v for k, v in {**common, **meta}.items() if k in sig}
        src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
        out = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                             options=dict(num_warps=num_warps, num_stages=num_stages))
        regs, spilled = _ptxas_registers(out.asm["ptx"])
        fits &= out.metadata.shared <= smem_limit  # spills are reported, not failed: the autotuner may avoid them
        # Blocks resident per SM: 64K registers and 228 KB of shared memory (1 KB of it reserved per block).
        blocks = min(65536 // (regs * 32 * num_warps), 233472 // (out.metadata.shared + 1024))
        print(f"{fn.__name__:>16} {meta} warps={num_warps} stages={num_stages}: "
              f"{out.metadata.shared / 1024:.0f} KB shared{'' if out.metadata.shared <= smem_limit else ' TOO BIG'}, "
              f"{regs} registers, {spilled} bytes spilled{' SPILLS' if spilled else ''}, {blocks} block(s)/SM",
              flush=True)
    return fits


def _ptxas_registers(ptx: str) -> tuple[int, int]:
    """(registers per thread, spill bytes stored + loaded) from ptxas -v on sm_90a, as triton assembles."""
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        log = subprocess.run([get_ptxas(90).path, "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a", str(src),
                              "-o", str(Path(d) / "k.cubin")], capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return regs, int(spills.group(1)) + int(spills.group(2))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes on the CPU torch path")
    ap.add_argument("--models", nargs="+", choices=list(MODELS))
    ap.add_argument("--m", nargs="+", type=int, help="token counts M")
    ap.add_argument("--r", nargs="+", type=int, help="LoRA ranks")
    ap.add_argument("--proj", nargs="+", choices=PROJECTIONS)
    ap.add_argument("--nf4", action="store_true",
                    help="the NF4-base (QLoRA) table instead: fused kernels against dequantise-then-GEMM")
    ap.add_argument("--reps", type=int, default=5, help="CPU repetitions per timing")
    ap.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/lora_matmul-<device>.json)")
    ap.add_argument("--roofline", action="store_true", help="print the roofline table (first --m, --r) and exit")
    ap.add_argument("--compile-only", action="store_true",
                    help="compile the kernels for sm_90, report shared memory, registers and spills, and exit")
    args = ap.parse_args(argv)
    if args.roofline:
        print(roofline_table((args.m or [8192])[0], (args.r or [16])[0], [8, 16, 64]))
        return None
    if args.compile_only:
        ok = True
        for r_pad, dropout in ((16, False), (16, True)) if args.nf4 else ((16, False), (16, True), (128, True)):
            print(f"q/k/v merged, bf16{', NF4 base' if args.nf4 else ''}, r <= {r_pad}, "
                  f"dropout {'on' if dropout else 'off'}:")
            ok &= compile_check(r_pad, dropout, nf4=args.nf4)
        if not ok:
            raise SystemExit("a kernel does not fit an H100's shared memory")
        return None
    written = []

    def save(result):
        out = args.out or RESULTS / f"lora_matmul-{'nf4-' if args.nf4 else ''}{result['device']}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        written[:] = [out]

    result = run(args, save)
    print(f"wrote {written[0]}" if written else "no rows")
    return result


if __name__ == "__main__":
    main()
