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


def test_cluster_bootstrap_resamples_wordings_not_only_prompts():
    # Two wordings of 10 prompts each: every prompt of wording a passes, none of wording b. Prompts resampled
    # alone keep ~10 of each (mean within ~0.3-0.7); wordings resampled give {a, a} = 1, {a, b} = 0.5, {b, b} = 0
    # with probabilities 1/4, 1/2, 1/4, so the 95% interval is [0, 1]: another pair of wordings could give either.
    values, clusters = [1.0] * 10 + [0.0] * 10, ["a"] * 10 + ["b"] * 10
    assert ev.cluster_bootstrap_ci(values, clusters, n_boot=2000, seed=3) == (0.0, 1.0)
    lo, hi = ev.bootstrap_ci(values, n_boot=2000, seed=3)
    assert 0.2 < lo < 0.5 < hi < 0.8
    # Inside a cluster the prompts are resampled too: one wording, mixed outcomes, an interval around 0.5.
    lo, hi = ev.cluster_bootstrap_ci([1.0, 0.0] * 10, ["a"] * 20, n_boot=2000, seed=3)
    assert 0.2 < lo < 0.5 < hi < 0.8
    # One prompt per wording: the prompt bootstrap, draw for draw.
    xs = [0.1 * i for i in range(15)]
    assert ev.cluster_bootstrap_ci(xs, list(range(15)), seed=7) == ev.bootstrap_ci(xs, seed=7)
    with pytest.raises(ValueError, match="one cluster label per value"):
        ev.cluster_bootstrap_ci([1.0, 0.0], ["a"])
    d = ev.distribution(values, clusters)
    assert d["mean"] == 0.5 and d["mean_ci_wordings"] == [0.0, 1.0] and "mean_ci_wordings" not in ev.distribution(values)


def test_gold_per_split_and_kind_perplexity_and_forgetting():
    # Scored: (1, a), (0, a), (1, b), (0, no kind); the None score (no constraints) is left out.
    s = ev.gold_summary([1.0, 0.0, 1.0, None, 0.0], ["a", "a", "b", "b", None])
    assert (s["pass_rate"], s["n"]) == (0.5, 4) and set(s["by_kind"]) == {"a", "b"}
    # Kind a resamples [1, 0]: all-0 and all-1 draws each have probability 1/4 > 2.5%, so the CI is [0, 1].
    assert s["by_kind"]["a"] == {"pass_rate": 0.5, "pass_rate_ci": [0.0, 1.0], "n": 2}
    assert s["by_kind"]["b"] == {"pass_rate": 1.0, "pass_rate_ci": [1.0, 1.0], "n": 1}
    assert ev.gold_summary([None, None], ["a", "b"]) is None
    with pytest.raises(ValueError, match="3 scores but 2 kinds"):
        ev.gold_summary([1.0, 0.0, 1.0], ["a", "b"])
    # Three tokens at probability 1/4 each: perplexity 4.
    assert ev.perplexity(3 * math.log(4.0), 3) == pytest.approx(4.0)
    f = ev.forgetting_summary({"base": 10.0, "sft": 12.0, "dpo": 15.0}, {"base": 0.4, "sft": 0.5, "dpo": 0.3}, "base")
    assert f["ppl_ratio"] == pytest.approx({"base": 1.0, "sft": 1.2, "dpo": 1.5})
    assert f["heldout_kinds_gold_change"] == pytest.approx({"base": 0.0, "sft": 0.1, "dpo": -0.1})
    assert "ppl_ratio" not in ev.forgetting_summary({"sft": 12.0}, {}, "base")


def test_text_perplexity_of_a_uniform_model_is_its_vocabulary_size(tiny_store):
    """Zero output weights give uniform next-token probabilities 1/V whatever the text, so the perplexity is V
    exactly, padded batches included (padding must not be scored)."""
    import torch

    from alignment.models import load_causal_lm, load_tokenizer
    from stages.eval import ForgettingSpec, load_general_texts, text_perplexity

    root, run = tiny_store
    model_dir = root / run / "base" / "model"
    model, tok = load_causal_lm(model_dir, "fp32"), load_tokenizer(model_dir)
    with torch.no_grad():
        model.get_output_embeddings().weight.zero_()
    spec = ForgettingSpec(max_texts=5, batch_size=2)
    texts = load_general_texts(spec)
    assert len(texts) == 5 and texts[0].startswith("The morning train")
    out = text_perplexity(model, tok, texts, spec)
    vocab = model.get_output_embeddings().weight.shape[0]
    assert out["ppl"] == pytest.approx(vocab, rel=1e-4)
    n = sum(len(tok(t)["input_ids"]) - 1 for t in texts)  # every token after the first is predicted once
    assert out["tokens"] == n


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


