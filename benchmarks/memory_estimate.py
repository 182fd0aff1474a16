"""Predicted GPU peak memory of a LoRA training step, lowrank against transformers + peft, on any machine.

    python -m benchmarks.memory_estimate [--only NAME]   (--only: replaces that workload's row)

For each GPU workload of benchmarks/train_throughput.py (same shapes, rank, batch, checkpointing),
one process per library builds the model and runs two optimizer steps on fake tensors (torch's
FakeTensorMode: shapes and dtypes, no data, no arithmetic, seconds even for 7B) and counts the bytes
of every live tensor storage after every op. The peak of that count is what
torch.cuda.max_memory_allocated would report, less the caching allocator's rounding (512-byte
blocks) and the kernels' own scratch space. It is a prediction to plan with, for machines this
project is not lent; train_throughput.py measures the real figure on a GPU.

What stands in for CUDA-only pieces (the fake tensors live on the CPU, as this torch build may
have no CUDA):
- attention: F.scaled_dot_product_attention is replaced by a stand-in with flash attention's
  memory (the output and a [B, heads, T] fp32 log-sum-exp are kept; no [T, T] matrix), for both
  libraries alike, as on an H100 with no padding. transformers builds a [B, 1, T, T] bool causal
  mask for fake tensors (it treats them as tracing), which it would not on a GPU: 32 MiB at 8 x 2048;
- lowrank's LoRA runs its torch path in bf16, as on a GPU (not in fp32, as on a CPU without bf16
  units: `frozen_linear.half_gemm_is_slow` says no; the Triton path keeps the same input and a
  smaller r-wide product for the backward), and the fused loss takes its CUDA branch (fp32-output
  GEMMs on the bf16 head, so no fp32 copy of the head);
- every label is trained (the workloads' masked share is 0), and Adam's step counts are 1;
- lowrank-nf4 (QLoRA) is built as load_model(quantize="nf4") builds it: the model on the meta
  device, each decoder projection made in bf16 and quantised at once (packed 4-bit codes, uint8
  absmax, one fp32 nested absmax per 256 blocks), so only one full-precision projection exists
  at a time; its base matmuls take the torch path, which dequantises the weight to bf16 for each
  matmul, forward and backward. On a GPU the Triton path dequantises inside the GEMM tiles and
  holds no such weight, so this is an upper bound by about one layer's largest projection and its
  scratch (dequantize_nf4 works a 4M-element chunk at a time: 16 MB of fp32).

Writes benchmarks/results/memory_estimate.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import weakref
from datetime import date
from pathlib import Path
from unittest import mock

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

try:
    from benchmarks.train_throughput import PROJECTIONS, WORKLOADS, hf_config, step_shape
except ImportError:  # run as a script (the workers): this folder is sys.path[0]
    from train_throughput import PROJECTIONS, WORKLOADS, hf_config, step_shape

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = ("lowrank", "lowrank-nf4", "peft")
GIB = 2**30


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--only", help="run only the workload with this name")
    args = ap.parse_args()
    if args.worker:
        variant, config, shape = args.worker
        print(json.dumps(estimate(variant, json.loads(config), json.loads(shape))))
        return

    rows = []
    for w in WORKLOADS["cuda"]:
        if args.only and w["name"] != args.only:
            continue
        shape = {k: v for k, v in step_shape(w).items() if k in ("batch", "seq", "r", "checkpointing", "mlp_tiles")}
        row = {"workload": w["name"], **shape, "variants": {}}
        for variant in [v for v in VARIANTS if v in w["variants"]]:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", variant,
                   json.dumps(hf_config(w["config"])), json.dumps(shape)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"{w['name']} {variant}: {done.stderr.strip().splitlines()[-1]}")
            row["variants"][variant] = r = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{w['name']:18s} {variant:8s} weights {r['weights_bytes'] / GIB:6.2f} GiB   "
                  f"peak {r['peak_bytes'] / GIB:6.2f} GiB", flush=True)
        v = row["variants"]
        if "peft" in v:
            row["peak_ratio"] = v["lowrank"]["peak_bytes"] / v["peft"]["peak_bytes"]
            print(f"{w['name']:18s} lowrank / transformers+peft peak: {row['peak_ratio']:.2f}x")
        if "lowrank-nf4" in v:
            row["nf4_peak_ratio"] = v["lowrank-nf4"]["peak_bytes"] / v["lowrank"]["peak_bytes"]
            print(f"{w['name']:18s} lowrank-nf4 / lowrank peak: {row['nf4_peak_ratio']:.2f}x")
        rows.append(row)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "memory_estimate.json"
    for row in rows:
        row.update(date=date.today().isoformat(), torch=torch.__version__)
    # A run of some workloads (--only) replaces their rows and keeps the others'.
    ran = {row["workload"] for row in rows}
    old = json.loads(out.read_text())["rows"] if out.exists() else []
    order = [w["name"] for w in WORKLOADS["cuda"]]
    rows = sorted([r for r in old if r["workload"] not in ran] + rows,
                  key=lambda r: order.index(r["workload"]) if r["workload"] in order else len(order))
    out.write_text(json.dumps({"method": "fake tensors, live storage bytes after every op", "rows": rows},
                              indent=1) + "\n")
    print(f"wrote {out}")


# ---- the counting ------------------------------------------------------------------------------

RANDOM_FILLS = {"uniform_", "normal_", "bernoulli_", "random_", "exponential_"}


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of live tensor storages and keeps their peak.

    With fake=True it also answers what fake tensors have no answer for: random fills do nothing,
    `.item()` gives False for a bool (no bad label found) and 1 otherwise (Adam's step count),
    and `nonzero` reports every element (every label trained).
    """

    def __init__(self, fake: bool):
        super().__init__()
        self.fake, self.live, self.now, self.peak = fake, {}, 0, 0

    def add(self, t):
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":  # a model built on meta holds no memory
            return
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.live:
            return
        n = storage.nbytes()

        def freed(_, key=key, n=n):
            if self.live.pop(key, None) is not None:
                self.now -= n

        # torch keeps a storage's Python object alive as long as the storage: the weakref fires on free.
        self.live[key] = weakref.ref(storage, freed)
        self.now += n
        self.peak = max(self.peak, self.now)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if self.fake and name in RANDOM_FILLS:
            return args[0]
        if self.fake and name == "_local_scalar_dense":
            return False if args[0].dtype == torch.bool else 1
        if self.fake and name == "nonzero":
            x = args[0]
            out = torch.empty(x.numel(), x.dim(), dtype=torch.long, device=x.device)
        else:
            out = func(*args, **kwargs)
        for t in tree_leaves(out):
            self.add(t)
        return out


