"""Eval stage: metric functions on hand-worked inputs, and the stage end to end on the tiny model."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from alignment import evaluation as ev
from alignment.cli import main
from alignment.judges import Judge, combine, register_judge


class LongerIsBetter(Judge):
    """Rule-based test judge: the longer response wins (P = 0.9), equal lengths tie (0.5)."""

    name = "rule:longer"

    def first_better(self, prompts, first, second):
        return [0.9 if len(a) > len(b) else 0.1 if len(a) < len(b) else 0.5 for a, b in zip(first, second)]


register_judge("longer_test", lambda spec, inputs, precision: LongerIsBetter(spec))


# -- metrics on fixed inputs ---------------------------------------------------------------------


def test_win_rate_counts_ties_as_half():
    p = [0.9, 0.1, 0.5, 0.7]
    assert ev.win_counts(p) == (2, 1, 1)
    assert ev.win_rate(p) == pytest.approx((2 + 0.5) / 4)
    # A tie band of 0.25 turns 0.7 into a tie: 1 win, 2 ties, 1 loss.
    assert ev.win_counts(p, tie_band=0.25) == (1, 2, 1)
    assert ev.win_rate(p, tie_band=0.25) == pytest.approx(0.5)
    s = ev.win_summary(p, disagree=[False, True, False, False], parsed=[True, True, False, True])
    assert (s["wins"], s["ties"], s["losses"], s["n"]) == (2, 1, 1, 4)
    assert s["soft_win_rate"] == pytest.approx(2.2 / 4)
    assert s["position_disagreement"] == pytest.approx(0.25)
    assert s["unparsed"] == 1
    assert s["win_rate_ci"][0] <= s["win_rate"] <= s["win_rate_ci"][1]


def test_both_orders_average_matches_the_judge_protocol():
    # Policy shown first: P(first better) 0.8; shown second: P(first better) 0.4 -> P(policy better) 0.6.
    assert ev.p_policy_both_orders(0.8, 0.4) == pytest.approx(0.7)
    assert combine(0.8, 0.4, both_orders=True).p_a == pytest.approx(0.7)
    # Pure position bias (always prefers the first shown) cancels out to a tie.
    assert ev.p_policy_both_orders(0.9, 0.9) == pytest.approx(0.5)


def test_kl_aggregation_and_exact_token_kl():
    import torch

    from alignment.dpo import token_kl

    s = ev.kl_summary([0.2, 0.4], n_tokens=6)
    assert s["kl_seq"] == pytest.approx(0.3) and s["kl_per_token"] == pytest.approx(0.1)
    # p = (1/2, 1/2), q = (3/4, 1/4): KL = 1/2 ln(2/3) + 1/2 ln 2 = 0.143841...
    kl = token_kl(torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]]), torch.tensor([1]))
    assert float(kl[0]) == pytest.approx(0.5 * math.log(2 / 3) + 0.5 * math.log(2), abs=1e-6)
    assert float(token_kl(torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 2.0]]), torch.tensor([1]))[0]) == 0.0


def test_length_quantiles_bootstrap_and_gold():
    assert ev.quantile([1, 2, 3, 4], 0.5) == pytest.approx(2.5)
    assert ev.quantile([1, 2, 3, 4], 0.9) == pytest.approx(3.7)
    assert ev.length_stats([4, 1, 3, 2]) == {"mean": 2.5, "median": 2.5, "p90": pytest.approx(3.7), "max": 4, "min": 1}
    assert ev.bootstrap_ci([2.0] * 10) == (2.0, 2.0)
    lo, hi = ev.bootstrap_ci([0.0, 1.0] * 20, seed=1)
    assert lo < 0.5 < hi and ev.bootstrap_ci([0.0, 1.0] * 20, seed=1) == (lo, hi)
    rows = [{"constraints": [{"type": "max_words", "n": 3}]}, {"constraints": [{"type": "lowercase"}]}, {}]
    assert ev.constraint_gold(rows, ["one two three", "Not lower", "anything"]) == [1.0, 0.0, None]


def test_mt_bench_question_file_becomes_first_turn_prompts(tmp_path):
    from stages.eval import load_eval_prompts

    q = tmp_path / "question.jsonl"
    q.write_text(json.dumps({"question_id": 81, "category": "writing", "turns": ["Write a haiku.", "Now a limerick."]})
                 + "\n" + json.dumps({"question_id": 82, "category": "math", "turns": ["What is 2+2?", "And 3+3?"],
                                      "reference": ["4", "6"]}) + "\n")
    rows = load_eval_prompts(str(q), None, "test")
    assert [r["prompt"] for r in rows] == [[{"role": "user", "content": "Write a haiku."}],
                                           [{"role": "user", "content": "What is 2+2?"}]]
    assert rows[1]["id"] == 82 and rows[1]["category"] == "math" and rows[1]["reference"] == "4"
    assert len(load_eval_prompts("data/eval/mt_bench_question.jsonl", 5, "test")) == 5


def test_upstream_follows_policies_reward_and_judge():
    from stages.eval import Config, upstream

    cfg = Config(stage="eval", policies=["dpo", "ppo"], judge={"kind": "local", "model": "base"})
    assert upstream(cfg) == ("sft", "dpo", "ppo", "reward", "base")
    cfg = Config(stage="eval", policies=["sft"], baseline="base", reward=False, judge=None)
    assert upstream(cfg) == ("base", "sft")


def test_policy_equal_to_baseline_is_a_config_error(capsys):
    code = main(["run", "eval", "-c", "configs/tiny/eval.yaml", "policies=[sft]", "--artifacts", "/nonexistent"])
    assert code == 2
    assert "configs/tiny/eval.yaml (command line): policies.0: 'sft' is also the baseline" in capsys.readouterr().err


# -- the stage end to end --------------------------------------------------------------------------


@pytest.mark.slow
def test_eval_stage_end_to_end(tiny_store, tmp_path):
    src, run = tiny_store
    root = tmp_path / "store"
    shutil.copytree(src, root)
    args = ["--artifacts", str(root), "--run", run, "tracking=none"]
    assert main(["run", "reward", "-c", "configs/tiny/reward.yaml", "train.max_steps=4", *args]) == 0
    assert main(["run", "dpo", "-c", "configs/tiny/dpo.yaml", "train.max_steps=4", "eval.kl_prompts=0", *args]) == 0
    assert main(["run", "eval", "-c", "configs/tiny/eval.yaml", "judge.kind=longer_test", "max_prompts=12", *args]) == 0

    out = root / run / "eval"
    metrics = json.loads((out / "metrics.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["metrics"] == metrics and manifest["status"] == "complete"
    assert set(manifest["inputs"]) == {"sft", "dpo", "reward"}
    assert metrics["prompts"] == 12 and metrics["policy"] == "dpo" and metrics["judge"] == "rule:longer"
    dpo, sft = metrics["models"]["dpo"], metrics["models"]["sft"]
    for m in (dpo, sft):
        assert m["reward"]["n"] == 12 and math.isfinite(m["reward"]["mean"])
        assert 0.0 <= m["gold"]["pass_rate"] <= 1.0 and m["length_tokens"]["max"] <= 16
    assert dpo["kl"]["kl_prompts"] == 8 and dpo["kl"]["kl_seq"] >= 0.0
    assert dpo["gold_gain"]["mean"] == pytest.approx(dpo["gold"]["pass_rate"] - sft["gold"]["pass_rate"])
    assert metrics["kl"] == dpo["kl"]["kl_seq"] and metrics["win_rate"] == dpo["judge"]["win_rate"]

    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 24 and {s["policy"] for s in samples} == {"sft", "dpo"}
    # The rule judge's verdicts, recomputed from the responses, give the reported win rate.
    by = {(s["id"], s["policy"]): s for s in samples}
    ids = sorted({s["id"] for s in samples})
    expected = [0.9 if len(by[i, "dpo"]["response"]) > len(by[i, "sft"]["response"]) else
                0.1 if len(by[i, "dpo"]["response"]) < len(by[i, "sft"]["response"]) else 0.5 for i in ids]
    assert dpo["judge"]["win_rate"] == pytest.approx(ev.win_rate(expected))
    assert dpo["reward"]["mean"] == pytest.approx(sum(by[i, "dpo"]["reward"] for i in ids) / 12)

    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4 and "<script" not in html
    from PIL import Image

    for name in ("win_rate", "reward_distribution", "training_curves", "length_distribution"):
        png = out / "plots" / f"{name}.png"
        with Image.open(png) as im:
            im.verify()
            assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
