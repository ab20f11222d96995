"""Every fine-tuning method through the real `align run sft`: what trains, what stays frozen, what loads back.

Each case runs a few steps on the tiny model (its own `--run`, reading the session's tiny base), watches the
parameters across `trainer.train()`, then reloads the published artifact with `load_policy` and generates.
"""

from __future__ import annotations

import json

import pytest
import torch

from alignment.artifacts import ArtifactStore
from alignment.cli import main
from alignment.errors import ArtifactError
from alignment.policy import load_policy, require_mergeable

FAST = ["train.max_steps=3", "train.save_steps=100", "data.max_train_examples=24", "data.max_eval_examples=4"]

# id -> (overrides, which parameter names train, artifact holds an adapter, policy loads unmerged)
CASES = {
    "lora": (["peft.method=lora"], lambda n: ".lora_A." in n or ".lora_B." in n, True, False),
    "dora": (["peft.method=lora", "peft.use_dora=true"], lambda n: ".lora_" in n, True, False),
    "rslora": (["peft.method=lora", "peft.use_rslora=true"], lambda n: ".lora_A." in n or ".lora_B." in n,
               True, False),
    "ia3": (["peft.method=ia3", "train.lr=0.05"], lambda n: ".ia3_l." in n, True, False),
    "prefix": (["peft.method=prefix", "peft.num_virtual_tokens=4"], lambda n: n.startswith("prompt_encoder."),
               True, True),
    "prompt": (["peft.method=prompt", "peft.num_virtual_tokens=4", "peft.prompt_init_text=Follow the rule."],
               lambda n: n.startswith("prompt_encoder."), True, True),
    "ptuning": (["peft.method=ptuning", "peft.num_virtual_tokens=4", "peft.encoder_hidden_size=16"],
                lambda n: n.startswith("prompt_encoder."), True, True),
    "bitfit": (["peft.method=bitfit", "peft.add_bias=true"], lambda n: n.endswith(".bias"), False, False),
    "freeze": (["peft.method=freeze", "peft.last_layers=1"], lambda n: n.startswith("model.layers.1."),
               False, False),
    "full": (["peft.method=full"], lambda n: True, False, False),
}


@pytest.fixture
def train_spy(monkeypatch):
    """Snapshot every parameter (and whether it trains) around SFTTrainer.train, and keep the trained model."""
    from trl import SFTTrainer

    seen, real = {}, SFTTrainer.train

    def train(self, *args, **kwargs):
        seen["before"] = {n: (p.detach().clone(), p.requires_grad) for n, p in self.model.named_parameters()}
        out = real(self, *args, **kwargs)
        seen["after"] = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        seen["model"] = self.model
        return out

    monkeypatch.setattr(SFTTrainer, "train", train)
    return seen


def run_sft(root, run, *overrides) -> int:
    return main(["run", "sft", "-c", "configs/tiny/sft.yaml", "--artifacts", str(root), "--run", run,
                 f"inputs.base={root}/tiny/base", *FAST, *overrides])


@pytest.mark.parametrize("case", list(CASES))
def test_method_trains_only_its_parameters_and_loads_back(case, tiny_store, train_spy):
    root, _ = tiny_store
    overrides, trains, is_adapter, unmerged = CASES[case]
    assert run_sft(root, f"method-{case}", *overrides) == 0

    before, after = train_spy["before"], train_spy["after"]
    trainable = {n for n, (_, grad) in before.items() if grad}
    frozen = set(before) - trainable
    assert trainable and trainable == {n for n in before if trains(n)}
    assert [n for n in sorted(trainable) if torch.equal(before[n][0], after[n])] == []  # every trainable one moved
    assert [n for n in sorted(frozen) if not torch.equal(before[n][0], after[n])] == []  # no frozen one did

    store = ArtifactStore(root)
    art = store.read(store.stage_dir(f"method-{case}", "sft"))
    assert art.manifest.lineage["adapter"] is is_adapter and art.manifest.lineage["method"] == art.manifest.metrics[
        "method"]
    assert (art.model_dir / "adapter_config.json").is_file() is is_adapter
    assert art.manifest.metrics["trainable_params"] == sum(after[n].numel() for n in trainable)

    # The published artifact reproduces the trained model and generates.
    policy = load_policy(art, "fp32")
    assert (type(policy).__name__.startswith("PeftModel")) is unmerged
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 2, 1, 50]])
    trained = train_spy["model"].eval()
    with torch.no_grad():
        want = trained(input_ids=ids).logits
        got = policy(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    out = policy.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, min_new_tokens=3,
                          do_sample=False)
    assert out.shape[-1] - ids.shape[-1] == 3
    if not is_adapter:
        _full_weights_differ_from_base_only_where_trained(root, f"method-{case}", case, trains)


