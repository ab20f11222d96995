"""Online DPO: the pairing and prompt-schedule math on hand-worked numbers, and the stage on the tiny model
(every round changes the adapter, outputs load back, a run killed after a round resumes from it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from alignment.artifacts import ArtifactStore
from alignment.cli import main
from alignment.online_dpo import adjusted_scores, best_vs_worst, build_pairs, round_prompts
from alignment.policy import load_policy
from alignment.preferences import load_pairs
from alignment.runner import run_stage
from _device import logits_of

# A random tiny model meets none of the rebuilt data's constraints, so gold scores every sample 0 and no prompt
# gives a pair; a reward with a spread inside each group exercises the loop (the gold scorer has its own test).
SPREAD = ["scorer.function=test_online_dpo:vowel_share"]


def vowel_share(prompts, completions):
    return [sum(c in "aeiou" for c in t.lower()) / max(len(t), 1) for t in completions]

TINY = "configs/tiny/online_dpo.yaml"
ITEM = {"id": "p1", "prompt": [{"role": "user", "content": "hi"}], "constraints": [{"type": "lowercase"}]}


def test_best_vs_worst_picks_the_largest_gap_and_breaks_ties_by_position():
    row = best_vs_worst(ITEM, ["a", "b", "c", "d"], [0.5, 1.0, 0.0, 1.0], min_gap=0.0)
    assert row["chosen"][0]["content"] == "b" and row["rejected"][0]["content"] == "c"  # 1.0 first at index 1
    assert row["margin"] == 1.0 and row["id"] == "p1-1v2" and row["constraints"] == ITEM["constraints"]
    assert best_vs_worst(ITEM, ["a", "b"], [0.3, 0.3], min_gap=0.0) is None  # no preference
    assert best_vs_worst(ITEM, ["a", "b"], [0.3, 0.5], min_gap=0.25) is None  # gap 0.2 <= 0.25
    assert best_vs_worst(ITEM, ["same", "same "], [0.0, 1.0], min_gap=0.0) is None  # identical texts
    assert load_pairs_ok(best_vs_worst(ITEM, ["x y", "z"], [0.0, 0.75], min_gap=0.5))


def load_pairs_ok(row: dict) -> bool:
    from alignment.preferences import validate_pair

    return validate_pair(row) == [] and row["chosen"][0]["content"] == "z"


def test_truncation_penalty_ranks_finished_responses_first():
    assert adjusted_scores([1.0, 0.5, 0.0], [False, True, True], 2.0) == [-1.0, 0.5, 0.0]
    samples = [{**ITEM, "responses": ["long", "short", "bad"], "scores": [1.0, 0.5, 0.0],
                "finished": [False, True, True]},
               {**ITEM, "id": "p2", "responses": ["u", "v"], "scores": [0.2, 0.2], "finished": [True, True]}]
    pairs = build_pairs(samples, min_gap=0.0, truncation_penalty=2.0)
    assert [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in pairs.rows] == [("short", "long")]
    assert pairs.rows[0]["margin"] == 1.5 and pairs.dropped_no_gap == 1


def test_round_prompts_are_fresh_until_the_pool_is_used_then_reshuffled():
    rounds = [round_prompts(10, 4, r, seed=3) for r in range(3)]
    assert rounds == [round_prompts(10, 4, r, seed=3) for r in range(3)]  # a pure function (resume)
    assert len(set(rounds[0] + rounds[1])) == 8  # the first pass never repeats a prompt
    assert sorted(rounds[0] + rounds[1] + rounds[2][:2]) == list(range(10))  # pass 1 ends inside round 3
    assert rounds[0] != round_prompts(10, 4, 0, seed=4)


@pytest.fixture(scope="module")
def sft_path(tiny_store) -> Path:
    root, run = tiny_store
    return root / run / "sft"


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def test_each_round_trains_and_the_artifact_loads_back(tmp_path, sft_path):
    root = tmp_path / "store"
    final = run_stage("online_dpo", TINY, [f"inputs.sft={sft_path}", *SPREAD], root=root, run="tiny")
    art = ArtifactStore(root).read(final)
    r1, r2 = adapter(final / "rounds" / "1" / "model"), adapter(final / "rounds" / "2" / "model")
    lora_b = [k for k in r1 if "lora_B" in k]
    assert lora_b and any(r1[k].abs().max() > 0 for k in lora_b)  # round 1 moved off the zero-initialised B
    assert any(not torch.equal(r1[k], r2[k]) for k in r1)  # round 2 continued and changed it again
    assert all(torch.equal(r2[k], v) for k, v in adapter(final / "model").items())  # model/ = last round

    m = art.manifest.metrics
    assert [r["round"] for r in m["rounds"]] == [1, 2] and m["pairs"] == sum(r["pairs"] for r in m["rounds"]) > 0
    assert m["generated_tokens"] > 0 and m["eval"]["kl_prompts"] == 8
    for r in (1, 2):
        info = json.loads((final / "rounds" / str(r) / "round.json").read_text())
        from alignment.manifest import sha256_file

        assert info["adapter_sha256"] == sha256_file(final / "rounds" / str(r) / "model" / "adapter_model.safetensors")
        pairs = load_pairs(str(final / "rounds" / str(r) / "pairs.jsonl"))
        assert len(pairs) == info["pairs"] and all(p["label_source"] == "ai" for p in pairs)
    # Rounds see different prompts (fresh slices of the permutation).
    prompts = [{s["id"] for s in map(json.loads, (final / "rounds" / str(r) / "samples.jsonl").open())} for r in (1, 2)]
    assert prompts[0] and not prompts[0] & prompts[1]

    # load_policy follows the lineage (base -> SFT -> online adapter): not the SFT model any more.
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    policy, sft = load_policy(art, "fp32"), load_policy(ArtifactStore(root).read(sft_path), "fp32")
    assert not torch.allclose(logits_of(policy, ids), logits_of(sft, ids), atol=1e-5)


def test_resume_after_a_round_keeps_it(tmp_path, sft_path, monkeypatch):
    import stages.online_dpo as stage

    root, calls = tmp_path / "store", []
    real_sample, real_train = stage.sample_round, stage.train_round

    def sample(*a, **kw):
        calls.append(("sample", a[5]))
        return real_sample(*a, **kw)

    def train_then_die(*a, **kw):
        if len([c for c in calls if c[0] == "train"]) == 1:
            raise KeyboardInterrupt("killed in round 2")
        calls.append(("train", None))
        return real_train(*a, **kw)

    monkeypatch.setattr(stage, "sample_round", sample)
    monkeypatch.setattr(stage, "train_round", train_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_stage("online_dpo", TINY, [f"inputs.sft={sft_path}", *SPREAD], root=root, run="tiny")
    partial = root / "tiny" / "online_dpo.partial"
    round1 = partial / "rounds" / "1" / "round.json"
    assert round1.is_file() and (partial / "rounds" / "2" / "samples.jsonl").is_file()
    kept = {p: p.stat().st_mtime_ns for p in (round1, partial / "rounds" / "1" / "model" / "adapter_model.safetensors",
                                                partial / "rounds" / "2" / "samples.jsonl")}

    monkeypatch.setattr(stage, "train_round", real_train)
    calls.clear()
    final = run_stage("online_dpo", TINY, [f"inputs.sft={sft_path}", *SPREAD], root=root, run="tiny")
    assert calls == []  # round 1 kept whole, round 2's samples reused: nothing sampled again
    for p, mtime in kept.items():
        moved = final / p.relative_to(partial)
        assert moved.stat().st_mtime_ns == mtime
    assert (final / "rounds" / "2" / "round.json").is_file()


def test_bad_config_is_one_line_naming_the_key(tmp_path, capsys):
    code = main(["run", "online_dpo", "-c", TINY, "--artifacts", str(tmp_path), "peft.method=full",
                 "generation.num_return_sequences=1"])
    err = capsys.readouterr().err
    assert code == 2 and "peft.method" in err and "generation.num_return_sequences" in err and "Traceback" not in err


def test_the_round_sampler_is_the_previous_adapter_merged_into_a_plain_model(tiny_store, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    from stages.online_dpo import policy_with_adapter

    root, run = tiny_store
    sft = ArtifactStore(root).read_stage(run, "sft")
    peft = get_peft_model(load_policy(sft, "fp32"), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    torch.manual_seed(0)
    with torch.no_grad():  # a trained-looking adapter (B != 0), as a finished round leaves it
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.1)
    peft.save_pretrained(tmp_path / "round1")
    sampler = policy_with_adapter(sft, "fp32", tmp_path / "round1", merged=True)
    assert not isinstance(sampler, PeftModel) and not any("lora_" in n for n, _ in sampler.named_parameters())
    ids = torch.tensor([[5, 9, 17, 3, 8]])
    want, got = logits_of(peft.eval(), ids), logits_of(sampler, ids)
    plain = logits_of(policy_with_adapter(sft, "fp32", None, merged=True), ids)  # round 1: the SFT model
    assert torch.allclose(got, want, atol=1e-4) and not torch.allclose(plain, want, atol=1e-2)
    assert isinstance(policy_with_adapter(sft, "fp32", tmp_path / "round1"), PeftModel)  # the KL's: switchable
