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
    "pissa": (["peft.method=lora", "peft.init_lora_weights=pissa"], lambda n: ".lora_A." in n or ".lora_B." in n,
              True, False),
    "olora": (["peft.method=lora", "peft.init_lora_weights=olora"], lambda n: ".lora_A." in n or ".lora_B." in n,
              True, False),
    "loraplus": (["peft.method=lora", "peft.loraplus_lr_ratio=16"], lambda n: ".lora_A." in n or ".lora_B." in n,
                 True, False),
    "adapter-pfeiffer": (["peft.method=adapter", "peft.reduction_factor=8"], lambda n: ".bottleneck_mlp." in n,
                         True, False),
    "adapter-houlsby": (["peft.method=adapter", "peft.adapter_placement=houlsby", "peft.adapter_non_linearity=gelu"],
                        lambda n: ".bottleneck_" in n, True, False),
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
    own = (art.model_dir / ("bottleneck_config.json" if case.startswith("adapter") else "adapter_config.json"))
    assert own.is_file() is is_adapter
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
    (["peft.method=adapter", "merge=true"], "merge: adapter inserts bottleneck layers with a non-linearity"),
    (["peft.method=lora", "peft.reduction_factor=4"], "peft.reduction_factor: applies to method adapter only"),
    (["peft.method=ia3", "peft.init_lora_weights=pissa"], "peft.init_lora_weights: applies to method lora only"),
    (["peft.method=lora", "peft.loraplus_lr_ratio=0"], "peft.loraplus_lr_ratio: expected a positive ratio"),
    (["peft.method=lora", "peft.init_lora_weights=svd"], "peft.init_lora_weights"),
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
    with pytest.raises(ArtifactError, match="soft-prompt or bottleneck adapter .* can only be the last link"):
        load_policy(child, "fp32")


def test_loraplus_gives_the_b_matrices_ratio_times_the_learning_rate(tiny_store, monkeypatch):
    from trl import SFTTrainer

    seen, real = {}, SFTTrainer.train

    def train(self, *args, **kwargs):
        names = {id(p): n for n, p in self.model.named_parameters()}
        seen["lr"] = {names[id(p)]: g["lr"] for g in self.optimizer.param_groups for p in g["params"]}
        return real(self, *args, **kwargs)

    monkeypatch.setattr(SFTTrainer, "train", train)
    root, _ = tiny_store
    assert run_sft(root, "loraplus-lr", "peft.method=lora", "peft.loraplus_lr_ratio=16", "train.lr=1e-3") == 0
    lrs = seen["lr"]
    a = [v for n, v in lrs.items() if ".lora_A." in n]
    b = [v for n, v in lrs.items() if ".lora_B." in n]
    assert a and b and a == pytest.approx([1e-3] * len(a)) and b == pytest.approx([16e-3] * len(b))


def test_pissa_adapter_is_saved_as_a_plain_lora_on_the_original_base(tiny_store):
    root, _ = tiny_store
    assert run_sft(root, "pissa-saved", "peft.method=lora", "peft.init_lora_weights=pissa", "peft.r=4",
                   "peft.alpha=8") == 0
    art = ArtifactStore(root).read(root / "pissa-saved" / "sft")
    conf = json.loads((art.model_dir / "adapter_config.json").read_text())
    # peft's conversion: the trained delta against the initial SVD part is a LoRA of rank 2r, scale unchanged.
    assert conf["r"] == 8 and conf["lora_alpha"] == 16 and conf["init_lora_weights"] is True
    assert art.manifest.lineage["init_lora_weights"] == "pissa"
    assert not (art.path / "checkpoints").exists()  # the initial adapter stayed in the scratch folder