def _full_weights_differ_from_base_only_where_trained(root, run, case, trains):
    from safetensors.torch import load_file

    base = load_file(root / "tiny" / "base" / "model" / "model.safetensors")
    tuned = load_file(root / run / "sft" / "model" / "model.safetensors")
    assert set(tuned) >= set(base)
    assert [k for k in base if not trains(k) and not torch.equal(base[k], tuned[k])] == []
    assert [k for k in base if trains(k) and torch.equal(base[k], tuned[k])] == []
    if case == "bitfit":  # the added biases started at zero (the base's function) and trained
        added = set(tuned) - set(base)
        assert added and all(k.endswith(".bias") and tuned[k].abs().sum() > 0 for k in added)
        config = json.loads((root / run / "sft" / "model" / "config.json").read_text())
        assert config["attention_bias"] and config["mlp_bias"]


def test_qlora_is_refused_at_config_load_without_cuda(tiny_store, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: qlora is allowed")
    root, _ = tiny_store
    assert run_sft(root, "method-qlora", "peft.method=qlora") == 2
    err = capsys.readouterr().err
    assert "(command line): peft.method: qlora" in err and "CUDA" in err
    assert not (root / "method-qlora" / "sft.partial").exists()  # refused before any work


def test_bitfit_refuses_a_model_without_biases(tiny_store, capsys):
    root, _ = tiny_store
    assert run_sft(root, "bitfit-nobias", "peft.method=bitfit") == 2
    assert "bitfit trains bias terms, but this llama model has none; set peft.add_bias: true" in capsys.readouterr().err


@pytest.mark.parametrize(("overrides", "message"), [
    (["peft.method=prompt", "merge=true"], "merge: prompt trains virtual tokens"),
    (["peft.method=freeze", "peft.last_layers=1", "merge=true"], "merge: freeze (selective) saves full weights"),
    (["peft.method=prefix", "packing=true"], "packing: prefix prepends virtual tokens"),
    (["peft.method=prefix", "train.gradient_checkpointing=true"], "train.gradient_checkpointing: prefix tuning"),
    (["peft.method=freeze"], "peft.last_layers: freeze trains nothing"),
    (["peft.method=full", "peft.use_dora=true"], "peft.use_dora: applies to method lora/qlora only"),
])
def test_impossible_method_combinations_are_refused_at_config_load(tiny_store, capsys, overrides, message):
    root, _ = tiny_store
    assert run_sft(root, "refused", *overrides) == 2
    assert message in capsys.readouterr().err


def test_soft_prompt_policy_is_refused_by_stages_that_train_on_it(tiny_store):
    """reward / DPO / PPO train on merged weights: a prompt-tuned SFT is refused with a clear message."""
    from alignment.artifacts import Artifact
    from alignment.manifest import Manifest

    root, _ = tiny_store
    store = ArtifactStore(root)
    lora = store.read(store.stage_dir("tiny", "sft"))
    require_mergeable(lora, "dpo")  # LoRA merges: fine
    assert run_sft(root, "soft-parent", "peft.method=prompt", "peft.num_virtual_tokens=2", "train.max_steps=1") == 0
    prompt = store.read(store.stage_dir("soft-parent", "sft"))
    with pytest.raises(ArtifactError, match="dpo needs a policy whose weights it can train.*prompt adapter"):
        require_mergeable(prompt, "dpo")
    # A later adapter stacked on a soft prompt cannot be rebuilt: refused before loading anything.
    child = Artifact(root / "soft-parent" / "dpo", Manifest(stage="dpo", run="soft-parent", config={}, config_hash="",
                     lineage={"parent": str(prompt.path), "adapter": True}), "0" * 64)
    with pytest.raises(ArtifactError, match="soft-prompt adapter .* can only be the last link"):
        load_policy(child, "fp32")
