"""Judges: both-order averaging, soft labels and clamping with hand-worked numbers; the local LM judge."""

from __future__ import annotations

import math

import pytest

from alignment.config import ConfigError
from alignment.judge_openai import label_probability
from alignment.judges import (Judge, JudgeSpec, Template, build_judge, combine, parse_choice, register_judge,
                              two_way)

PROMPT = [{"role": "user", "content": "Name a colour."}]


class ScriptedJudge(Judge):
    """Rule-based (tests only): P(first-shown better) = 0.7 when the first is shorter, else 0.2."""

    def __init__(self, spec, inputs, precision):
        super().__init__(spec)
        self.name = "scripted"
        self.calls = 0

    def first_better(self, prompts, first, second):
        self.calls += len(prompts)
        return [0.7 if len(f) < len(s) else 0.2 for f, s in zip(first, second)]


class FirstAlwaysJudge(Judge):
    """Pure position bias: always 0.9 for whichever response is shown first."""

    name = "first-always"

    def first_better(self, prompts, first, second):
        return [0.9] * len(prompts)


register_judge("test-scripted", ScriptedJudge)
register_judge("test-first-always", lambda spec, inputs, precision: FirstAlwaysJudge(spec))


def test_combine_averages_the_two_orders():
    # a first: P(a) = 0.8; b first: P(b first better) = 0.4 -> P(a) = 0.6; mean 0.7; both pick a.
    v = combine(0.8, 0.4, both_orders=True)
    assert v.p_a == pytest.approx(0.7) and v.p_ab == 0.8 and v.p_ba == 0.4
    assert v.parsed and not v.disagree and v.unparsed_calls == 0


def test_combine_flags_position_bias():
    # The first-shown wins in both orders: a by 0.8, then b by 0.7 -> P(a) = (0.8 + 0.3) / 2 = 0.55.
    v = combine(0.8, 0.7, both_orders=True)
    assert v.p_a == pytest.approx(0.55) and v.disagree


def test_combine_unparseable_orders():
    one = combine(None, 0.3, both_orders=True)  # only the second order answered: P(a) = 1 - 0.3
    assert one.p_a == pytest.approx(0.7) and one.parsed and one.unparsed_calls == 1 and not one.disagree
    none = combine(None, None, both_orders=True)
    assert none.p_a == 0.5 and not none.parsed and none.unparsed_calls == 2
    single = combine(0.65, None, both_orders=False)
    assert single.p_a == 0.65 and single.p_ba is None and single.unparsed_calls == 0


def test_clamp_limits_the_final_label():
    # CAI clamps chain-of-thought labels to [0.4, 0.6]: 0.9 -> 0.6, 0.1 -> 0.4, 0.55 unchanged.
    assert combine(0.9, 0.1, both_orders=True, clamp=(0.4, 0.6)).p_a == pytest.approx(0.6)
    assert combine(0.1, 0.9, both_orders=True, clamp=(0.4, 0.6)).p_a == pytest.approx(0.4)
    assert combine(0.6, 0.5, both_orders=True, clamp=(0.4, 0.6)).p_a == pytest.approx(0.55)


def test_two_way_soft_label():
    # P(A) = 0.6, P(B) = 0.2 of the full vocabulary -> renormalised over the two labels: 0.6 / 0.8.
    assert two_way(math.log(0.6), math.log(0.2)) == pytest.approx(0.75)
    assert two_way(-1000.0, -1001.0) == pytest.approx(1 / (1 + math.exp(-1)))  # stable far from 0


