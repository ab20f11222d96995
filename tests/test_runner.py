"""Runner rules that need no training: base-model compatibility of inputs, input overrides, pipelines."""

from __future__ import annotations

from pathlib import Path

import pytest

from alignment.artifacts import Artifact
from alignment.errors import ArtifactError, ConfigError
from alignment.manifest import BaseModelId, Manifest
from alignment.runner import common_base, latest_checkpoint, run_pipeline


def _art(path: str, stage: str, name: str, fp: str) -> Artifact:
    m = Manifest(stage=stage, run="r", config={}, config_hash="h", base_model=BaseModelId(name=name, fingerprint=fp))
    return Artifact(Path(path), m, "sha")


def test_inputs_from_the_same_base_agree():
    bm = common_base({"base": _art("/a/base", "base", "smol", "f1"), "sft": _art("/a/sft", "sft", "smol", "f1")})
    assert bm.fingerprint == "f1"


def test_adapter_from_another_base_is_refused_with_the_fix():
    inputs = {"base": _art("/a/base", "base", "smol", "f1" * 8), "sft": _art("/b/sft", "sft", "qwen", "f2" * 8)}
    with pytest.raises(ArtifactError) as e:
        common_base(inputs)
    msg = str(e.value)
    assert "/b/sft was built on base 'qwen'" in msg and "'smol'" in msg and "inputs.sft" in msg and "--force" in msg
    assert "\n" not in msg


def test_latest_checkpoint_ignores_incomplete_ones(tmp_path):
    for step, complete in ((5, True), (10, True), (15, False)):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        if complete:
            (d / "trainer_state.json").write_text("{}")
    assert latest_checkpoint(tmp_path).name == "checkpoint-10"
    assert latest_checkpoint(tmp_path / "none") is None


def test_pipeline_file_errors_name_the_step(tmp_path):
    p = tmp_path / "pipeline.yaml"
    p.write_text("stages:\n  - {stage: base, config: base.yaml}\n  - {stag: sft}\n")
    with pytest.raises(ConfigError, match=r"pipeline.yaml: stages.1: expected"):
        run_pipeline(str(p), root=tmp_path)


def test_wrong_stage_in_inputs_override_is_refused(tiny_store, tmp_path):
    from alignment.runner import run_stage

    root, run = tiny_store
    with pytest.raises(ArtifactError, match="is a 'sft' artifact, not 'base'"):
        run_stage("sft", "configs/tiny/sft.yaml", [f"inputs.base={root / run / 'sft'}"], root=tmp_path, run="x")


def test_an_input_republished_while_the_stage_runs_is_not_published_over(tiny_store, tmp_path, monkeypatch):
    """`--force` on base while sft trains: sft would name the old base but hold weights trained on the new one.
    The runner re-reads its inputs before publishing and refuses; the published sft is untouched and the next run
    starts over on the new input (the partial work records the old input's hash)."""
    import json
    import shutil

    import stages.sft
    from alignment.artifacts import ArtifactStore

    src, run = tiny_store
    root = tmp_path / "store"
    shutil.copytree(src, root)
    store = ArtifactStore(root)
    old_sft = store.read_stage(run, "sft").manifest_sha256

    def trains_while_base_is_republished(cfg, ctx):
        (ctx.out_dir / "model").mkdir()
        (ctx.out_dir / "model" / "w.bin").write_bytes(b"trained on the old base")
        manifest = root / run / "base" / "manifest.json"
        data = json.loads(manifest.read_text())
        data["finished_at"] = "later"  # what a --force republish does to the manifest's hash
        manifest.write_text(json.dumps(data))

    monkeypatch.setattr(stages.sft, "run", trains_while_base_is_republished)
    with pytest.raises(ArtifactError, match=r"inputs.base: .* changed while this stage ran .*nothing published"):
        from alignment.runner import run_stage

        run_stage("sft", "configs/tiny/sft.yaml", ["train.lr=0.5"], root=root, run=run)
    assert store.read_stage(run, "sft").manifest_sha256 == old_sft
    assert (store.partial_dir(run, "sft") / "model" / "w.bin").is_file()  # kept, never published


def test_unknown_inputs_keys_are_refused_without_echoing_the_value():
    from alignment.runner import load_stage_config

    with pytest.raises(ConfigError) as e:
        load_stage_config("dpo", "configs/tiny/dpo.yaml", ["inputs.openai_key=sk-abc123456789"])
    assert e.value.problems == ["configs/tiny/dpo.yaml (command line): inputs.openai_key: unknown key: stage 'dpo' "
                                "reads sft"]


def test_latest_checkpoint_skips_a_half_written_trainer_state(tmp_path):
    """A kill while HF writes trainer_state.json (in place) leaves the newest checkpoint incomplete."""
    from alignment.runner import latest_checkpoint

    for step, text in ((2, '{"global_step": 2}'), (4, '{"global_st'), (6, "")):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(text)
    (tmp_path / "checkpoint-8").mkdir()  # no state at all
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
