"""The reward stage through its real entry point on the tiny model: the published RM loads with
AutoModelForSequenceClassification and ranks its training pairs, the manifest records base, lineage
and gate metrics, soft labels reach the loss, and bad data / a failed quality gate fail loudly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from alignment.artifacts import ArtifactStore
from alignment.cli import main
from alignment.hardware import place
from alignment.manifest import MANIFEST, Manifest, list_outputs

CONFIG = "configs/tiny/reward.yaml"


def _align(*args) -> int:
    return main([str(a) for a in args])


def _copy_store(tiny_store, dest: Path) -> Path:
    """A private artifact root holding the session's tiny base + sft (tests must not write into it)."""
    root, run = tiny_store
    shutil.copytree(root / run, dest / run)
    return dest


@pytest.fixture(scope="module")
def reward_store(tiny_store, tmp_path_factory) -> Path:
    root = _copy_store(tiny_store, tmp_path_factory.mktemp("reward"))
    assert _align("run", "reward", "-c", CONFIG, "--artifacts", root) == 0
    return root


def _train_pairs(n: int) -> list[dict]:
    from alignment.preferences import load_pairs

    return load_pairs("data/prefs/train.jsonl")[:n]


def test_published_rm_loads_and_ranks_its_training_pairs(reward_store):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from alignment.reward import pairwise_accuracy, score_pairs

    art = ArtifactStore(reward_store).read_stage("tiny", "reward")  # verifies every output's sha256
    model = place(AutoModelForSequenceClassification.from_pretrained(art.model_dir).eval())
    tok = AutoTokenizer.from_pretrained(art.model_dir)
    assert model.config.num_labels == 1
    assert model.config.pad_token_id == tok.pad_token_id != tok.eos_token_id

    pairs = _train_pairs(32)  # the pairs configs/tiny/reward.yaml trains on
    scores = score_pairs(model, tok, pairs, batch_size=8)
    accuracy = pairwise_accuracy(scores["chosen"], scores["rejected"])
    assert accuracy >= 0.9, scores
    # the manifest rounds; on a GPU the stage's own scoring and this one of the saved weights can rank one
    # near-tie pair differently (0.9688 vs 0.9375 on an H200)
    one_pair = 0.0 if model.device.type == "cpu" else 1 / len(pairs)
    assert accuracy == pytest.approx(art.manifest.metrics["train_accuracy"], abs=1e-4 + one_pair)

    # Batched, padded scoring reads the same reward as one unpadded conversation at a time.
    conv = pairs[0]["prompt"] + pairs[0]["chosen"]
    ids = tok.apply_chat_template(conv, tokenize=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        alone = model(**{k: v.to(model.device) for k, v in ids.items()}).logits.squeeze().item()
    assert alone == pytest.approx(scores["chosen"][0], abs=1e-4)


def test_manifest_records_base_lineage_inputs_and_gate_metrics(reward_store, tiny_store):
    import torch

    from alignment.policy import load_policy

    store = ArtifactStore(reward_store)
    rm, base, sft = (store.read_stage("tiny", s) for s in ("reward", "base", "sft"))
    m = rm.manifest
    assert m.status == "complete" and m.base_model == base.manifest.base_model
    assert set(m.inputs) == {"base", "sft"}
    assert m.lineage["parent"] == str(sft.path) and m.lineage["adapter"] is False and m.lineage["init"] == "sft"
    for key in ("eval_accuracy", "eval_mean_margin", "eval_ece", "eval_length_corr", "eval_accuracy_before",
                "reward_mean", "reward_std", "train_accuracy"):
        assert isinstance(m.metrics[key], float), key
    eval_pairs = [json.loads(line) for line in Path("data/prefs/eval.jsonl").read_text().splitlines()[:16]]
    assert set(m.metrics["eval_accuracy_by_category"]) == {p["category"] for p in eval_pairs}
    by_cat = m.metrics["eval_by_category"]
    assert set(by_cat) == set(m.metrics["eval_accuracy_by_category"])
    assert sum(v["pairs"] for v in by_cat.values()) == m.metrics["eval_pairs"]
    for cat, v in by_cat.items():
        assert v["accuracy"] == m.metrics["eval_accuracy_by_category"][cat] and -1 <= v["length_corr"] <= 1
    assert m.metrics["gate_passed"] is True and m.metrics["gate_failures"] == []
    assert m.metrics["loss_labels"] == "hard" and m.metrics["steps"] == 60 and m.metrics["stat_pairs"] == 32
    assert 0 < m.metrics["trainable_params"] < m.metrics["total_params"]
    assert m.metrics["reward_std"] > 0
    assert m.metrics["eval_accuracy_ci"][0] <= m.metrics["eval_accuracy"] <= m.metrics["eval_accuracy_ci"][1]

    # The merged LoRA changed the transformer the RM was initialised from (base + SFT merged).
    from transformers import AutoModelForSequenceClassification

    trained = AutoModelForSequenceClassification.from_pretrained(rm.model_dir).model.state_dict()
    init = load_policy(sft, "fp32").model.state_dict()
    assert trained.keys() == init.keys()
    assert any(not torch.equal(trained[k], init[k].cpu()) for k in init)


def test_heldout_phrasings_set_is_scored_and_reported_apart(reward_store):
    """configs/tiny/reward.yaml adds the held-out-phrasings pairs (data.eval_sets, first 16): their own accuracy,
    CI, per-kind figures and length correlation, equal to scoring the published RM on exactly those pairs."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from alignment.preferences import load_pairs
    from alignment.reward import gate_metrics, score_pairs

    art = ArtifactStore(reward_store).read_stage("tiny", "reward")
    m = art.manifest.metrics
    pairs = load_pairs("data/prefs/eval_heldout_phrasings.jsonl")[:16]
    model = AutoModelForSequenceClassification.from_pretrained(art.model_dir).eval()
    s = score_pairs(model, AutoTokenizer.from_pretrained(art.model_dir), pairs, batch_size=8, max_length=256)
    want = gate_metrics(s["chosen"], s["rejected"], s["len_chosen"], s["len_rejected"])
    assert m["eval_sets"] == ["heldout_phrasings"] and m["heldout_phrasings_pairs"] == 16 == m["eval_pairs"]
    for key in ("accuracy", "mean_margin", "length_corr"):
        assert m[f"heldout_phrasings_{key}"] == pytest.approx(want[key], abs=2e-4), key
    lo, hi = m["heldout_phrasings_accuracy_ci"]
    assert 0 <= lo <= m["heldout_phrasings_accuracy"] <= hi <= 1
    by_kind = m["heldout_phrasings_by_category"]
    assert set(by_kind) == {p["category"] for p in pairs} == set(m["heldout_phrasings_accuracy_by_category"])
    assert sum(v["pairs"] for v in by_kind.values()) == 16
    # its own figures, not the in-distribution set's under a second name
    assert [v["mean_margin"] for v in by_kind.values()] != [v["mean_margin"] for v in m["eval_by_category"].values()]
    # no per-kind floor configured: nothing gated, nothing skipped
    assert m["gate_kinds_not_gated"] == {} and m["gate"]["min_kind_accuracy"] is None


def test_per_kind_floor_on_heldout_phrasings_fails_the_gate(tiny_store, tmp_path, capsys):
    root = _copy_store(tiny_store, tmp_path)
    code = _align("run", "reward", "-c", CONFIG, "--artifacts", root, "train.max_steps=2", "data.max_set_pairs=20",
                  "data.max_stat_pairs=8",
                  "gate.kind_set=heldout_phrasings", "gate.min_kind_accuracy=1.01", "gate.min_kind_pairs=2")
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("align: error")]
    assert code == 2 and len(err) == 1 and "failed_gate" in err[0]
    assert "quality gate failed: heldout_phrasings kind '" in err[0] and "< min_kind_accuracy 1.01" in err[0]
    m = ArtifactStore(root).read_stage("tiny", "reward").manifest
    assert m.status == "failed_gate" and m.metrics["gate_passed"] is False
    assert m.metrics["stat_pairs"] == 8 and m.metrics["train_pairs"] == 32  # reward mean/std from the first 8
    # 20 pairs over 16 kinds: the 4 kinds with 2 pairs are gated, the 12 with one pair only reported
    by_kind = m.metrics["heldout_phrasings_by_category"]
    two = {k for k, v in by_kind.items() if v["pairs"] == 2}
    assert len(two) == 4 and len(m.metrics["gate_failures"]) == 4
    assert {f.split("'")[1] for f in m.metrics["gate_failures"]} == two
    assert set(m.metrics["gate_kinds_not_gated"]) == set(by_kind) - two


def test_bad_eval_set_is_one_line_naming_the_key(tiny_store, tmp_path, capsys):
    root = _copy_store(tiny_store, tmp_path)
    code = _align("run", "reward", "-c", CONFIG, "--artifacts", root, "data.eval_sets.heldout_phrasings=nope.jsonl")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1] == "align: error: data.eval_sets.heldout_phrasings: nope.jsonl: file not found"
    assert not (root / "tiny" / "reward").exists()

    code = _align("run", "reward", "-c", CONFIG, "data.eval_sets.Held-Out=x.jsonl", "gate.kind_set=phrasings",
                  "gate.min_kind_pairs=0", "data.max_set_pairs=0")
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("align: error")]
    assert code == 2 and len(err) == 4, err
    assert "data.eval_sets.Held-Out: expected a name of lowercase letters" in err[0]
    assert err[1].endswith("data.max_set_pairs: expected at least 1 (or leave unset)")
    assert "gate.kind_set: expected 'eval' or a name in data.eval_sets (heldout_phrasings, Held-Out), got " \
           "'phrasings'" in err[2]
    assert err[3].endswith("gate.min_kind_pairs: expected at least 1")


def test_gate_failure_publishes_failed_gate_and_exits_nonzero(tiny_store, tmp_path, capsys):
    root = _copy_store(tiny_store, tmp_path)
    # lr 1e-30 (0 is refused at config load): every AdamW step is below the weights' rounding step
    code = _align("run", "reward", "-c", CONFIG, "--artifacts", root, "train.lr=1e-30", "train.max_steps=2",
                  "gate.min_accuracy=1.01", "gate.max_length_corr=0.99")
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("align: error")]
    assert code == 2
    assert len(err) == 1 and err[0].startswith("align: error: reward: quality gate failed: accuracy ")
    assert "< min_accuracy 1.01" in err[0] and "max_length_corr" not in err[0] and "failed_gate" in err[0]

    art = ArtifactStore(root).read_stage("tiny", "reward")  # still published and intact
    assert art.manifest.status == "failed_gate"
    assert art.manifest.metrics["gate_passed"] is False
    assert art.manifest.metrics["gate_failures"][0].endswith("< min_accuracy 1.01")
    assert (art.model_dir / "model.safetensors").is_file()
    # lr ~ 0: the RM is its random initial head, no better than before training.
    assert art.manifest.metrics["eval_accuracy"] == art.manifest.metrics["eval_accuracy_before"]
    # The same command again finds the artifact up to date, and still must not look successful.
    code = _align("run", "reward", "-c", CONFIG, "--artifacts", root, "train.lr=1e-30", "train.max_steps=2",
                  "gate.min_accuracy=1.01", "gate.max_length_corr=0.99")
    err = capsys.readouterr().err
    assert code == 2 and "quality gate failed" in err
    # A stage downstream refuses the failed RM before anything loads, naming it; allow_failed_inputs lets it through.
    code = _align("run", "ppo", "-c", "configs/tiny/ppo.yaml", "--artifacts", root)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("align: error")]
    assert code == 2 and not (root / "tiny" / "ppo").exists()
    assert err == [f"align: error: inputs.reward: {art.path} failed its quality gate "
                   f"({art.manifest.metrics['gate_failures'][0]}); retrain it, or set allow_failed_inputs=true "
                   "to use it anyway"]
    from alignment.config import load_config
    from alignment.runner import resolve_inputs
    from stages import ppo

    cfg = load_config(ppo.Config, "configs/tiny/ppo.yaml", ["allow_failed_inputs=true"])
    assert resolve_inputs(ArtifactStore(root), "tiny", "ppo", cfg, ("reward",))["reward"].path == art.path


def test_bad_pair_file_exits_2_naming_file_and_row(tiny_store, tmp_path, capsys):
    root = _copy_store(tiny_store, tmp_path)
    bad = tmp_path / "bad.jsonl"
    good = {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."}
    bad.write_text(json.dumps(good) + "\n" + json.dumps({**good, "rejected": "Hi!"}) + "\n")
    code = _align("run", "reward", "-c", CONFIG, "--artifacts", root, f"data.train={bad}")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith(f"align: error: {bad}: ") and err[-1].endswith(f"{bad}: row 2: chosen == rejected")
    assert not (root / "tiny" / "reward").exists()


def test_soft_labels_requested_but_missing_exit_2(tiny_store, tmp_path, capsys):
    root = _copy_store(tiny_store, tmp_path)
    code = _align("run", "reward", "-c", CONFIG, "--artifacts", root, "loss.labels=soft")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == ["align: error: data/prefs/train.jsonl: row 1: loss.labels is 'soft' but the pair has no 'p_chosen'"]


def test_only_the_label_artifact_can_be_named(capsys):
    code = _align("run", "reward", "-c", CONFIG, "data.train=artifact:sft")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == [f"align: error: {CONFIG} (command line): data.train: only 'artifact:label' names an artifact, "
                   "got 'artifact:sft'"]


def _fake_label_artifact(folder: Path, pairs: list[dict]) -> Path:
    """What the RLAIF label stage publishes: `pairs.jsonl` of AI-labelled pairs, with a manifest."""
    folder.mkdir(parents=True)
    with (folder / "pairs.jsonl").open("w") as f:
        for i, p in enumerate(pairs):
            row = {k: p[k] for k in ("prompt", "chosen", "rejected")}
            f.write(json.dumps({**row, "label_source": "ai", "p_chosen": 0.9 if i % 2 else 0.7}) + "\n")
    manifest = Manifest(stage="label", run="fake", config={}, config_hash="0" * 64, outputs=list_outputs(folder))
    (folder / MANIFEST).write_text(manifest.model_dump_json())
    return folder


def test_soft_labels_from_the_label_artifact_on_the_base(tiny_store, tmp_path):
    root = _copy_store(tiny_store, tmp_path)
    label = _fake_label_artifact(tmp_path / "label", _train_pairs(16))
    code = _align("run", "reward", "-c", CONFIG, "--artifacts", root, "init=base", "data.train=artifact:label",
                  f"inputs.label={label}", "train.max_steps=4")
    assert code == 0
    store = ArtifactStore(root)
    m = store.read_stage("tiny", "reward").manifest
    assert m.metrics["loss_labels"] == "soft" and m.metrics["train_pairs"] == 16
    assert set(m.inputs) == {"base", "label"} and m.inputs["label"].path == str(label)
    assert m.lineage["parent_stage"] == "base" and m.lineage["init"] == "base"
    assert m.base_model == store.read_stage("tiny", "base").manifest.base_model


def test_trainer_loss_is_the_soft_label_and_margin_loss(tiny_store, tmp_path):
    """The trainer's loss on a real batch equals the pure functions on the rewards it computed."""
    import torch
    from trl import RewardConfig

    from alignment.models import load_tokenizer
    from alignment.policy import load_policy
    from alignment.preferences import to_trl_dataset
    from alignment.reward import (bradley_terry_loss, reward_model_from_policy, soft_label_loss,
                                  soft_label_reward_trainer)

    root, run = tiny_store
    base = ArtifactStore(root).read_stage(run, "base")
    tok = load_tokenizer(base.model_dir)
    pairs = [{**p, "p_chosen": 0.75, "margin": 2.0} for p in _train_pairs(4)]
    for columns, expected in ((["margin"], "soft"), (["p_chosen"], "margin")):
        model = reward_model_from_policy(load_policy(base, "fp32"), tok.pad_token_id)
        # max_length above the longest of the four: TRL drops longer pairs, and one of the first four is over 256
        args = RewardConfig(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], max_length=1024,
                            center_rewards_coefficient=0.01)
        ds = to_trl_dataset(pairs).remove_columns(columns)
        trainer = soft_label_reward_trainer()(model=model, args=args, processing_class=tok, train_dataset=ds)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        loss, outputs = trainer.compute_loss(trainer.model, dict(batch), return_outputs=True)
        rc, rr = torch.chunk(outputs.logits.squeeze(-1).detach(), 2)
        center = 0.01 * ((rc + rr) ** 2).mean()
        if expected == "soft":
            want = soft_label_loss(rc, rr, torch.full((4,), 0.75)) + center
        else:
            want = bradley_terry_loss(rc, rr, torch.full((4,), 2.0)) + center
        assert loss.item() == pytest.approx(want.item(), rel=1e-6)


