"""lowrank's kernels, importable as `lowrank.kernels`. They depend on nothing else in lowrank.

Each op is one file: its Triton kernels, the autograd Function that calls them, and the
plain torch reference that is the CPU fallback and the test oracle. `dispatch` picks the path.
"""

from .causal_conv1d import causal_conv1d, causal_conv1d_update
from .dispatch import kernel_choice, use_triton
from .gated_delta_rule import chunk_gated_delta_rule, gated_delta_rule_reference, gated_delta_rule_step
from .int8 import Int8Weight, dequantize_int8, quantize_int8
from .linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference
from .lora import lora_linear, lora_linear_merged, lora_linear_merged_reference, lora_linear_reference
from .nf4 import NF4Weight, dequantize_nf4, quantize_nf4

__all__ = ["kernel_choice", "use_triton", "lora_linear", "lora_linear_reference",
           "lora_linear_merged", "lora_linear_merged_reference",
           "linear_cross_entropy", "linear_cross_entropy_reference",
           "NF4Weight", "quantize_nf4", "dequantize_nf4", "Int8Weight", "quantize_int8", "dequantize_int8",
           "chunk_gated_delta_rule", "gated_delta_rule_reference", "gated_delta_rule_step",
           "causal_conv1d", "causal_conv1d_update"]
