"""Reports: the eval page from fixed numbers, and `align report RUN` over a hand-made run (no models)."""

from __future__ import annotations

import base64
import io
import json
import re

from PIL import Image

from alignment.cli import main
from alignment.manifest import InputEntry, Manifest
from alignment.report import write_eval_report


def _images(html: str) -> list[Image.Image]:
    out = []
    for b64 in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html):
        im = Image.open(io.BytesIO(base64.b64decode(b64)))
        im.load()
        out.append(im)
    return out


def _judge(wins, ties, losses):
    n = wins + ties + losses
    return {"win_rate": (wins + ties / 2) / n, "win_rate_ci": [0.3, 0.9], "soft_win_rate": 0.6, "wins": wins,
            "ties": ties, "losses": losses, "n": n, "position_disagreement": 0.1, "unparsed": 0}


def test_eval_report_is_self_contained_with_valid_plots(tmp_path):
    hist = tmp_path / "dpo_log_history.jsonl"
    hist.write_text("".join(json.dumps({"step": s, "loss": 0.7 - s / 100, "rewards/margins": s / 10}) + "\n"
                            for s in range(1, 11)))
    ppo_hist = tmp_path / "ppo_log_history.jsonl"
    ppo_hist.write_text("".join(json.dumps({"step": s, "ppo/kl": s / 50, "objective/scores": s / 5}) + "\n"
                                for s in range(1, 6)))
    length = {"mean": 10.0, "median": 9.0, "p90": 15.0, "max": 20, "min": 1}
    models = {
        "sft": {"length_tokens": length, "missing_eos_rate": 0.0,
                "reward": {"mean": 0.1, "std": 1.0, "mean_ci": [0, 0.2], "n": 3}},
        "dpo": {"length_tokens": length, "missing_eos_rate": 0.25, "judge": _judge(2, 1, 1),
                "reward": {"mean": 0.5, "std": 1.0, "mean_ci": [0.2, 0.8], "n": 3},
                "kl": {"kl_seq": 0.12, "kl_per_token": 0.01},
                "gold": {"pass_rate": 0.5, "pass_rate_ci": [0.2, 0.8], "n": 4}},
        "ppo": {"length_tokens": length, "missing_eos_rate": 0.0, "judge": _judge(1, 0, 3),
                "reward": {"mean": 0.9, "std": 1.0, "mean_ci": [0.5, 1.2], "n": 3}},
    }
    kinds = {"keyword": {"pass_rate": 0.75, "pass_rate_ci": [0.25, 1.0], "n": 4}}
    splits = {
        "in_distribution": {"source": "data/instruct/eval.jsonl", "prompts": 4, "models": {
            "sft": {"pass_rate": 0.25, "pass_rate_ci": [0.0, 0.75], "n": 4, "by_kind": kinds},
            "dpo": {"pass_rate": 0.5, "pass_rate_ci": [0.2, 0.8], "n": 4, "by_kind": kinds}}},
        "heldout_kinds": {"source": "data/instruct/eval_heldout_kinds.jsonl", "prompts": 2, "models": {
            "dpo": {"pass_rate": 0.125, "pass_rate_ci": [0.0, 0.5], "n": 2,
                    "by_kind": {"uppercase": {"pass_rate": 0.125, "pass_rate_ci": [0.0, 0.5], "n": 2}}}}},
    }
    forgetting = {"reference": "base", "ppl": {"base": 20.0, "dpo": 25.0}, "ppl_ratio": {"base": 1.0, "dpo": 1.25},
                  "heldout_kinds_gold": {"dpo": 0.125}, "text": "data/general/heldout.jsonl", "tokens": 99,
                  "heldout_set": "heldout_kinds"}
    metrics = {"policy": "dpo", "baseline": "sft", "win_rate": 0.625, "models": models, "prompts": 3,
               "prompts_source": "data/instruct/eval.jsonl", "judge": "rule", "splits": splits,
               "forgetting": forgetting}
    samples = [{"id": i, "policy": p, "prompt": f"question {i} <b>bold</b>", "response": f"<script>alert({i})</script>",
                "reward": 0.1 * i, "gold": 1.0} for i in range(3) for p in ("sft", "dpo", "ppo")]
    report = write_eval_report(tmp_path / "out", metrics=metrics, samples=samples,
                               histories={"dpo": hist, "ppo": ppo_hist},
                               rewards={"sft": [0.0, 0.1, 0.2], "dpo": [0.3, 0.5, 0.7], "ppo": [0.8, 0.9, 1.0]},
                               lengths={"sft": [5, 10, 15], "dpo": [8, 9, 13], "ppo": [1, 2, 3]},
                               inputs={"sft": "/a/sft", "dpo": "/a/dpo"}, baseline="sft", policies=["dpo", "ppo"],
                               run="r1", shown=2)
    html = report.read_text()
    # Self-contained: every image inline, no external reference; user text is escaped.
    assert "<script>" not in html and "&lt;script&gt;alert(0)&lt;/script&gt;" in html
    assert not re.search(r'(src|href)="(?!data:)', html)
    images = _images(html)
    assert len(images) == 5 and all(im.format == "PNG" and im.size[0] > 200 for im in images)
    for png in sorted((tmp_path / "out" / "plots").glob("*.png")):
        assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {p.stem for p in (tmp_path / "out" / "plots").glob("*.png")} == \
        {"win_rate", "reward_distribution", "training_curves", "length_distribution", "gold_by_split"}
    assert "0.625 [0.30, 0.90]" in html and "2 / 1 / 1" in html and "question 2" not in html  # shown=2
    # Gold per split (model x set, n), per kind within each set, and forgetting against the base model.
    assert "<h2>Gold pass rate by split</h2>" in html and "0.250 [0.00, 0.75] (4)" in html
    assert "0.125 [0.00, 0.50] (2)" in html and "<h3>heldout_kinds: by kind</h3>" in html
    assert "<td class='l'>uppercase</td><td>0.12 [0.00, 0.50] (2)</td>" in html
    assert "<td class='l'><b>dpo</b></td><td>25.00</td><td>1.250</td><td>0.125</td><td>–</td>" in html
    assert "against <b>base</b>" in html