def test_ia3_rm_is_merged_and_soft_prompts_are_refused(tiny_store, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    root = _copy_store(tiny_store, tmp_path)
    code = _align("run", "reward", "-c", CONFIG, "--artifacts", root, "peft.method=prefix")
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("align: error")]
    assert code == 2 and len(err) == 1 and "peft.method: the reward stage trains lora, ia3, full" in err[0]

    assert _align("run", "reward", "-c", CONFIG, "--artifacts", root, "peft.method=ia3", "train.max_steps=2") == 0
    art = ArtifactStore(root).read_stage("tiny", "reward")
    assert art.manifest.lineage["method"] == "ia3" and art.manifest.lineage["merged"] is True
    assert not (art.model_dir / "adapter_config.json").exists()
    assert AutoModelForSequenceClassification.from_pretrained(art.model_dir).config.num_labels == 1


PROMPTS = [[{"role": "user", "content": "Hi"}],
           [{"role": "user", "content": "Tell me about rivers, glaciers and the water cycle in a few words."}]]


def test_unmerged_adapter_is_a_reward_role_on_the_ppo_base_scoring_like_the_merged_rm(reward_store, tiny_store,
                                                                                        tmp_path):
    import torch

    from alignment.errors import ConfigError
    from alignment.models import load_tokenizer
    from alignment.policy import load_policy
    from alignment.ppo import PPOSpec, PPOTrainer, lora_config
    from alignment.reward_sources import AdapterReward, ModelReward, RewardSource, rl_reward
    from alignment.schema import PeftSpec

    store = ArtifactStore(reward_store)
    art, sft = store.read_stage("tiny", "reward"), store.read_stage("tiny", "sft")
    outputs = {o.path for o in art.manifest.outputs}
    assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json"} <= outputs
    reward = rl_reward(RewardSource(normalize=True), {"reward": art, "sft": sft}, "fp32")
    assert isinstance(reward, AdapterReward) and reward.adapter_mb < 1.0
    tok = load_tokenizer(sft.model_dir)
    trainer = PPOTrainer(load_policy(sft, "fp32"), tok, reward, PPOSpec(max_new_tokens=8, batch_size=4,
                         mini_batch_size=4, ppo_epochs=1), lora_config(PeftSpec(r=8, alpha=16, dropout=0.0)))
    merged = ModelReward.from_artifact(art, "fp32", normalize=True)
    ro = trainer.rollout(PROMPTS, seed=0)
    args = (ro.query_ids, ro.query_mask, ro.response_ids, ro.response_mask, ro.has_eos)
    assert torch.allclose(reward.score_ids(*args), merged.score_ids(*args), atol=1e-4)
    # the fourth role is frozen and outside the optimiser: an update moves the policy, not the reward
    before = reward.score_ids(*args)
    stats = trainer.step(PROMPTS * 2)
    assert stats["ppo/kl"] == 0.0 and torch.allclose(reward.score_ids(*args), before, atol=1e-6)
    reward_params = [p for n, p in trainer.model.named_parameters() if ".reward." in n]
    assert reward_params and not any(p.requires_grad for p in reward_params)
    assert not {id(p) for p in reward_params} & {id(p) for p in trainer._trainable}
    # an RM trained on another policy is not an adapter on this one: merged (auto) or a clear error (adapter)
    other = store.read_stage("tiny", "base")
    assert isinstance(rl_reward(RewardSource(), {"reward": art, "sft": other}, "fp32"), ModelReward)
    with pytest.raises(ConfigError, match="reward.model_as: 'adapter' needs"):
        rl_reward(RewardSource(model_as="adapter"), {"reward": art, "sft": other}, "fp32")
    # a copied store (rsync to a cluster, cp -al) keeps its manifests' hashes: still the adapter on the copy's SFT
    shutil.copytree(Path(reward_store) / "tiny", tmp_path / "copy" / "tiny")
    moved = ArtifactStore(tmp_path / "copy")
    pair = {"reward": moved.read_stage("tiny", "reward"), "sft": moved.read_stage("tiny", "sft")}
    assert isinstance(rl_reward(RewardSource(), pair, "fp32"), AdapterReward)


