"""Every policy artifact loads the ecosystem way: `AutoPeftModelForCausalLM.from_pretrained(<artifact>/model)`
from any working directory gives exactly the policy `alignment.policy.load_policy` rebuilds from the lineage.

The chain is written under a *relative* artifact root (as `./artifacts` is by default), so an adapter that stored
a relative base path would fail to load from another directory. PPO targets the tied `lm_head` on the tiny model
(configs/tiny/ppo.yaml), the case where merging used to move the logits by up to 1.9.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from alignment.artifacts import ArtifactStore
from alignment.models import load_tokenizer
from alignment.policy import MERGED_DIR, lineage_chain, load_policy
from alignment.runner import run_stage

REPO = Path(__file__).resolve().parent.parent
GRPO = {
    "stage": "ppo", "run": "tiny", "seed": 0, "precision": "fp32", "algorithm": "grpo",
    "data": {"train": "data/instruct/train.jsonl", "eval": None, "max_prompts": 8},
    "reward": {"kind": "function", "function": "test_policy_loading:vowel_share"},
    "peft": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
    "train": {"lr": 1.0e-2, "max_steps": 2, "batch_size": 8, "logging_steps": 1, "save_steps": 100},
    "group": {"num_generations": 4, "max_completion_length": 8, "beta": 0.04},
}
PPO_FAST = ["reward.kind=function", "reward.function=test_policy_loading:vowel_share", "ppo.updates=3",
            "ppo.batch_size=8", "ppo.mini_batch_size=8", "ppo.ppo_epochs=2", "ppo.lr=5e-2", "eval.every=0",
            "eval.prompts=4", "checkpoint_every=3"]


def vowel_share(prompts, completions):
    """A reward that differs between random completions (GRPO needs a spread inside each group to learn)."""
    return [sum(c in "aeiou" for c in t.lower()) / max(len(t), 1) for t in completions]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """A tiny base -> sft -> dpo, ppo run and a grpo run on that sft, written under a relative root."""
    os.chdir(REPO)
    root = Path(os.path.relpath(tmp_path_factory.mktemp("relstore"), REPO))
    assert not root.is_absolute()
    run_stage("base", "configs/tiny/base.yaml", root=root, run="tiny")
    run_stage("sft", "configs/tiny/sft.yaml", ["train.max_steps=6", "train.lr=5e-3"], root=root, run="tiny")
    run_stage("dpo", "configs/tiny/dpo.yaml", ["train.max_steps=3", "train.lr=5e-3", "eval.kl_prompts=0"],
              root=root, run="tiny")
    run_stage("ppo", "configs/tiny/ppo.yaml", PPO_FAST, root=root, run="tiny")
    grpo = tmp_path_factory.mktemp("grpo") / "grpo.yaml"
    grpo.write_text(yaml.safe_dump(GRPO))
    sft = (root / "tiny" / "sft").resolve()
    run_stage("ppo", str(grpo), [f"inputs.sft={sft}"], root=root, run="tiny-grpo")
    store = ArtifactStore(root.resolve())
    arts = {s: store.read_stage("tiny", s) for s in ("sft", "dpo", "ppo")}
    arts["grpo"] = store.read_stage("tiny-grpo", "ppo")
    return arts


def _ids(model_dir: Path) -> torch.Tensor:
    tok = load_tokenizer(model_dir)
    text = tok.apply_chat_template([{"role": "user", "content": "Name three rivers in one line."}],
                                   tokenize=False, add_generation_prompt=True) + "The Nile, the Rhine"
    return tok(text, return_tensors="pt").input_ids


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits.float()


@pytest.mark.parametrize("stage", ["sft", "dpo", "ppo", "grpo"])
def test_auto_peft_loads_the_trained_policy_from_another_directory(chain, stage, tmp_path, monkeypatch):
    from peft import AutoPeftModelForCausalLM

    art = chain[stage]
    conf = json.loads((art.model_dir / "adapter_config.json").read_text())
    base = Path(conf["base_model_name_or_path"])
    assert base.is_absolute() and (base / "config.json").is_file(), conf["base_model_name_or_path"]
    if stage != "sft":  # trained on base + SFT: its base folder must not be the raw base (that drops SFT)
        assert base != (art.path.parent / "base" / "model").resolve()
        assert base.parent.name == MERGED_DIR

    ids = _ids(art.model_dir)
    expected = _logits(load_policy(art, "fp32"), ids)
    monkeypatch.chdir(tmp_path)  # nothing may depend on the working directory
    loaded = AutoPeftModelForCausalLM.from_pretrained(str(art.model_dir))
    got = _logits(loaded, ids)
    assert (got - expected).abs().max().item() < 1e-5

    # The adapter moved the policy: the comparison above is not between two copies of its parent.
    assert Path(art.manifest.lineage["parent"]).is_absolute()  # the lineage does not depend on the writer's cwd
    parent = load_policy(lineage_chain(art)[-2], "fp32")
    assert (_logits(parent, ids) - expected).abs().max().item() > 1e-3


def test_tied_lm_head_adapter_merges_to_the_trained_policy(chain):
    """PPO's LoRA on the tied lm_head: the merged policy equals the unmerged one (logits), embeddings untouched."""
    from peft import PeftModel

    art = chain["ppo"]
    assert "lm_head" in json.loads((art.model_dir / "adapter_config.json").read_text())["target_modules"]
    sft_policy = load_policy(chain["sft"], "fp32")
    assert sft_policy.config.tie_word_embeddings  # the case under test
    emb = sft_policy.get_input_embeddings().weight.detach().clone()
    ids = _ids(art.model_dir)
    unmerged = _logits(PeftModel.from_pretrained(sft_policy, art.model_dir), ids)
    merged = load_policy(art, "fp32")
    assert (_logits(merged, ids) - unmerged).abs().max().item() < 1e-5
    assert torch.equal(merged.get_input_embeddings().weight, emb)
    assert not merged.config.tie_word_embeddings
    assert merged.get_output_embeddings().weight.data_ptr() != merged.get_input_embeddings().weight.data_ptr()


def test_merged_parent_is_written_once_per_run_and_cards_are_real(chain):
    from huggingface_hub import ModelCard

    run_dir = chain["dpo"].path.parent
    merged = [p for p in (run_dir / MERGED_DIR).iterdir() if not p.name.startswith(".")]
    assert [p.name for p in merged] == [f"sft-{chain['sft'].manifest_sha256[:16]}"]  # dpo and ppo share it
    for stage in ("sft", "dpo", "ppo"):
        card = ModelCard.load(chain[stage].model_dir / "README.md")
        assert card.data.base_model == json.loads(
            (chain[stage].model_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
        assert "AutoPeftModelForCausalLM" in card.text and "More Information Needed" not in card.text
