"""The whole tiny pipeline through `align pipeline`: every stage publishes, a second run skips all."""

from __future__ import annotations

import subprocess
import sys

import yaml

from alignment.artifacts import ArtifactStore


def test_tiny_pipeline_end_to_end_then_skips(tmp_path):
    stages = [s["stage"] for s in yaml.safe_load(open("configs/tiny/pipeline.yaml"))["stages"]]
    cmd = [sys.executable, "-m", "alignment.cli", "pipeline", "-c", "configs/tiny/pipeline.yaml",
           "--artifacts", str(tmp_path), "--run", "e2e"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    store = ArtifactStore(tmp_path)
    for stage in stages:
        store.read_stage("e2e", stage)  # published and verified
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    for stage in stages:
        assert f"{stage}: up to date (manifest" in second.stderr