def test_ppo_stage_loads_the_reward_model_as_an_adapter_role(reward_store):
    assert _align("run", "ppo", "-c", "configs/tiny/ppo.yaml", "--artifacts", reward_store, "ppo.updates=2",
                  "ppo.batch_size=8", "eval.every=0", "eval.prompts=4") == 0
    m = ArtifactStore(reward_store).read_stage("tiny", "ppo").manifest.metrics
    assert m["reward_role"] == "adapter" and m["reward_model_mb"] < 1.0 and m["value_init"] == "reward"
    assert m["updates"] == 2 and "first" in m["eval_reward"]


def test_config_schema_lists_the_eval_set_and_kind_floor_keys(capsys):
    assert _align("config", "schema", "reward") == 0
    lines = capsys.readouterr().out.splitlines()
    for key in ("data.eval_sets: dict[str, str] = {}", "data.max_set_pairs: int | None = null",
                "data.max_stat_pairs: int | None = null", "gate.min_kind_accuracy: float | None = null",
                'gate.kind_set: str = "eval"', "gate.min_kind_pairs: int = 5"):
        assert key in lines, key
        assert lines[lines.index(key) + 1].startswith("    ") and len(lines[lines.index(key) + 1].strip()) > 20


def test_rm_train_fit_reports_each_kind_on_the_pairs_it_trained_on(reward_store):
    """bench/rm_train_fit.py: per kind, the share of the file's first 1,200 pairs the RM ranks right, and how many."""
    import subprocess
    import sys

    import torch

    from alignment.preferences import load_pairs
    from alignment.reward import load_reward_model, score_pairs

    model_dir = reward_store / "tiny" / "reward" / "model"
    out = subprocess.run([sys.executable, "bench/rm_train_fit.py", str(model_dir), "data/prefs/train.jsonl",
                          "keyword,title"], capture_output=True, text=True, check=True).stdout
    got = json.loads(out)
    pairs = [p for p in load_pairs("data/prefs/train.jsonl")[:1200] if p["category"] == "title"]
    model, tok = load_reward_model(model_dir)
    with torch.no_grad():
        s = score_pairs(model, tok, pairs, batch_size=16, max_length=512)
    right = sum(c > r for c, r in zip(s["chosen"], s["rejected"], strict=True))
    assert got == {"keyword": [got["keyword"][0], 75], "title": [round(right / 75, 3), 75]}
    for args, line in (([str(reward_store), "data/prefs/train.jsonl", "title"], "not a reward model folder"),
                       ([str(model_dir), "nope.jsonl", "title"], "nope.jsonl: no such pairs file"),
                       ([str(model_dir), "data/prefs/train.jsonl", "titel"], "no pair of kind titel among")):
        bad = subprocess.run([sys.executable, "bench/rm_train_fit.py", *args], capture_output=True, text=True)
        assert bad.returncode == 2 and len(bad.stderr.splitlines()) == 1 and line in bad.stderr, bad.stderr


