"""Logs: a short console, the resolved config and the full log in the artifact, -q/-v, known noise silenced."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import yaml

from alignment.artifacts import ArtifactStore
from alignment.logs import STAGE_LOG, silence_known_warnings


def _align(*args, env=None):
    return subprocess.run([sys.executable, "-m", "alignment.cli", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def test_known_noise_is_silenced_by_message_only():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        silence_known_warnings()
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
        warnings.warn("Model has `tie_word_embeddings=True` and a tied layer is part of the adapter, but ...",
                      UserWarning)
        warnings.warn("something else is deprecated", FutureWarning)
        warnings.warn("a user warning we know nothing about", UserWarning)
    assert [str(w.message) for w in seen] == ["something else is deprecated", "a user warning we know nothing about"]


@pytest.mark.slow
def test_config_goes_to_the_artifact_and_the_log_file_keeps_every_attempt(tmp_path):
    out = _align("run", "base", "-c", "configs/tiny/base.yaml", "--artifacts", str(tmp_path), "--run", "r")
    assert out.returncode == 0, out.stderr[-3000:]
    console = out.stdout + out.stderr
    assert '"stage"' not in console and "model:" not in console  # no JSON/YAML config dump
    assert "config.yaml in the artifact" in console
    art = ArtifactStore(tmp_path).read_stage("r", "base")  # verifies every output's size and hash
    assert yaml.safe_load((art.path / "config.yaml").read_text()) == art.manifest.config
    outputs = {o.path for o in art.manifest.outputs}
    assert "config.yaml" in outputs and STAGE_LOG not in outputs  # the log keeps growing: bookkeeping, not output
    log = (art.path / STAGE_LOG).read_text()
    assert "attempt started" in log and "[base] published" in log

    # -q: nothing but warnings and errors on the console; the log file still gets the whole attempt, appended.
    quiet = _align("-q", "run", "base", "-c", "configs/tiny/base.yaml", "--artifacts", str(tmp_path), "--run", "r",
                   "--force")
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert "[base]" not in quiet.stderr + quiet.stdout
    assert "Writing model shards" not in quiet.stderr  # progress bars off
    log = (tmp_path / "r" / "base" / STAGE_LOG).read_text()
    assert log.count("attempt started") == 1 and "[base] published" in log  # --force: a fresh folder
    ArtifactStore(tmp_path).read_stage("r", "base")


@pytest.mark.slow
def test_verbose_shows_the_resolved_config_and_bad_flags_are_refused(tmp_path):
    out = _align("run", "base", "-c", "configs/tiny/base.yaml", "--artifacts", str(tmp_path), "--run", "r", "-v")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resolved config:\nstage: base\n" in out.stderr  # YAML, as config.yaml and `align config show`
    bad = _align("run", "base", "-c", "configs/tiny/base.yaml", "--loud")
    assert bad.returncode == 2 and "unrecognized arguments: --loud" in bad.stderr


def test_the_reward_stage_logs_one_line_per_set_for_its_kinds_and_each_kind_at_debug(caplog):
    from stages.reward import _log_set

    kinds = {k: {"pairs": 4, "accuracy": a, "length_corr": 0.1} for k, a in [("a", 1.0), ("b", 0.5), ("c", 0.75),
                                                                              ("d", 0.8)]}
    m = {"pairs": 16, "accuracy": 0.76, "accuracy_ci": [0.5, 0.9], "mean_margin": 0.2, "ece": 0.1, "length_corr": 0.0,
         "by_category": kinds}
    caplog.set_level("DEBUG", logger="align")
    _log_set("eval", m)
    info = [r.getMessage() for r in caplog.records if r.levelname == "INFO"]
    debug = [r.getMessage() for r in caplog.records if r.levelname == "DEBUG"]
    assert info[1] == "[reward]   kinds at accuracy >= 0.8: 2 of 4; lowest: b 0.50, c 0.75, d 0.80" and len(info) == 2
    assert len(debug) == 4 and debug[1].startswith("[reward]   b ")
