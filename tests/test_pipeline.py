"""The whole tiny pipeline through `align pipeline`: every stage publishes, a second run skips all, and
changing one stage's config re-runs that stage and everything downstream of it, nothing upstream."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import yaml

from alignment.artifacts import ArtifactStore
from alignment.manifest import sha256_file


def test_tiny_pipeline_end_to_end_then_skips_then_reruns_downstream_of_a_change(tmp_path):
    # A copy of the tiny configs (the pipeline names its configs relative to itself), so one can be edited.
    cfg = tmp_path / "cfg"
    shutil.copytree("configs/tiny", cfg)
    stages = [s["stage"] for s in yaml.safe_load((cfg / "pipeline.yaml").read_text())["stages"]]
    art = tmp_path / "art"
    cmd = [sys.executable, "-m", "alignment.cli", "pipeline", "-c", str(cfg / "pipeline.yaml"),
           "--artifacts", str(art), "--run", "e2e"]
    # The first run two stages at a time (-j 2): dpo beside reward, each stage's console output in logs/
    first = subprocess.run([*cmd, "-j", "2"], capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    assert sorted(p.stem for p in (art / "e2e" / "logs").glob("*.log")) == sorted(set(stages))
    assert "[dpo] published" in (art / "e2e" / "logs" / "dpo.log").read_text()
    said = first.stderr.splitlines()
    assert said.index(next(x for x in said if "== dpo started" in x)) < \
        said.index(next(x for x in said if "== reward done" in x))
    # eval is listed twice: for dpo (after dpo, while ppo trains), then for both, which answers ppo alone and takes
    # the rest from the answer cache; the two never run at once (one folder), both logs in eval.log
    assert stages.count("eval") == 2
    eval_log = (art / "e2e" / "logs" / "eval.log").read_text()
    assert eval_log.count("[eval] published") == 2
    assert "[eval] from the cache" in eval_log and "answers of sft, dpo, base" in eval_log
    store = ArtifactStore(art)
    assert store.read_stage("e2e", "eval").manifest.metrics["cache_reused"]["answers"] == ["sft", "dpo", "base"]
    before = {stage: store.read_stage("e2e", stage).manifest_sha256 for stage in stages}  # published, verified
    # its last line: where the results are, as commands and paths a user pastes
    assert said[-1].endswith(f"pipeline: done; metrics: `align status --run e2e --artifacts {art}`; "
                             f"report: {art / 'e2e' / 'eval' / 'report.html'}")
    # the first eval's artifact, replaced by the last eval of the same command, is not left aside
    assert not list((art / "e2e").glob("*.old-*"))
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    for stage in stages:
        assert f"{stage}: up to date (manifest" in second.stderr
    # the first eval would only republish what the last one replaces: left out, so nothing is written
    assert f"step {stages.index('eval')} (eval) left out" in second.stderr
    assert second.stderr.count("eval: up to date (manifest") == 1
    assert {stage: store.read_stage("e2e", stage).manifest_sha256 for stage in stages} == before

    # Change SFT's learning rate: base is upstream (kept), every other stage reads SFT's artifact directly or
    # through another stage (re-run, in order).
    sft_cfg = yaml.safe_load((cfg / "sft.yaml").read_text())
    sft_cfg["train"]["lr"] = 2 * float(sft_cfg["train"]["lr"])
    (cfg / "sft.yaml").write_text(yaml.safe_dump(sft_cfg))
    third = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert third.returncode == 0, third.stderr[-3000:]
    after = {stage: store.read_stage("e2e", stage).manifest_sha256 for stage in stages}
    upstream = stages[:stages.index("sft")]
    assert upstream == ["base"]
    assert "base: up to date (manifest" in third.stderr and after["base"] == before["base"]
    for stage in stages[stages.index("sft"):]:
        assert f"{stage}: up to date" not in third.stderr
        assert f"[{stage}] published" in third.stderr
        assert after[stage] != before[stage]
    assert "sft: config or inputs changed" in third.stderr
    assert "left out" not in third.stderr  # the last eval will not be up to date, so the first one runs
    assert store.read_stage("e2e", "dpo").manifest.inputs["sft"].manifest_sha256 == after["sft"]
    # what the first command published and this one replaced stays aside, one per stage (for eval the first
    # command's last one); this command's own first eval does not
    aside = {}
    for p in (art / "e2e").glob("*.old-*"):
        aside.setdefault(p.name.split(".old-")[0], []).append(sha256_file(p / "manifest.json"))
    assert aside == {stage: [before[stage]] for stage in stages[stages.index("sft"):]}


@pytest.mark.parametrize("run", ["r", None])  # None: the run named by the stage's config (`run: tiny`)
def test_with_several_jobs_a_stage_found_up_to_date_says_so_on_the_terminal(tmp_path, caplog, monkeypatch, run):
    """The line a stage's end gets under -j N tells a skip from a run by the stage's manifest, left as it was."""
    from pathlib import Path

    from alignment.runner import run_pipeline, run_stage

    monkeypatch.delenv("ALIGN_RUN", raising=False)
    run_stage("base", "configs/tiny/base.yaml", root=tmp_path, run=run)
    pipe = tmp_path / "p.yaml"
    pipe.write_text(f"stages:\n  - {{stage: base, config: {Path('configs/tiny/base.yaml').resolve()}}}\n")
    caplog.set_level("INFO", logger="align")
    run_pipeline(str(pipe), root=tmp_path, run=run, jobs=2)
    assert "base: up to date (manifest" in (tmp_path / (run or "tiny") / "logs" / "base.log").read_text()
    assert "== base up to date (skipped) in " in caplog.text and "== base done" not in caplog.text