def _publish(root, run, stage, inputs=(), metrics=None, history=None, status="complete", stale=()):
    """A hand-made published stage that verifies (report shows one that does not as broken); its inputs' recorded
    manifest hashes are the real ones, except `stale`."""
    from alignment.manifest import list_outputs, sha256_file

    d = root / run / stage
    d.mkdir(parents=True)
    if history:
        (d / "log_history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    sha = {i: "cd" * 32 if i in stale else sha256_file(root / run / i / "manifest.json") for i in inputs}
    m = Manifest(stage=stage, run=run, status=status, config={}, config_hash="ab" * 32,
                 inputs={i: InputEntry(stage=i, path=str(root / run / i), manifest_sha256=sha[i]) for i in inputs},
                 metrics=metrics or {}, lineage={"parent_stage": inputs[0]} if inputs else {},
                 outputs=list_outputs(d), finished_at="2026-11-22T02:00:00+0000")
    (d / "manifest.json").write_text(m.model_dump_json())


def test_align_report_shows_every_stage_lineage_and_curves(tmp_path, capsys):
    root = tmp_path / "artifacts"
    _publish(root, "r1", "base", metrics={"parameters": 1000})
    _publish(root, "r1", "sft", ["base"], {"eval_loss": 1.5, "eval_loss_before": 2.0},
             [{"step": s, "loss": 2.0 - s / 10} for s in range(1, 6)])
    _publish(root, "r1", "reward", ["base", "sft"], {"eval_accuracy": 0.8, "gate_passed": True},
             [{"step": 5, "loss": 0.6}, {"step": 10, "loss": 0.5}], status="failed_gate")
    _publish(root, "r1", "dpo", ["sft"], {"eval": {"rewards/margins": 0.3}},
             [{"step": s, "loss": 0.69, "rewards/margins": s / 10} for s in range(1, 4)], stale=["sft"])
    out = tmp_path / "page.html"
    assert main(["report", "r1", "--artifacts", str(root), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    html = out.read_text()
    for stage in ("base", "sft", "reward", "dpo"):
        assert f"<h2>{stage}</h2>" in html
    assert "failed_gate" in html and "eval_accuracy" in html and "eval/rewards/margins" in html
    # dpo read an sft that has been re-run since; the others read what is there now.
    assert html.count("stale: sft changed since") == 1 and html.count(">up to date<") == 2
    # lineage graph + curves for sft, reward, dpo; intermediates removed, the page stands alone.
    assert len(_images(html)) == 4
    assert not list(tmp_path.glob(".page_plots/*"))
    assert main(["report", "nope", "--artifacts", str(root)]) == 2
    assert "run 'nope' has no published stage" in capsys.readouterr().err


def test_the_run_page_gives_an_eval_s_figures_per_policy_against_its_baseline(tmp_path, capsys):
    """An eval's top-level win_rate is its first policy's alone: the page names whose each figure is."""
    root = tmp_path / "artifacts"
    _publish(root, "r1", "base", metrics={"parameters": 1000})
    models = {"sft": {"gold": {"pass_rate": 0.25}},
              "dpo": {"judge": {"win_rate": 0.5}, "gold": {"pass_rate": 0.375}},
              "ppo": {"judge": {"win_rate": 0.75}, "gold": {"pass_rate": 0.125}}}
    _publish(root, "r1", "eval", ["base"], {"baseline": "sft", "policy": "dpo", "win_rate": 0.5, "models": models})
    out = tmp_path / "page.html"
    assert main(["report", "r1", "--artifacts", str(root), "--out", str(out)]) == 0
    html = out.read_text()
    rows = re.findall(r"<tr><td class='l'>([^<]*)</td><td>([^<]*)</td></tr>", html)
    assert ("dpo vs sft", "win=0.5 gold=0.375") in rows and ("ppo vs sft", "win=0.75 gold=0.125") in rows
    assert ("sft", "gold=0.25") in rows and ("win_rate", "0.5000") not in rows