def test_label_probability_from_top_logprobs():
    reply = {"choices": [{"message": {"content": "A"}, "logprobs": {"content": [{
        "token": "A", "logprob": math.log(0.5),
        "top_logprobs": [{"token": "A", "logprob": math.log(0.5)}, {"token": "B", "logprob": math.log(0.25)},
                         {"token": " A", "logprob": math.log(0.1)}]}]}}]}
    # "A" and " A" both mean A: 0.6 against 0.25.
    assert label_probability(reply, ("A", "B")) == pytest.approx(0.6 / 0.85)
    missing = {"choices": [{"logprobs": {"content": [{"token": "A", "logprob": math.log(0.9), "top_logprobs": [
        {"token": "A", "logprob": math.log(0.9)}, {"token": "The", "logprob": math.log(0.05)}]}]}}]}
    # B is not listed: it gets the lowest listed log-probability (an upper bound), 0.05.
    assert label_probability(missing, ("A", "B")) == pytest.approx(0.9 / 0.95)
    assert label_probability({"choices": [{"message": {"content": "x"}}]}, ("A", "B")) is None


@pytest.mark.parametrize("text, expected", [
    ("B", 1), ("A.", 0), ("Response A is better.", 0), ("Preferred response: B", 1), ("**B**", 1),
    ("I cannot decide.", None), ("", None), ("Both A and B are fine", None), ("2", 1)])
def test_parse_choice(text, expected):
    labels = ("1", "2") if text == "2" else ("A", "B")
    assert parse_choice(text, labels) == expected


def test_compare_runs_both_orders_through_a_registered_judge():
    judge = build_judge(JudgeSpec(kind="test-scripted"))
    v = judge.compare([PROMPT, PROMPT], ["red", "a long answer"], ["a long answer", "red"])
    # Pair 1, a shorter: a first 0.7; b first (b longer) 0.2 -> P(a) = (0.7 + 0.8) / 2 = 0.75.
    assert v[0].p_a == pytest.approx(0.75) and v[0].p_ab == 0.7 and v[0].p_ba == 0.2 and not v[0].disagree
    assert v[1].p_a == pytest.approx(0.25)
    assert judge.calls == 4  # two pairs x two orders
    one = build_judge(JudgeSpec(kind="test-scripted", both_orders=False))
    assert one.compare([PROMPT], ["red"], ["a long answer"])[0].p_a == pytest.approx(0.7) and one.calls == 1


def test_position_biased_judge_averages_to_a_tie():
    v = build_judge(JudgeSpec(kind="test-first-always")).compare([PROMPT], ["x"], ["y"])[0]
    assert v.p_a == pytest.approx(0.5) and v.disagree


def test_spec_problems():
    assert dict(JudgeSpec(kind="nope").problems())["judge.kind"].startswith("expected one of")
    assert "judge.base_url" in dict(JudgeSpec(kind="openai").problems())
    assert "judge.clamp" in dict(JudgeSpec(clamp=(0.6, 0.7)).problems())
    assert "judge.constitution" in dict(JudgeSpec(constitution="missing.md").problems())
    with pytest.raises(ConfigError):
        build_judge(JudgeSpec(kind="nope"))


def test_template_names_the_labels_and_changes_its_digest(tmp_path):
    spec = JudgeSpec(constitution="configs/constitutions/default.md")
    msgs = Template(spec).messages(PROMPT, "red", "blue")
    text = msgs[0]["content"]
    assert "Response A:\nred" in text and "Response B:\nblue" in text and text.endswith("A or B.")
    other = tmp_path / "c.md"
    other.write_text("Prefer short answers.")
    assert Template(JudgeSpec(constitution=str(other))).digest() != Template(spec).digest()
    cot = Template(JudgeSpec(chain_of_thought=True)).verdict_messages(PROMPT, "red", "blue", "A is plainer.")
    assert [m["role"] for m in cot] == ["user", "assistant", "user"] and cot[-1]["content"].endswith("A or B.")


