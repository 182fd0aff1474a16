"""DPO's reference model: the policy as it was at step 0, in the cheapest form that is exact.

    mode          when                                       what it holds
    adapter_off   LoRA or prefix from a fresh adapter        nothing: the adapter is switched off
                                                              (lora_disabled / prefix_disabled)
    initial_copy  --init-adapter, freeze, full                a frozen copy of the *trainable*
                                                              parameters only, swapped in for the
                                                              reference forward
    precomputed   --precompute-ref                            two floats per pair, computed once
                                                              before training: adapter_off, or the
                                                              model itself before its first update
                                                              (no copy)

A fresh LoRA adapter starts with B = 0, so the step-0 model is the base; a fresh prefix is
random, and the reference is then the base without it, as TRL takes it (PEFT's
disable_adapter). After --init-adapter the reference is the model with the initial adapter
(DPO after SFT: the SFT model). Freeze keeps a copy of its trained layers only, not of the
whole model as a second model would.

The reference forward runs in eval mode (no dropout) under no_grad, so it is a fixed function
of the batch and stores no activations.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch

from ..adapters.lora import lora_disabled, lora_modules
from ..adapters.prefix import has_prefix, prefix_disabled
from .state import trainable_state


class Reference:
    """The reference of a run: `logps(batch)` gives its per-sequence log-probabilities."""

    def __init__(self, model, mode: str, logps_fn, copies: dict[str, torch.Tensor] | None = None):
        self.model, self.mode, self.logps_fn = model, mode, logps_fn
        self.copies = copies  # initial_copy: parameter name -> its step-0 value
        self.tables: dict[str, torch.Tensor] = {}  # precomputed: "train" / "eval" -> [n_pairs, 2]

    def precomputed(self, tables: dict[str, torch.Tensor]) -> None:
        """From now on the reference is `tables`; whatever it held is released."""
        self.mode, self.tables, self.copies = "precomputed", tables, None

    def context(self):
        """Inside, the model computes the reference."""
        if self.mode == "initial_copy":
            return swapped_parameters(self.model, self.copies)
        if self.mode == "adapter_off":
            return lora_disabled(self.model) if lora_modules(self.model) else prefix_disabled(self.model)
        if self.mode == "precomputed":
            raise RuntimeError("the reference was precomputed: its log-probabilities travel in the batches")
        return nullcontext()

    @torch.no_grad()
    def logps(self, batch: dict) -> torch.Tensor:
        """Summed answer log-probabilities [rows] of the reference."""
        was_training = self.model.training
        self.model.eval()
        try:
            with self.context():
                return self.logps_fn(self.model, batch)
        finally:
            self.model.train(was_training)


def make_reference(model, logps_fn, method: str, init_adapter: str | None, precompute: bool = False) -> Reference:
    """The reference of a model whose method is applied and nothing trained yet. precompute: the
    reference is only needed before the first step, so the model itself serves where a copy
    would have been made (mode "as_is"), and `precomputed(tables)` is called next."""
    names = list(trainable_state(model))
    if method == "lora" and not init_adapter and lora_modules(model):
        fresh = all(".lora_A." in n or ".lora_B." in n for n in names)
    else:
        fresh = method == "prefix" and has_prefix(model) and all(n.startswith("prefix_encoder.") for n in names)
    if fresh:
        return Reference(model, "adapter_off", logps_fn)
    if precompute:
        return Reference(model, "as_is", logps_fn)
    params = trainable_state(model)
    return Reference(model, "initial_copy", logps_fn, {name: p.detach().clone() for name, p in params.items()})


@contextmanager
def swapped_parameters(model, values: dict[str, torch.Tensor]):
    """Inside, the named parameters hold `values` (same shapes); on exit their own data again.
    Only the tensors' storage is exchanged: the Parameter objects, which the optimizer and DDP
    hold, stay the same."""
    params = dict(model.named_parameters())
    own = {name: params[name].data for name in values}
    try:
        for name, value in values.items():
            params[name].data = value
        yield model
    finally:
        for name, data in own.items():
            params[name].data = data
