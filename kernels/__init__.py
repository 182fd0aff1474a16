"""lowrank's kernels, importable as `lowrank.kernels`. They depend on nothing else in lowrank.

Each op is one file: its Triton kernels, the autograd Function that calls them, and the
plain torch reference that is the CPU fallback and the test oracle. `dispatch` picks the path.
"""

from .causal_conv1d import causal_conv1d, causal_conv1d_update
from .dispatch import kernel_choice, use_triton
from .gated_delta_rule import chunk_gated_delta_rule, gated_delta_rule_reference, gated_delta_rule_step
from .linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference
from .lora import lora_linear, lora_linear_merged, lora_linear_merged_reference, lora_linear_reference

__all__ = ["kernel_choice", "use_triton", "lora_linear", "lora_linear_reference",
           "lora_linear_merged", "lora_linear_merged_reference",
           "linear_cross_entropy", "linear_cross_entropy_reference",
           "chunk_gated_delta_rule", "gated_delta_rule_reference", "gated_delta_rule_step",
           "causal_conv1d", "causal_conv1d_update"]
