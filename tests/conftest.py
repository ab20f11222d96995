"""Shared fixtures: one tiny base + SFT run per test session, built through the real runner."""

from __future__ import annotations

import os

# Before torch is imported: OpenMP busy-waiting next to another busy process slows steps 5-30x.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Dashboards cost ~0.7 s per stage; the tracking tests turn wandb on themselves.
os.environ.setdefault("ALIGN_TRACKING", "none")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    """Configs name data by paths relative to the repository root; a test's -q/-v (which the CLI hands to its stage
    subprocesses through the environment) does not carry over to the next test."""
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("ALIGN_VERBOSITY", raising=False)


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory) -> tuple[Path, str]:
    """(artifact root, run) holding published `base` and `sft` artifacts of the tiny model.

    Read-only for tests: a test that writes a new stage should use its own `--run` or copy.
    """
    from alignment.runner import run_stage

    os.chdir(REPO)
    root = tmp_path_factory.mktemp("store")
    run_stage("base", "configs/tiny/base.yaml", root=root, run="tiny")
    run_stage("sft", "configs/tiny/sft.yaml", root=root, run="tiny")
    return root, "tiny"
