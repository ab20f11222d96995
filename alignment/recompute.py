"""`ppo.recompute: cheap`: activations that are cheap to compute again are not kept for the backward.

RMSNorms, gated MLPs' activation (with the LoRA branch of their down projection) and the attention's scores and
probabilities are recomputed from their inputs in the backward (torch.utils.checkpoint: the same kernels on the same
inputs, so the gradient is bit for bit the same): a smaller peak of kept activations for a few percent more FLOPs
(docs/ppo_bench.md). `alignment.ppo.PPOTrainer` applies it, in place, to the model it trains.
"""
from __future__ import annotations

from alignment.fused_lora import plain_lora_adapter

RECOMPUTED_EAGER = "ppo_eager"
GATED_MLPS = {"LlamaMLP", "Qwen2MLP", "Qwen3MLP", "MistralMLP"}
"""MLP classes whose forward is down_proj(act_fn(gate_proj(x)) * up_proj(x))."""


def _checkpointed(forward, *args):
    import torch
    from torch.utils.checkpoint import checkpoint

    if not torch.is_grad_enabled():
        return forward(*args)
    return checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=False)


def _gated_mlp(self, x):
    import torch

    gate, up = self.gate_proj(x), self.up_proj(x)
    # grad first: the no-grad passes (every decode step of the rollout) skip the adapter inspection
    down = self.down_proj
    adapter = plain_lora_adapter(down) if torch.is_grad_enabled() else None
    if adapter is None:
        return down(_checkpointed(lambda g, u: self.act_fn(g) * u, gate, up))
    # LoRA's A keeps its input, h = act(gate) * up (tokens x intermediate: the largest activation of the layer), for
    # its gradient. Here h and the LoRA branch are one recomputed block whose kept inputs are gate and up: the same
    # operations as peft's forward in the same order, so the same numbers, ~20% fewer kept activations.
    a, b, s = down.lora_A[adapter], down.lora_B[adapter], down.scaling[adapter]

    def block(g, u):
        h = self.act_fn(g) * u
        return h, b(a(down._cast_input_dtype(h, a.weight.dtype))) * s

    h, delta = _checkpointed(block, gate, up)
    out = down.base_layer(h)
    return (out + delta).to(out.dtype)


def recompute_cheap_parts(model) -> None:
    """`ppo.recompute: cheap` on `model` (in place, its own instances only): RMSNorms and gated MLPs' activation
    recomputed in the backward. The attention's part is the `ppo_eager` implementation."""
    import functools
    import types

    for module in model.modules():
        name = type(module).__name__
        if name.endswith("RMSNorm"):
            module.forward = functools.partial(_checkpointed, type(module).forward.__get__(module))
        elif name in GATED_MLPS:
            module.forward = types.MethodType(_gated_mlp, module)


def register_recomputed_eager() -> str:
    """Register (once) the attention implementation `ppo_eager`: the model's own eager attention (matmul + softmax),
    whose scores and probabilities are not kept for the backward but recomputed from q, k, v (torch.utils.checkpoint:
    the same kernels on the same inputs, so the gradient is bit for bit the same). Attention is ~1% of the FLOPs at
    PPO's lengths and its probabilities (batch x heads x length^2, in fp32) a large share of the kept activations."""
    import sys

    import torch
    from torch.utils.checkpoint import checkpoint
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, eager_mask

    def attention(module, query, key, value, attention_mask, **kwargs):
        eager = sys.modules[type(module).__module__].eager_attention_forward
        if not torch.is_grad_enabled():
            return eager(module, query, key, value, attention_mask, **kwargs)
        out = checkpoint(lambda q, k, v, m: eager(module, q, k, v, m, **kwargs)[0], query, key, value,
                         attention_mask, use_reentrant=False, preserve_rng_state=False)
        return out, None

    if RECOMPUTED_EAGER not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionInterface.register(RECOMPUTED_EAGER, attention)
        AttentionMaskInterface.register(RECOMPUTED_EAGER, eager_mask)
    return RECOMPUTED_EAGER