def test_bad_generation_prefill_is_one_line_exit_2(capsys):
    code = main(["run", "eval", "-c", "configs/tiny/eval.yaml", "generation.prefill=chunked"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("align: error: configs/tiny/eval.yaml (command line): generation.prefill:"), err
    assert "packed" in err[0] and "padded" in err[0], err


def test_bad_prompt_sets_and_forgetting_text_are_named(capsys, tmp_path):
    code = main(["run", "eval", "-c", "configs/tiny/eval.yaml", "forgetting.heldout_set=nope",
                 "prompt_sets.in_distribution=data/instruct/eval.jsonl", "--artifacts", "/nonexistent"])
    err = capsys.readouterr().err
    assert code == 2 and "forgetting.heldout_set: expected one of the prompt sets" in err
    assert "prompt_sets.in_distribution: names the main prompts set (prompts_name) too" in err
    a_file = tmp_path / "cache.json"
    a_file.write_text("{}")
    assert main(["run", "eval", "-c", "configs/tiny/eval.yaml", f"cache_dir={a_file}",
                 "--artifacts", "/nonexistent"]) == 2
    assert f"cache_dir: {a_file} is a file; expected a folder (or none: no cache)" in capsys.readouterr().err
    from alignment.errors import DataError
    from stages.eval import ForgettingSpec, load_general_texts

    bad = tmp_path / "general.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": ""}) + "\n")
    with pytest.raises(DataError, match="general.jsonl: row 2: text: expected a non-empty string"):
        load_general_texts(ForgettingSpec(text=str(bad)))
    assert load_general_texts(ForgettingSpec(text=None)) == []


def test_split_metrics_count_cut_answers_as_failed_in_the_strict_figures():
    from types import SimpleNamespace

    from stages.eval import split_metrics

    cfg = SimpleNamespace(prompts_name="main", prompts="p.jsonl", prompt_sets={}, baseline="sft", seed=0)
    rows = [{"category": "a"}, {"category": "a"}, {"category": "b"}, {"category": None}]
    responses = {"main": {"sft": {"text": ["1", "1", "0", "x"], "eos": [True, True, True, True]},
                          "ppo": {"text": ["1", "1", "1", "x"], "eos": [True, False, False, True]}}}

    def fn(rows, texts):  # "1" passes, "0" fails, the 4th prompt has no constraints
        return [None if t == "x" else float(t) for t in texts]

    _, out = split_metrics(cfg, {"main": rows}, responses, fn)
    sft, ppo = out["main"]["models"]["sft"], out["main"]["models"]["ppo"]
    # ppo passes all 3 scored prompts but 2 of its answers were cut: strictly it passes 1 of 3
    assert ppo["pass_rate"] == 1.0 and ppo["pass_rate_strict"] == pytest.approx(1 / 3)
    assert ppo["finished_rate"] == 0.5 and sft["finished_rate"] == 1.0
    assert sft["pass_rate"] == sft["pass_rate_strict"] == pytest.approx(2 / 3)
    # paired: as scored [1-1, 1-1, 1-0] = +1/3; strictly ppo [1, 0, 0] vs sft [1, 1, 0]: [0, -1, 0] = -1/3
    assert ppo["gold_gain"]["mean"] == pytest.approx(1 / 3)
    assert ppo["gold_gain_strict"]["mean"] == pytest.approx(-1 / 3)


# -- the stage end to end --------------------------------------------------------------------------


def _with_reward_and_dpo(tiny_store, tmp_path, steps: int):
    """A copy of the tiny store with reward and dpo trained `steps` steps: (root, run, the CLI's store args)."""
    src, run = tiny_store
    root = tmp_path / "store"
    shutil.copytree(src, root)
    args = ["--artifacts", str(root), "--run", run, "tracking=none"]
    assert main(["run", "reward", "-c", "configs/tiny/reward.yaml", f"train.max_steps={steps}", *args]) == 0
    assert main(["run", "dpo", "-c", "configs/tiny/dpo.yaml", f"train.max_steps={steps}", "eval.kl_prompts=0",
                 *args]) == 0
    return root, run, args


