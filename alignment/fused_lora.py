"""LoRA's update added by one fused matmul: y = base(x) + s * (x A^T) B^T as one `addmm` on the base output.

peft's `lora.Linear.forward` computes `result + lora_B(lora_A(x)) * scaling`: the B matmul writes a new
(tokens x out_features) tensor, the scaling multiplies it into another and the sum into a third, and the backward
runs the same elementwise passes again. On the PPO benchmark's fp32 CPU profile those elementwise passes over the
LoRA outputs were ~11% of a training forward (`aten::mul` + `aten::add` on [batch, length, 3072] for every gate and
up projection). `result.addmm_(xA, B^T, alpha=s)` does the multiply-add inside the GEMM, in place on the base
output (out of place under autocast): no new output tensor, no elementwise pass, and a backward of two matmuls.
Same math; the sum is rounded once instead of three times (fp32: differences of ~1e-7 relative;
tests/test_fused_lora.py compares outputs and gradients with peft's).

Only the plain case is fused: one active LoRA adapter, no dropout, no bias on B, no variant (DoRA...), not merged,
not disabled, and one dtype throughout (or autocast, which casts addmm's operands itself). Anything else falls back
to peft's own forward, checked at every call, so disabling adapters (the PPO reference), merging (merged rollouts)
and switching adapters keep working.
"""

from __future__ import annotations

import types


def plain_lora_adapter(layer) -> str | None:
    """The adapter name when `layer` is a peft LoRA Linear that runs exactly one plain LoRA (no variant such as
    DoRA, no dropout, not merged or disabled); None otherwise."""
    import torch
    from peft.tuners.lora import Linear

    if not isinstance(layer, Linear) or layer.disable_adapters or layer.merged:
        return None
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(active) != 1 or active[0] in layer.lora_variant:
        return None
    return active[0] if isinstance(layer.lora_dropout[active[0]], torch.nn.Identity) else None


def _fused_forward(self, x, *args, **kwargs):
    import torch

    adapter = None if args or kwargs else plain_lora_adapter(self)
    if adapter is None or self.lora_B[adapter].bias is not None:
        return type(self).forward(self, x, *args, **kwargs)
    a, b = self.lora_A[adapter], self.lora_B[adapter]
    w = getattr(self.base_layer, "weight", None)
    one_dtype = w is not None and x.dtype == w.dtype == a.weight.dtype == b.weight.dtype
    autocast = torch.is_autocast_enabled(x.device.type)
    if w is None or not (one_dtype or autocast):
        return type(self).forward(self, x)  # mixed dtypes: peft promotes the sum, addmm would refuse them
    result = self.base_layer(x)
    h = a(self._cast_input_dtype(x, a.weight.dtype))
    h = h.reshape(-1, h.shape[-1])
    if not autocast and result.is_contiguous():
        # In place on the base output: no copy of it into a new tensor (addmm's `input` is copied). Autograd
        # allows it: the base linear's backward keeps its input and weight, not its output.
        result.view(-1, result.shape[-1]).addmm_(h, b.weight.t(), alpha=self.scaling[adapter])
        return result
    # autocast casts addmm's operands to its dtype (not an in-place op's)
    out = torch.addmm(result.reshape(-1, result.shape[-1]), h, b.weight.t(), alpha=self.scaling[adapter])
    return out.view(result.shape).to(result.dtype)


def use_kernel(model, peft_spec) -> int:
    """`peft.kernel` on `model` (a trainer's model, after the trainer made it a PeftModel): the fused forward for
    every LoRA Linear when it is "fused". Returns how many layers it patched."""
    return fuse_lora_layers(model) if peft_spec.kernel == "fused" else 0


def fuse_lora_layers(model) -> int:
    """Give every peft LoRA Linear of `model` the fused forward (in place, on its own instances; it falls back to
    peft's per call when the layer is not in the plain case). Returns how many layers it patched."""
    from peft.tuners.lora import Linear

    n = 0
    for module in model.modules():
        if isinstance(module, Linear):
            module.forward = types.MethodType(_fused_forward, module)
            n += 1
    return n