class _Flash(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def flash_attention_stand_in(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                             enable_gqa=False):
    """F.scaled_dot_product_attention with flash attention's memory and no arithmetic."""
    return _Flash.apply(q, k, v)


# ---- one library's step --------------------------------------------------------------------------

def estimate(variant: str, config: dict, shape: dict, fake: bool = True, pretend_cuda: bool = True,
             steps: int = 2) -> dict:
    """Peak bytes of `steps` LoRA optimizer steps of `variant` (one of VARIANTS) on a model of the
    transformers `config` dict. fake=False runs real CPU tensors (for the tests); pretend_cuda makes
    the fused loss take its CUDA branch, which only fake tensors can."""
    counter = LiveBytes(fake)
    B, T = shape["batch"], shape["seq"]
    bf16 = torch.bfloat16
    with contextlib.ExitStack() as stand_ins:  # every patch is undone on the way out
        stand_ins.enter_context(mock.patch("torch.nn.functional.scaled_dot_product_attention",
                                           flash_attention_stand_in))
        if variant.startswith("lowrank") and pretend_cuda:
            stand_ins.enter_context(mock.patch("lowrank.kernels.linear_cross_entropy._fp32_out_gemm",
                                               lambda t: True))
            # and a GPU's bf16 GEMMs: no fp32 upcast of the frozen matmuls, as on a CPU without bf16 units
            stand_ins.enter_context(mock.patch("lowrank.kernels.frozen_linear.half_gemm_is_slow",
                                               lambda t: False))
        if variant == "peft":
            _peft_stand_ins(stand_ins)
        stand_ins.enter_context(FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext())
        stand_ins.enter_context(counter)
        torch.manual_seed(0)
        if variant.startswith("lowrank"):
            model, step = _lowrank(config, shape, quantize=variant == "lowrank-nf4")
        else:
            model, step = _peft(config, shape)
        weights = counter.now
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        ids = torch.randint(0, config["vocab_size"], (B, T))
        for _ in range(steps):
            with torch.autocast("cpu", dtype=bf16):
                loss = step(ids)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
    return {"weights_bytes": weights, "peak_bytes": counter.peak, "trainable": sum(p.numel() for p in params)}


def _lowrank(config: dict, shape: dict, quantize: bool = False):
    from lowrank.adapters.lora import LoraConfig, apply_lora
    from lowrank.models import build_model, config_from_dict
    from lowrank.models.decoder import set_mlp_tiles
    from lowrank.train.loop import causal_lm_loss

    torch.set_default_dtype(torch.bfloat16)  # frozen weights in bf16, as lowrank.train does under bf16
    try:
        if quantize:
            model = _build_nf4(config_from_dict(config))
        else:
            model = build_model(config_from_dict(config))
    finally:
        torch.set_default_dtype(torch.float32)
    apply_lora(model, LoraConfig(r=shape["r"], alpha=2 * shape["r"], target_modules=PROJECTIONS))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    model.model.gradient_checkpointing = shape["checkpointing"]
    set_mlp_tiles(model, shape.get("mlp_tiles", 1))
    model.train()

    def step(ids):
        loss, count = causal_lm_loss(model, {"input_ids": ids, "labels": ids})
        return loss / ids.numel()

    return model, step


def _build_nf4(cfg):
    """The model with its decoder projections in NF4, the rest in the default dtype, built as
    load_model(quantize="nf4") builds it: on the meta device, then one projection at a time made
    in full precision and quantised (random values: only the bytes are counted)."""
    from lowrank.models import build_model
    from lowrank.models.quantized import QuantizedLinear, quantizable, quantize_weight

    with torch.device("meta"):
        model = build_model(cfg)
    for path in sorted(quantizable(model)):
        lin = model.get_submodule(path)
        w = torch.randn(lin.weight.shape) * lin.in_features ** -0.5
        bias = None if lin.bias is None else torch.randn(lin.bias.shape)
        model.set_submodule(path, QuantizedLinear(quantize_weight(w, "nf4"), bias))
        del w
    rest = {name: torch.randn(p.shape) * 0.02 for name, p in model.named_parameters() if p.is_meta}
    model.load_state_dict(rest, strict=False, assign=True)
    model.tie_weights()
    return model


def _peft_stand_ins(stack):
    """PEFT moves each new module to its base layer's device and dtype with Module.to, which cannot
    swap fake parameters. Everything is on the one device already, and PEFT then keeps adapters in
    fp32 (autocast_adapter_dtype) whatever the base dtype: the same tensors result without the moves."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    module_to = torch.nn.Module.to

    def to_same_device(self, *args, **kwargs):
        if not kwargs and len(args) == 1 and isinstance(args[0], (str, torch.device)) \
                and torch.device(args[0]).type == "cpu":
            return self
        return module_to(self, *args, **kwargs)

    stack.enter_context(mock.patch.object(torch.nn.Module, "to", to_same_device))
    stack.enter_context(mock.patch.object(BaseTunerLayer, "_move_adapter_to_device_of_base_layer",
                                          lambda self, adapter_name, device=None: None))


def _peft(config: dict, shape: dict):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_cfg = AutoConfig.for_model(**config)
    model = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    if shape["checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=shape["r"], lora_alpha=2 * shape["r"], lora_dropout=0.0,
                                             target_modules=PROJECTIONS))
    model.train()

    def step(ids):
        return model(input_ids=ids, labels=ids).loss

    return model, step


if __name__ == "__main__":
    main()
