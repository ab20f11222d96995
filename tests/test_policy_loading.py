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
from _device import logits_of

REPO = Path(__file__).resolve().parent.parent
GRPO = {
    "stage": "grpo", "run": "tiny", "seed": 0, "precision": "fp32", "algorithm": {"name": "grpo"},
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
    run_stage("grpo", str(grpo), [f"inputs.sft={sft}"], root=root, run="tiny-grpo")
    store = ArtifactStore(root.resolve())
    arts = {s: store.read_stage("tiny", s) for s in ("sft", "dpo", "ppo")}
    arts["grpo"] = store.read_stage("tiny-grpo", "grpo")
    return arts


def _ids(model_dir: Path) -> torch.Tensor:
    tok = load_tokenizer(model_dir)
    text = tok.apply_chat_template([{"role": "user", "content": "Name three rivers in one line."}],
                                   tokenize=False, add_generation_prompt=True) + "The Nile, the Rhine"
    return tok(text, return_tensors="pt").input_ids


def _logits(model, ids) -> torch.Tensor:
    return logits_of(model.eval(), ids)


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


def test_an_adapter_deeper_in_a_partial_folder_names_the_run_and_its_published_path(chain, tmp_path):
    """online_dpo writes `<run>/online_dpo.partial/rounds/<i>/model/`: the merged parent goes to `<run>/.merged`
    (not into the artifact, whose path changes when published) and the card names the published path."""
    import shutil

    from huggingface_hub import ModelCard

    from alignment.policy import point_adapter_at_parent

    adapter = tmp_path / "r" / "online_dpo.partial" / "rounds" / "2" / "model"
    shutil.copytree(chain["dpo"].model_dir, adapter)
    point_adapter_at_parent(adapter, chain["sft"])
    base = Path(json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"])
    assert base == (tmp_path / "r" / MERGED_DIR / f"sft-{chain['sft'].manifest_sha256[:16]}").resolve()
    assert (base / "config.json").is_file() and not (tmp_path / "r" / "online_dpo.partial" / MERGED_DIR).exists()
    card = ModelCard.load(adapter / "README.md")
    assert str((tmp_path / "r" / "online_dpo" / "rounds" / "2" / "model").resolve()) in card.text
    assert "\n# r/online_dpo: LORA adapter" in card.text


def test_lineage_recorded_relative_to_another_cwd_still_resolves_in_a_moved_store(chain, tmp_path, monkeypatch):
    """Older manifests recorded `parent` relative to the writer's working directory; a store may also be moved.
    The parent is found as `<run>/<stage>` under the store the artifact is read from."""
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(chain["dpo"].path.parent, moved / "tiny", ignore=shutil.ignore_patterns(MERGED_DIR))
    manifest = moved / "tiny" / "dpo" / "manifest.json"
    m = json.loads(manifest.read_text())
    m["lineage"]["parent"] = "../nowhere/tiny/sft"  # as an old relative record, resolving nowhere from here
    manifest.write_text(json.dumps(m))
    monkeypatch.chdir(tmp_path)
    art = ArtifactStore(moved).read_stage("tiny", "dpo")
    assert [a.path for a in lineage_chain(art)] == [moved / "tiny" / s for s in ("base", "sft", "dpo")]
    ids = _ids(art.model_dir)
    assert (_logits(load_policy(art, "fp32"), ids) - _logits(load_policy(chain["dpo"], "fp32"), ids)).abs().max() < 1e-6

    # An artifact at the same <run>/<stage> whose manifest is not the one the child recorded is not taken.
    sft_manifest = moved / "tiny" / "sft" / "manifest.json"
    m = json.loads(sft_manifest.read_text())
    m["finished_at"] = "another run of sft"
    sft_manifest.write_text(json.dumps(m))
    from alignment.errors import ArtifactError

    with pytest.raises(ArtifactError, match="nowhere/tiny/sft"):
        lineage_chain(ArtifactStore(moved).read_stage("tiny", "dpo"))


@pytest.fixture(scope="module")
def merged_chain(chain):
    """SFT with `merge: true` and DPO on it, in the chain's store (run `merged`)."""
    root = chain["sft"].path.parent.parent
    base = chain["sft"].path.parent / "base"
    run_stage("sft", "configs/tiny/sft.yaml", ["train.max_steps=6", "train.lr=5e-3", "merge=true",
                                              f"inputs.base={base}"], root=root, run="merged")
    run_stage("dpo", "configs/tiny/dpo.yaml", ["train.max_steps=3", "train.lr=5e-3", "eval.kl_prompts=0"],
              root=root, run="merged")
    store = ArtifactStore(root)
    return store.read_stage("merged", "sft"), store.read_stage("merged", "dpo")


def test_dpo_on_an_sft_with_merged_weights_names_that_folder(merged_chain, tmp_path, monkeypatch):
    from peft import AutoPeftModelForCausalLM

    sft, dpo = merged_chain
    ids = _ids(sft.model_dir)
    want = _logits(load_policy(dpo, "fp32"), ids)
    base = json.loads((dpo.model_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == str((sft.path / "merged").resolve())
    assert not (dpo.path.parent / MERGED_DIR).exists()  # no second copy of base + SFT
    monkeypatch.chdir(tmp_path)
    assert (_logits(AutoPeftModelForCausalLM.from_pretrained(str(dpo.model_dir)), ids) - want).abs().max() < 1e-5


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_trl_stages_refuse_an_lm_head_adapter_at_config_load(stage):
    from alignment.errors import ConfigError
    from alignment.runner import load_stage_config

    with pytest.raises(ConfigError) as e:
        load_stage_config(stage, f"configs/tiny/{stage}.yaml", ["peft.target_modules=[q_proj,lm_head]"])
    assert e.value.problems == [
        f"configs/tiny/{stage}.yaml (command line): peft.target_modules: the {stage} stage trains with TRL, which "
        "computes log-probs from lm_head.weight directly, so an adapter on lm_head would never train; remove "
        "'lm_head' (the ppo stage's algorithm: ppo can adapt it)"]


def test_export_of_the_tied_head_ppo_policy_keeps_both_matrices(chain, tmp_path):
    """`align export` of the PPO policy (LoRA on the tied lm_head): the hf folder and the GGUF are the trained policy."""
    import importlib.util

    from transformers import AutoModelForCausalLM

    from alignment.export import export

    art = chain["ppo"]
    root, run = art.path.parent.parent, art.path.parent.name
    hf = export(root, run, "ppo", "hf", str(tmp_path / "ppo-hf"))
    model = AutoModelForCausalLM.from_pretrained(str(hf))
    assert not model.config.tie_word_embeddings
    ids = _ids(art.model_dir)
    want = _logits(load_policy(art, "fp32"), ids)
    assert (_logits(model, ids) - want).abs().max().item() < 1e-5
    if importlib.util.find_spec("llama_cpp") is None:
        return  # the GGUF side is checked in tests/test_export.py, skipped there without llama.cpp
    import llama_cpp
    import numpy as np

    gguf = export(root, run, "ppo", "gguf", str(tmp_path / "ppo.gguf"))
    llm = llama_cpp.Llama(model_path=str(gguf), logits_all=True, n_ctx=256, n_threads=1, verbose=False)
    llm.eval(ids[0].tolist())
    assert np.abs(np.array(llm.scores[: ids.shape[1]]) - want[0].numpy()).max() < 2e-3