def test_local_judge_reads_the_label_token_probabilities(tiny_store):
    """The local judge's P(first better) is softmax over the two label tokens at the answer slot."""
    import torch

    from alignment.artifacts import ArtifactStore

    root, run = tiny_store
    sft = ArtifactStore(root).read_stage(run, "sft")
    judge = build_judge(JudgeSpec(kind="local", model="sft"), {"sft": sft}, "fp32")
    assert judge.name.startswith("local:sft@")
    p = judge.first_better([PROMPT, PROMPT], ["red", "a long answer"], ["a long answer", "red"])
    # Recompute the first by hand: chat text -> logits at the last position -> the two label tokens.
    text = judge.tok.apply_chat_template(judge.template.messages(PROMPT, "red", "a long answer"),
                                         add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([judge.tok.encode(text, add_special_tokens=False)])
    with torch.no_grad():
        logp = torch.log_softmax(judge.model(input_ids=ids).logits[0, -1].float(), -1)
    la, lb = (torch.logsumexp(logp[i], 0).item() for i in judge.label_ids)
    assert p[0] == pytest.approx(math.exp(la) / (math.exp(la) + math.exp(lb)), abs=1e-5)
    v = judge.compare([PROMPT], ["red"], ["a long answer"])[0]
    assert v.p_ab == pytest.approx(p[0], abs=1e-5) and v.p_ba == pytest.approx(p[1], abs=1e-5)
    assert v.p_a == pytest.approx((p[0] + 1 - p[1]) / 2, abs=1e-5)


def test_local_chain_of_thought_generates_a_rationale_first(tiny_store):
    from alignment.artifacts import ArtifactStore

    root, run = tiny_store
    sft = ArtifactStore(root).read_stage(run, "sft")
    spec = JudgeSpec(kind="local", model="sft", chain_of_thought=True, cot_max_tokens=4, clamp=(0.4, 0.6))
    judge = build_judge(spec, {"sft": sft}, "fp32")
    plain = build_judge(JudgeSpec(kind="local", model="sft"), {"sft": sft}, "fp32")
    assert judge.name != plain.name  # a different prompt: a different cache identity
    v = judge.compare([PROMPT, PROMPT], ["red", "blue"], ["blue", "red"])
    assert all(v_.parsed and 0.4 <= v_.p_a <= 0.6 for v_ in v)


def test_few_shot_examples_alternate_the_chosen_position():
    t = Template(JudgeSpec(few_shot="data/prefs/train.jsonl", few_shot_n=2))
    text = t.messages(PROMPT, "red", "blue")[0]["content"]
    assert text.count("Better response: ") == 2 and "Better response: A" in text and "Better response: B" in text
    assert text.index("Examples:") < text.index("Conversation:\nUser: Name a colour.")
    assert t.digest() != Template(JudgeSpec()).digest()


# -- per-constraint checklists and ensembles ---------------------------------------------------------


def test_checklist_items_are_the_requests_instructions_not_its_question():
    from alignment.judges import checklist_items

    ask = [{"role": "user", "content": "What should I know about rivers? Use no fewer than 35 words. "
                                       "Mention 'delta' at least once."}]
    assert checklist_items(ask) == ["Use no fewer than 35 words.", "Mention 'delta' at least once."]
    task_first = [{"role": "user", "content": "Write a short note about chess. Do not use any capital letters."}]
    assert checklist_items(task_first) == ["Do not use any capital letters."]
    assert checklist_items(PROMPT) == ["The response answers the user's request helpfully and accurately."]


def test_checklist_judge_is_order_free_and_asks_each_item_alone(tiny_store):
    """Each response is scored alone (mean P(yes) over the items), so swapping the pair mirrors the verdict."""
    from alignment.artifacts import ArtifactStore

    root, run = tiny_store
    sft = ArtifactStore(root).read_stage(run, "sft")
    spec = JudgeSpec(kind="local", model="sft", checklist=True, checklist_temperature=0.05)
    judge = build_judge(spec, {"sft": sft}, "fp32")
    assert judge.name != build_judge(JudgeSpec(kind="local", model="sft"), {"sft": sft}, "fp32").name
    ask = [{"role": "user", "content": "Describe owls. Use the word 'eyes'. Do not use any capital letters."}]
    a, b = "owls have big eyes.", "Owls Hunt At Night."
    p = judge.first_better([ask, ask], [a, b], [b, a])
    assert p[0] == pytest.approx(1.0 - p[1], abs=1e-6)
    # By hand: P(yes) per (response, item), renormalised against "No", averaged, then the tempered sigmoid.
    items = ["Use the word 'eyes'.", "Do not use any capital letters."]
    texts = [judge._chat(judge.template.check_messages(ask, r, it)) for r in (a, b) for it in items]
    yes = judge._two_way(texts, judge.check_ids)
    s_a, s_b = sum(yes[:2]) / 2, sum(yes[2:]) / 2
    assert p[0] == pytest.approx(1 / (1 + math.exp(-(s_a - s_b) / 0.05)), abs=1e-6)
    v = judge.compare([ask], [a], [b])[0]
    assert not v.disagree and v.p_a == pytest.approx(p[0], abs=1e-6)


class FixedJudge(Judge):
    """P(first better) read from the spec's model name, None for 'none' (an unusable answer)."""

    def __init__(self, spec, inputs, precision):
        super().__init__(spec)
        self.name = f"fixed:{spec.model}"

    def first_better(self, prompts, first, second):
        return [None if self.spec.model == "none" else float(self.spec.model)] * len(prompts)


register_judge("test-fixed", FixedJudge)


def test_ensemble_is_the_weighted_mean_of_its_members():
    member = lambda p: {"kind": "test-fixed", "model": p}  # noqa: E731
    spec = JudgeSpec(kind="ensemble", members=[member("0.9"), member("0.3"), member("none")], weights=[1, 3, 5],
                     both_orders=False)
    judge = build_judge(spec, {}, "fp32")
    # (1 * 0.9 + 3 * 0.3) / (1 + 3) = 0.45; the member without an answer is left out, not counted as 0.5.
    assert judge.first_better([PROMPT], ["a"], ["b"]) == [pytest.approx(0.45)]
    assert judge.compare([PROMPT], ["a"], ["b"])[0].p_a == pytest.approx(0.45)
    assert build_judge(spec.model_copy(update={"weights": [1, 1, 1]}), {}, "fp32").name != judge.name
    silent = JudgeSpec(kind="ensemble", members=[member("none")])
    assert build_judge(silent, {}, "fp32").first_better([PROMPT], ["a"], ["b"]) == [None]


def test_ensemble_and_checklist_problems():
    assert ("judge.members", "kind 'ensemble' needs at least one member judge") in JudgeSpec(kind="ensemble").problems()
    bad = JudgeSpec(kind="ensemble", members=[{"kind": "nope"}], weights=[1, 2])
    keys = [k for k, _ in bad.problems()]
    assert "judge.members.0.kind" in keys and "judge.weights" in keys
    assert [k for k, _ in JudgeSpec(kind="reward_model", checklist=True).problems()] == ["judge.checklist"]
    from alignment.judge_local import judge_upstream

    both = JudgeSpec(kind="ensemble", members=[{"kind": "reward_model"}, {"kind": "local", "model": "base"}])
    assert judge_upstream(both) == ("reward", "base")


def test_reward_model_judge_verdicts_from_known_scores_load_nothing(tmp_path):
    """sigmoid(2 - 0) = 0.8808, sigmoid(0 - 0) = 0.5; the clamp [0.4, 0.6] caps the first. The artifact's model
    folder does not exist: the model would load only at a scoring."""
    from types import SimpleNamespace

    art = SimpleNamespace(manifest_sha256="ab" * 32, model_dir=tmp_path / "missing", path=tmp_path)
    judge = build_judge(JudgeSpec(kind="reward_model"), {"reward": art}, "fp32")
    assert judge.name.startswith("reward_model:abababababab:")
    plain = judge.from_scores([2.0, 0.0], [0.0, 0.0])
    assert [v.p_a for v in plain] == [pytest.approx(1 / (1 + math.exp(-2))), 0.5]
    assert plain[0].p_ba == pytest.approx(1 - 1 / (1 + math.exp(-2))) and not plain[0].disagree
    clamped = build_judge(JudgeSpec(kind="reward_model", clamp=[0.4, 0.6]), {"reward": art}, "fp32")
    assert [v.p_a for v in clamped.from_scores([2.0, 0.0], [0.0, 0.0])] == [0.6, 0.5]
    with pytest.raises(ValueError):
        judge.from_scores([1.0], [1.0, 2.0])
