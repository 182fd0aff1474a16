"""Folders saved by transformers + bitsandbytes: config.json's `quantization_config`, read and written.

Reading (`check_quantization_config`, called by the config readers): `quant_method` must be
"bitsandbytes", 4-bit NF4 (with or without double quantisation) or 8-bit; anything else
(bitsandbytes' fp4, GPTQ, AWQ, fp8, ...) is one CheckpointError naming the method. The tensors
themselves say which layers are quantised (`<module>.weight.quant_state.*`, `<module>.SCB`),
so `llm_int8_skip_modules` is honoured by construction: a skipped module is stored, and
loaded, in full precision.

Writing (`quantization_config`, called by `save_model`): the config transformers writes for
the quantised layers the model holds, with every layer left in full precision named in
`llm_int8_skip_modules`, so transformers' `from_pretrained` builds the same split.
"""

from __future__ import annotations

import torch.nn as nn

from .quantized import QuantizedLinear, quantized_modules

OTHER_METHODS = {"gptq": "GPTQ", "awq": "AWQ", "fp8": "fp8", "compressed-tensors": "compressed-tensors",
                 "hqq": "HQQ", "eetq": "EETQ", "quanto": "quanto", "torchao": "torchao", "fbgemm_fp8": "fp8",
                 "aqlm": "AQLM", "mxfp4": "MXFP4", "modelopt": "NVFP4 / ModelOpt", "bitnet": "BitNet"}


def check_quantization_config(d: dict, fail) -> str | None:
    """The format of the checkpoint's quantised layers ("nf4", "int8"), or None when
    config.json has no quantization_config. fail(key, why) raises the reader's CheckpointError."""
    q = d.get("quantization_config")
    if not q:
        return None
    if not isinstance(q, dict):
        fail("quantization_config", f"should be a dict, got {q!r}")
    method = q.get("quant_method", "?")
    if method != "bitsandbytes":
        name = OTHER_METHODS.get(str(method).lower(), str(method))
        fail("quantization_config", f"asks for {name}-quantised weights (quant_method {method!r}); lowrank loads "
             "bitsandbytes NF4 / 8-bit checkpoints and unquantised ones: dequantise to bf16 first")
    four, eight = q.get("load_in_4bit", q.get("_load_in_4bit")), q.get("load_in_8bit", q.get("_load_in_8bit"))
    if four and eight or not (four or eight):
        fail("quantization_config", "should set exactly one of load_in_4bit and load_in_8bit")
    if four:
        kind = q.get("bnb_4bit_quant_type", "fp4")  # transformers' default
        if kind != "nf4":
            fail("quantization_config", f"asks for bitsandbytes {kind!r} 4-bit weights; lowrank reads 'nf4' only")
        storage = q.get("bnb_4bit_quant_storage", "uint8")
        if storage != "uint8":
            fail("quantization_config", f"stores 4-bit weights as {storage!r}; lowrank reads 'uint8' storage only")
        return "nf4"
    if q.get("llm_int8_has_fp16_weight"):
        fail("quantization_config", "has llm_int8_has_fp16_weight: such a checkpoint holds fp16 weights, not int8")
    return "int8"


def quantization_config(model: nn.Module, compute_dtype: str | None = None) -> dict | None:
    """The `quantization_config` transformers writes for the model's quantised layers, or None
    when it has none. Raises ValueError when they mix NF4 and int8 (one config cannot say so)."""
    quantized = quantized_modules(model)
    if not quantized:
        return None
    formats = {m.format for _, m in quantized}
    if len(formats) > 1:
        raise ValueError("the model mixes NF4 and int8 layers; transformers' quantization_config holds one format")
    nf4 = formats == {"nf4"}
    q_paths = {p for p, _ in quantized}
    dtype = compute_dtype or str(quantized[0][1].dtype).removeprefix("torch.")
    return {
        "quant_method": "bitsandbytes", "load_in_4bit": nf4, "load_in_8bit": not nf4,
        "_load_in_4bit": nf4, "_load_in_8bit": not nf4,
        "bnb_4bit_quant_type": "nf4" if nf4 else "fp4",
        "bnb_4bit_use_double_quant": nf4 and any(m.nested_offset is not None for _, m in quantized),
        "bnb_4bit_compute_dtype": dtype, "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": skip_modules(model, q_paths), "llm_int8_threshold": 6.0,
        "llm_int8_has_fp16_weight": False, "llm_int8_enable_fp32_cpu_offload": False,
    }


def skip_modules(model: nn.Module, quantized: set[str]) -> list[str]:
    """transformers' patterns for the linear layers kept in full precision: a leaf name where no
    layer of that name is quantised (`lm_head`, `shared_expert_gate`), else the full path."""
    plain = [p for p, m in model.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, QuantizedLinear)
             and p not in quantized]
    q_leaves = {p.rsplit(".", 1)[-1] for p in quantized}
    leaves = sorted({p.rsplit(".", 1)[-1] for p in plain if p.rsplit(".", 1)[-1] not in q_leaves} | {"lm_head"})
    return leaves + [p for p in plain if p.rsplit(".", 1)[-1] in q_leaves]