def test_rm_kinds_reads_a_published_reward_artifact(reward_store):
    """bench/rm_kinds.py on a real reward artifact: its per-kind table and floor count agree with the run's own
    `<set>_accuracy_by_category` (another key of the same metrics)."""
    import subprocess
    import sys

    art = reward_store / "tiny" / "reward"
    metrics = json.loads((art / "metrics.json").read_text())
    res = subprocess.run([sys.executable, "bench/rm_kinds.py", f"tiny={art}", "--min", "0.5"], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    by_kind = metrics["heldout_phrasings_accuracy_by_category"]
    rows = res.stdout.splitlines()
    assert len(rows) == 2 + len(by_kind) + 3
    assert f"| kinds >= 0.5 | {sum(a >= 0.5 for a in by_kind.values())} of {len(by_kind)} |" in rows


def test_gpu_rm_alone_imports_the_base_trains_three_seeds_and_scores_their_fit(reward_store, tmp_path):
    """bench/gpu_rm.sh alone (`gpu_lease.sh rm`): it imports the base into a fresh root itself and finds it the same,
    byte for byte, as the one BASE_META names, then trains three reward-model seeds from it; each run's metrics and
    its per-kind fit on its own training pairs are written out, the seeds differ, and rm_done marks the end."""
    import os
    import subprocess
    import sys

    out, art = tmp_path / "out", tmp_path / "art"
    out.mkdir()
    env = {**os.environ, "ART": str(art), "RUN": "tiny", "RM_CONFIG": CONFIG, "RM_FIT_KINDS": "title",
           "BASE_META": str(reward_store / "tiny" / "base"), "BASE_CONFIG": "configs/tiny/base.yaml",
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])}  # its python3: this one
    subprocess.run(["bash", "bench/gpu_rm.sh", str(out), "init=base train.max_steps=2 threads=1"], env=env, check=True,
                   timeout=600)
    assert (out / "rm_base.txt").read_text() == "base: the same weights as the development base\n"
    assert (out / "rm_done").is_file() and not (out / "rm.err").exists()
    metrics = [json.loads((out / f"rm_s{s}.json").read_text()) for s in range(3)]
    assert [m["steps"] for m in metrics] == [2, 2, 2] and len({m["train_loss"] for m in metrics}) == 3
    for s in range(3):
        fit = json.loads((out / f"rm_fit_s{s}.json").read_text())
        assert list(fit) == ["title"] and fit["title"][1] == 75 and 0 <= fit["title"][0] <= 1