@pytest.mark.slow
def test_eval_stage_end_to_end(tiny_store, tmp_path):
    root, run, args = _with_reward_and_dpo(tiny_store, tmp_path, steps=4)
    assert main(["run", "eval", "-c", "configs/tiny/eval.yaml", "judge.kind=longer_test", "max_prompts=12", *args]) == 0

    out = root / run / "eval"
    metrics = json.loads((out / "metrics.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["metrics"] == metrics and manifest["status"] == "complete"
    assert set(manifest["inputs"]) == {"sft", "dpo", "reward", "base"}  # base: the forgetting reference
    assert metrics["prompts"] == 12 and metrics["policy"] == "dpo" and metrics["judge"] == "rule:longer"
    dpo, sft = metrics["models"]["dpo"], metrics["models"]["sft"]
    for m in (dpo, sft):
        assert m["reward"]["n"] == 12 and math.isfinite(m["reward"]["mean"])
        assert 0.0 <= m["gold"]["pass_rate"] <= 1.0 and m["length_tokens"]["max"] <= 16
    assert dpo["kl"]["kl_prompts"] == 8 and dpo["kl"]["kl_seq"] >= 0.0
    assert dpo["gold_gain"]["mean"] == pytest.approx(dpo["gold"]["pass_rate"] - sft["gold"]["pass_rate"])
    assert metrics["kl"] == dpo["kl"]["kl_seq"] and metrics["win_rate"] == dpo["judge"]["win_rate"]

    # Three prompt sets (12 main prompts, 8 per further set), answered by sft, dpo and the base model.
    splits = metrics["splits"]
    assert {s: v["prompts"] for s, v in splits.items()} == {"in_distribution": 12, "heldout_phrasings": 8,
                                                             "heldout_kinds": 8}
    all_samples = [json.loads(line) for name in ("samples.jsonl", "samples_sets.jsonl")
                   for line in (out / name).read_text().splitlines()]
    assert len(all_samples) == (12 + 8 + 8) * 3
    for s, split in splits.items():
        assert set(split["models"]) == {"sft", "dpo", "base"}
        for name, m in split["models"].items():
            got = [x["gold"] for x in all_samples if x["split"] == s and x["policy"] == name]
            assert m["n"] == len(got) and m["pass_rate"] == pytest.approx(sum(got) / len(got))
            assert m["pass_rate_ci"][0] <= m["pass_rate"] <= m["pass_rate_ci"][1]
            assert sum(k["n"] for k in m["by_kind"].values()) == m["n"]
            assert 0.0 <= m["pass_rate_strict"] <= m["pass_rate"] and 0.0 <= m["finished_rate"] <= 1.0
            if name != "sft":  # paired with the baseline prompt by prompt
                assert m["gold_gain"]["mean"] == pytest.approx(m["pass_rate"] - split["models"]["sft"]["pass_rate"])
                assert m["gold_gain"]["n"] == m["n"]
                # the bundled rows name their wordings: a CI over them too, around the same mean
                lo, hi = m["gold_gain"]["mean_ci_wordings"]
                assert lo <= m["gold_gain"]["mean"] <= hi
                assert m["gold_gain_strict"]["mean"] == pytest.approx(
                    m["pass_rate_strict"] - split["models"]["sft"]["pass_rate_strict"])
            else:
                assert "gold_gain" not in m and "gold_gain_strict" not in m
    held_kinds = set(splits["heldout_kinds"]["models"]["dpo"]["by_kind"])
    assert held_kinds and not held_kinds & set(splits["in_distribution"]["models"]["dpo"]["by_kind"])
    assert splits["in_distribution"]["models"]["dpo"]["pass_rate"] == dpo["gold"]["pass_rate"]
    assert metrics["gold_pass_rate_heldout_kinds"] == splits["heldout_kinds"]["models"]["dpo"]["pass_rate"]
    f = metrics["forgetting"]
    assert f["reference"] == "base" and set(f["ppl"]) == {"sft", "dpo", "base"} and f["tokens"] > 0
    assert all(math.isfinite(p) and p > 1 for p in f["ppl"].values()) and f["ppl_ratio"]["base"] == 1.0
    assert f["heldout_kinds_gold_change"]["dpo"] == pytest.approx(
        f["heldout_kinds_gold"]["dpo"] - f["heldout_kinds_gold"]["base"])
    assert dpo["perplexity"]["ppl"] == f["ppl"]["dpo"]

    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 24 and {s["policy"] for s in samples} == {"sft", "dpo"}
    assert {s["split"] for s in samples} == {"in_distribution"}
    # The rule judge's verdicts, recomputed from the responses, give the reported win rate.
    by = {(s["id"], s["policy"]): s for s in samples}
    ids = sorted({s["id"] for s in samples})
    expected = [0.9 if len(by[i, "dpo"]["response"]) > len(by[i, "sft"]["response"]) else
                0.1 if len(by[i, "dpo"]["response"]) < len(by[i, "sft"]["response"]) else 0.5 for i in ids]
    assert dpo["judge"]["win_rate"] == pytest.approx(ev.win_rate(expected))
    assert dpo["reward"]["mean"] == pytest.approx(sum(by[i, "dpo"]["reward"] for i in ids) / 12)

    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 5 and "<script" not in html
    assert "Gold pass rate by split" in html and "heldout_kinds: by kind" in html and "<h2>Forgetting</h2>" in html
    from PIL import Image

    for name in ("win_rate", "reward_distribution", "training_curves", "length_distribution", "gold_by_split"):
        png = out / "plots" / f"{name}.png"
        with Image.open(png) as im:
            im.verify()
            assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100


def test_reward_model_judge_takes_the_evals_reward_scores(tiny_store, tmp_path, monkeypatch):
    """The reward-model judge on the run's own RM: the verdicts are sigmoid(r(policy) - r(baseline)) of the scores
    the eval reports, and the RM is loaded once (for the scores), not a second time for the judge."""
    import math

    import alignment.reward as reward

    root, run, args = _with_reward_and_dpo(tiny_store, tmp_path, steps=2)
    loads, load = [], reward.load_reward_model
    monkeypatch.setattr(reward, "load_reward_model", lambda *a, **k: loads.append(a) or load(*a, **k))
    assert main(["run", "eval", "-c", "configs/tiny/eval.yaml", "judge.kind=reward_model", "max_prompts=6",
                 "max_set_prompts=2", "kl.prompts=0", "cache_dir=none", "policies=[dpo]", *args]) == 0
    assert len(loads) == 1
    out = root / run / "eval"
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    by = {(r["id"], r["policy"]): r for r in rows}
    ids = sorted({r["id"] for r in rows})
    assert len(ids) == 6
    for i in ids:
        diff = by[i, "dpo"]["reward"] - by[i, "sft"]["reward"]
        assert by[i, "dpo"]["p_beats_baseline"] == pytest.approx(1 / (1 + math.exp(-diff)), abs=1e-12)


def test_eval_reuses_cached_answers_and_they_equal_fresh_ones(tiny_store, tmp_path, caplog):
    """A policy joining the report answers alone: the baseline's and the other policy's answers, reward scores
    and verdicts come from the cache, and a run with the cache off computes the same figures."""
    root, run, args = _with_reward_and_dpo(tiny_store, tmp_path, steps=2)
    ev_args = ["run", "eval", "-c", "configs/tiny/eval.yaml", "judge.kind=reward_model", "max_prompts=6",
               "max_set_prompts=4", "kl.prompts=4", *args]
    metrics = lambda: json.loads((root / run / "eval" / "metrics.json").read_text())  # noqa: E731

    assert main([*ev_args, "policies=[dpo]"]) == 0
    first = metrics()
    assert first["cache_reused"] == {}
    entries = sorted((root / ".cache" / "eval").glob("*.json"))
    assert len(entries) == 3 + 2 + 1  # answers of sft, dpo, base; rewards of sft, dpo; dpo's verdicts

    assert main([*ev_args, "policies=[dpo,base]"]) == 0
    cached = metrics()
    assert cached["cache_reused"] == {"answers": ["sft", "dpo"], "rewards": ["sft", "dpo"], "verdicts": ["dpo"]}
    assert cached["models"]["dpo"] == first["models"]["dpo"] and cached["models"]["sft"] == first["models"]["sft"]
    assert cached["models"]["base"]["kl"]["kl_prompts"] == 4  # base as a policy: answered, scored, judged anew

    assert main([*ev_args, "policies=[dpo,base]", "cache_dir=none"]) == 0
    fresh = metrics()
    assert fresh["cache_reused"] == {}
    assert fresh["models"] == cached["models"] and fresh["splits"] == cached["splits"]

    # A damaged or foreign entry is never trusted: computed again (and rewritten), with a warning naming it.
    for path in entries:
        path.write_text('{"key": "not-this-one", "value": {}}' if path == entries[0] else "{half")
    caplog.clear()
    assert main([*ev_args, "policies=[dpo]"]) == 0
    again = metrics()
    assert again["cache_reused"] == {} and again["models"] == first["models"]
    assert sum("computing it again" in r.getMessage() for r in caplog.records) == len(entries)
    assert all(json.loads(p.read_text())["key"] == p.stem for p in entries)
