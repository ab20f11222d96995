"""Reward sources (interface 2): function, gold, judge and reward-model scorers with worked numbers."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from alignment.errors import ConfigError
from alignment.judges import Judge, JudgeSpec, register_judge
from alignment.reward_sources import (ModelReward, RewardSource, gold_reward, gold_reward_all, gold_reward_graded,
                                      template_suffix_ids, text_reward_fn, with_fields)

P = [{"role": "user", "content": "Describe rivers."}]


def test_gold_reward_with_constraints_and_by_lookup():
    cons = [[{"type": "max_words", "n": 3}, {"type": "lowercase"}], [{"type": "keyword", "word": "paper"}]]
    # "a b c d": 4 words > 3 fails, lowercase passes -> 0.5; "Paper!" contains 'paper' -> 1.0
    assert gold_reward([P, P], ["a b c d", "Paper!"], constraints=cons) == [0.5, 1.0]
    # Without constraints= the bundled data is searched by the prompt text (data/instruct/train.jsonl row 1).
    # Its constraints: a <<title>>, and the letter 'y' fewer than 2 times.
    with Path("data/instruct/train.jsonl").open(encoding="utf-8") as f:
        row = json.loads(f.readline())
    assert row["constraints"] == [{"type": "title"}, {"type": "letter_frequency", "letter": "y", "n": 2,
                                                      "relation": "less than"}]
    prompt = row["messages"][:1]
    assert gold_reward([prompt, prompt, prompt], ["<<Trains>> Fast.", "Every day, yes.", "Rails."]) == [1.0, 0.0, 0.5]
    with pytest.raises(ValueError, match="no constraints known"):
        gold_reward([P], ["x"])


def test_gold_reward_graded_scores_counts_partially():
    cons = [[{"type": "max_words", "n": 3}, {"type": "lowercase"}], [{"type": "min_words", "n": 4}]]
    # "a b c d e f": 6 words for at most 3 -> 3 / 6, lowercase passes -> (0.5 + 1) / 2; "Paper!": 1 word of 4
    assert gold_reward_graded([P, P], ["a b c d e f", "Paper!"], constraints=cons) == [0.75, 0.25]
    assert gold_reward([P, P], ["a b c d e f", "Paper!"], constraints=cons) == [0.5, 0.0]
    with pytest.raises(ValueError, match="gold_reward_graded: no constraints known"):
        gold_reward_graded([P], ["x"])


def test_gold_reward_all_pays_a_bonus_only_when_every_constraint_is_met():
    two = [{"type": "max_words", "n": 3}, {"type": "lowercase"}]
    cons = [two, two, two, [{"type": "min_words", "n": 2}], [{"type": "min_words", "n": 2}]]
    # both met -> 0.5 * 1 + 0.5; one of two -> 0.5 * 0.5 + 0; none -> 0; one constraint: 1 or 0 as gold_reward
    got = gold_reward_all([P] * 5, ["a b c", "a b c d e", "A B C D E", "two words", "one"], constraints=cons)
    assert got == [1.0, 0.25, 0.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="gold_reward_all: no constraints known"):
        gold_reward_all([P], ["x"])


def fn_with_constraints(prompts, completions, constraints):
    return [len(c) + len(k) for c, k in zip(completions, constraints)]


def fn_plain(prompts, completions):
    return [1.0] * len(completions)


def test_function_kind_passes_only_declared_fields():
    spec = RewardSource(kind="function", function="test_reward_sources:fn_with_constraints")
    score = text_reward_fn(spec, {}, "fp32")
    assert score([P, P], ["ab", "abc"], constraints=[[1], [1, 2]], reference=["r", "r"]) == [3.0, 5.0]
    plain = with_fields(fn_plain)
    assert plain([P], ["x"], constraints=[[1]], reference=["r"]) == [1.0]  # extra fields not passed
    bad = with_fields(lambda prompts, completions: [1.0])
    with pytest.raises(ValueError, match="returned 1 scores for 2 completions"):
        bad([P, P], ["a", "b"])
    with pytest.raises(ConfigError, match="cannot import module 'no_such_module'"):
        text_reward_fn(RewardSource(kind="function", function="no_such_module:f"), {}, "fp32")
    with pytest.raises(ConfigError, match="has no function 'nope'"):
        text_reward_fn(RewardSource(kind="function", function="alignment.gold:nope"), {}, "fp32")


class ShorterIsBetter(Judge):
    """Rule-based judge: the first-shown response wins with 0.9 when it is shorter, 0.1 when longer, else 0.5;
    plus a position bias of +0.05 for whichever is shown first (so both-order averaging is visible)."""

    name = "shorter"

    def first_better(self, prompts, first, second):
        return [(0.9 if len(f) < len(s) else 0.1 if len(f) > len(s) else 0.5) + 0.05 for f, s in zip(first, second)]


def test_judge_kind_compares_with_the_reference():
    register_judge("shorter-test", lambda spec, inputs, precision: ShorterIsBetter(spec))
    spec = RewardSource(kind="judge", judge=JudgeSpec(kind="shorter-test"))
    assert spec.problems() == []
    score = text_reward_fn(spec, {}, "fp32")
    # completion shorter than the reference: order (c, ref) -> 0.95; order (ref, c) -> first is longer: 0.15, so
    # P(c better) = 1 - 0.15 = 0.85; mean 0.9; reward 0.9 - 0.5 = 0.4. Longer: mean(0.15, 1 - 0.95) = 0.1 -> -0.4
    assert score([P, P], ["ok", "a much longer answer"], reference=["medium one", "short"]) == pytest.approx([0.4, -0.4])
    with pytest.raises(ValueError, match="reference answer"):
        score([P], ["x"])
    assert RewardSource(kind="judge").problems() == [("reward.judge", "kind 'judge' needs a judge section "
                                                                      "(alignment.judges.JudgeSpec)")]


def test_model_kind_normalises_with_the_manifest_statistics(tiny_store, tmp_path):
    from alignment.artifacts import ArtifactStore
    from alignment.models import load_tokenizer
    from alignment.policy import load_policy
    from alignment.reward import reward_model_from_policy, score_conversations

    root, run = tiny_store
    sft = ArtifactStore(root).read_stage(run, "sft")
    tok = load_tokenizer(sft.model_dir)
    torch.manual_seed(0)
    rm = reward_model_from_policy(load_policy(sft, "fp32"), tok.pad_token_id)
    rm.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    art = SimpleNamespace(path=tmp_path, model_dir=tmp_path / "model",
                          manifest=SimpleNamespace(metrics={"reward_mean": 0.5, "reward_std": 2.0}))
    convs = [P + [{"role": "assistant", "content": t}] for t in ("flows to the sea", "ice")]
    raw, _ = score_conversations(rm, tok, convs)
    scorer = ModelReward.from_artifact(art, "fp32", normalize=True)
    assert scorer([P, P], ["flows to the sea", "ice"]) == pytest.approx([(r - 0.5) / 2.0 for r in raw], abs=1e-5)
    assert ModelReward.from_artifact(art, "fp32", normalize=False)([P], ["ice"]) == pytest.approx(raw[1:], abs=1e-5)
    art.manifest.metrics = {}
    with pytest.raises(ConfigError, match="no reward_mean/reward_std"):
        ModelReward.from_artifact(art, "fp32", normalize=True)
    assert template_suffix_ids(tok) == tok("\n", add_special_tokens=False)["input_ids"]
    with pytest.raises(ConfigError, match="needs the run's reward artifact"):
        text_reward_fn(RewardSource(kind="model"), {}, "fp32")


@pytest.mark.parametrize("spec, problem", [
    (dict(kind="function"), "reward.function"),
    (dict(kind="function", function="not a path"), "reward.function"),
    (dict(kind="model", function="a:b"), "reward.function"),
    (dict(kind="model", judge={"kind": "local"}), "reward.judge"),
])
def test_problems(spec, problem):
    assert [k for k, _ in RewardSource(**spec).problems()] == [problem]
