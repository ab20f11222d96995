"""alignment.fused_lora: LoRA's update as one addmm on the base output, against the formula and peft's forward."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from alignment.fused_lora import fuse_lora_layers, plain_lora_adapter


class Two(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(3, 4, bias=True), torch.nn.Linear(4, 2, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _lora(dtype=torch.float32, **kw):
    torch.manual_seed(0)
    model = get_peft_model(Two().to(dtype), LoraConfig(r=2, lora_alpha=4, target_modules=["up", "down"], **kw))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # peft starts B at 0, which would make the update vanish
            torch.nn.init.normal_(p)
    return model.eval()


def test_hand_worked_layer():
    """One layer with hand-picked weights: y = W x + b + (alpha / r) * B (A x)."""
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(2, 2)), LoraConfig(r=1, lora_alpha=2,
                                                                                  target_modules=["0"]))
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.base_layer.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        layer.base_layer.bias.copy_(torch.tensor([0.5, -0.5]))
        layer.lora_A["default"].weight.copy_(torch.tensor([[1.0, -1.0]]))
        layer.lora_B["default"].weight.copy_(torch.tensor([[2.0], [3.0]]))
    assert fuse_lora_layers(model) == 1
    x = torch.tensor([[1.0, 3.0]])
    # W x + b = [7.5, 14.5]; A x = -2; scaling 2 / 1 = 2; 2 * B (A x) = [-8, -12]
    assert torch.equal(model(x), torch.tensor([[-0.5, 2.5]]))


def test_same_outputs_and_gradients_as_peft():
    x = torch.randn(5, 7, 3, dtype=torch.float64)
    out, grads = {}, {}
    for kernel in ("peft", "fused"):
        model = _lora(torch.float64)
        if kernel == "fused":
            assert fuse_lora_layers(model) == 2
        xi = x.clone().requires_grad_(True)
        out[kernel] = model(xi)
        out[kernel].pow(2).sum().backward()
        grads[kernel] = [xi.grad] + [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert len(grads["fused"]) == 5 and all(g is not None and g.abs().sum() > 0 for g in grads["fused"])
    torch.testing.assert_close(out["fused"], out["peft"], rtol=1e-12, atol=1e-12)
    for a, b in zip(grads["fused"], grads["peft"]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_disabled_merged_and_non_plain_layers_fall_back_to_peft():
    x = torch.randn(4, 3)
    model = _lora()
    peft_out = model(x)
    fuse_lora_layers(model)
    with model.disable_adapter():  # the PPO reference: the base alone
        base_out = model(x)
        assert plain_lora_adapter(model.base_model.model.up) is None
    assert not torch.allclose(base_out, peft_out)
    model.merge_adapter()
    assert plain_lora_adapter(model.base_model.model.up) is None
    torch.testing.assert_close(model(x), peft_out, rtol=1e-5, atol=1e-5)  # merged: base + B A in the weight
    model.unmerge_adapter()
    torch.testing.assert_close(model(x), peft_out, rtol=1e-6, atol=1e-6)
    dropped = _lora(lora_dropout=0.1)
    assert plain_lora_adapter(dropped.base_model.model.up) is None  # dropout: not the plain case
    dora = _lora(use_dora=True)
    assert plain_lora_adapter(dora.base_model.model.up) is None  # a variant: not the plain case
    expected = dora(x)
    fuse_lora_layers(dora)
    torch.testing.assert_close(dora(x), expected)


def test_reference_pass_is_the_base_model():
    x = torch.randn(4, 3)
    model = _lora()
    torch.manual_seed(0)
    plain = Two()  # the same initial weights as _lora's base
    fuse_lora_layers(model)
    with model.disable_adapter():
        torch.testing.assert_close(model(x), plain(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_under_autocast_matches_peft_within_bf16_rounding(dtype):
    x = torch.randn(6, 3)
    ref, model = _lora(dtype), _lora(dtype)
    fuse_lora_layers(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = ref(x), model(x)
    assert a.dtype == b.dtype == torch.bfloat16
    torch.testing.assert_close(b.float(), a.float(), rtol=2e-2, atol=2e-2)


def test_mixed_dtypes_without_autocast_use_peft():
    """A bf16 base with fp32 adapters and no autocast: addmm would refuse the mix, peft promotes; same result."""
    x = torch.randn(6, 3, dtype=torch.bfloat16)
    ref, model = _lora(torch.bfloat16), _lora(torch.bfloat16)
    for m in (ref, model):
        for name, p in m.named_parameters():
            if "lora_" in name:
                p.data = p.data.float()
    fuse_lora_layers(model)
    torch.testing.assert_close(model(x), ref(x))
