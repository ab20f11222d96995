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
