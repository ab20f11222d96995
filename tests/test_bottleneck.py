"""Bottleneck adapters (alignment/bottleneck.py) on the tiny model: identity at the start, what trains, hand-counted
parameters, a save/reload round trip, a wrong base refused, and the policy refused by stages that train on it.
The stage-level checks (trains through `align run sft`, loads back, merge refused) are in tests/test_sft_methods.py."""

from __future__ import annotations

import pytest
import torch

from alignment import bottleneck
from alignment.errors import ArtifactError
from alignment.models import load_causal_lm

IDS = torch.tensor([[1, 40, 41, 42, 43, 44, 2, 1, 50]])


@pytest.fixture
def base_dir(tiny_store):
    root, run = tiny_store
    return root / run / "base" / "model"


def test_adapters_start_as_identity_and_only_they_train(base_dir):
    base = load_causal_lm(base_dir, "fp32").eval()
    model = load_causal_lm(base_dir, "fp32").eval()
    names = bottleneck.add_adapters(model, bottleneck.BottleneckConfig(placement="pfeiffer", reduction_factor=16))
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, base(input_ids=IDS).logits)  # zero-initialised up projection
    # hidden 64 / 16 = 4: down 64*4 + 4, up 4*64 + 64 = 580 per block, one adapter in each of the 2 blocks.
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * 580
    assert set(names) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".bottleneck_mlp." in n for n in names)
    houlsby = load_causal_lm(base_dir, "fp32")
    bottleneck.add_adapters(houlsby, bottleneck.BottleneckConfig(placement="houlsby", reduction_factor=16))
    assert sum(p.numel() for p in houlsby.parameters() if p.requires_grad) == 4 * 580


def test_a_training_step_changes_the_output_and_the_round_trip_reproduces_it(base_dir, tmp_path):
    model = load_causal_lm(base_dir, "fp32")
    bottleneck.add_adapters(model, bottleneck.BottleneckConfig(placement="houlsby", reduction_factor=8,
                                                               non_linearity="silu"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    for _ in range(3):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    base = load_causal_lm(base_dir, "fp32").eval()
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=IDS).logits
        assert not torch.allclose(trained, base(input_ids=IDS).logits)
    bottleneck.save(model, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_model.safetensors",
                                                                       "bottleneck_config.json"]
    reloaded = bottleneck.load(load_causal_lm(base_dir, "fp32"), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=IDS).logits, trained, atol=1e-6)
    assert not any(p.requires_grad for p in reloaded.parameters())


def test_adapters_for_another_hidden_size_are_refused(base_dir, tmp_path):
    model = load_causal_lm(base_dir, "fp32")
    bottleneck.add_adapters(model, bottleneck.BottleneckConfig())
    bottleneck.save(model, tmp_path / "a")
    conf = tmp_path / "a" / "bottleneck_config.json"
    conf.write_text(conf.read_text().replace('"hidden_size": 64', '"hidden_size": 128'))
    with pytest.raises(ArtifactError, match="hidden size 128, but the model has 64"):
        bottleneck.load(load_causal_lm(base_dir, "fp32"), tmp_path / "a")


def test_stages_that_train_on_the_policy_refuse_it(tiny_store):
    from alignment.artifacts import ArtifactStore
    from alignment.cli import main
    from alignment.policy import is_mergeable, require_mergeable

    root, _ = tiny_store
    assert main(["run", "sft", "-c", "configs/tiny/sft.yaml", "--artifacts", str(root), "--run", "bottleneck-parent",
                 f"inputs.base={root}/tiny/base", "peft.method=adapter", "train.max_steps=1",
                 "data.max_train_examples=8", "data.max_eval_examples=2"]) == 0
    art = ArtifactStore(root).read(root / "bottleneck-parent" / "sft")
    assert not is_mergeable(art)
    with pytest.raises(ArtifactError, match="dpo needs a policy whose weights it can train.*bottleneck layers"):
        require_mergeable(art, "dpo")
