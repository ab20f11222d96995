"""alignment/allocator.py: every `align` command line runs on mimalloc unless ALIGN_ALLOCATOR says otherwise."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from alignment import allocator

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux's")


def _align(*args, **env):
    return subprocess.run([sys.executable, "-m", "alignment.cli", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "ALIGN_TRACKING": "none", **env})


@linux_only
def test_a_stage_run_from_the_command_line_runs_on_mimalloc_and_its_manifest_says_so(tmp_path):
    assert allocator.mimalloc_library() is not None, "cmeel-mimalloc is a dependency on Linux (pyproject.toml)"
    for choice, expected in (("", "mimalloc"), ("system", "system")):
        root = tmp_path / (choice or "default")
        res = _align("run", "base", "-c", "configs/tiny/base.yaml", "-q", "--artifacts", str(root),
                     ALIGN_ALLOCATOR=choice)
        assert res.returncode == 0, res.stderr[-2000:]
        manifest = json.loads(next(root.rglob("manifest.json")).read_text())
        assert manifest["versions"]["allocator"] == expected, choice


def test_a_bad_allocator_choice_is_one_line_and_exit_2(tmp_path):
    res = _align("status", "--artifacts", str(tmp_path), ALIGN_ALLOCATOR="tcmalloc")
    assert res.returncode == 2
    assert res.stderr.strip() == "align: error: ALIGN_ALLOCATOR='tcmalloc': expected one of auto, mimalloc, system"


def test_insisting_on_mimalloc_where_it_is_missing_names_the_package_and_the_way_out(monkeypatch):
    monkeypatch.setenv("ALIGN_ALLOCATOR", "mimalloc")
    monkeypatch.setattr(allocator, "loaded", lambda: "system")
    monkeypatch.setattr(allocator, "mimalloc_library", lambda: None)
    monkeypatch.setattr(sys, "platform", "linux")
    with pytest.raises(ValueError, match="cmeel-mimalloc package is not installed .*ALIGN_ALLOCATOR=system"):
        allocator.reexec_with_mimalloc()


def test_no_reexec_when_system_is_chosen_already_loaded_or_refused_by_the_loader(monkeypatch, tmp_path):
    lib = tmp_path / "libmimalloc.so"
    execs = []
    monkeypatch.setattr(os, "execve", lambda *a: execs.append(a))
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(allocator, "mimalloc_library", lambda: lib)
    monkeypatch.setattr(allocator, "loaded", lambda: "system")
    monkeypatch.setenv("ALIGN_ALLOCATOR", "system")
    allocator.reexec_with_mimalloc()
    monkeypatch.setenv("ALIGN_ALLOCATOR", "auto")
    monkeypatch.setenv("LD_PRELOAD", str(lib))  # preloaded, yet not mapped: the loader refused it; no loop
    allocator.reexec_with_mimalloc()
    assert execs == []
    monkeypatch.setenv("LD_PRELOAD", "/opt/other.so")
    allocator.reexec_with_mimalloc()
    (path, argv, env), = execs
    assert path == sys.executable and argv[0] == sys.executable
    assert env["LD_PRELOAD"] == f"{lib}:/opt/other.so"


def test_preload_env_puts_mimalloc_first_once_and_keeps_the_users_settings(tmp_path):
    lib = tmp_path / "libmimalloc.so"
    env = allocator.preload_env({"LD_PRELOAD": f"/a.so:{lib}", "MIMALLOC_PURGE_DECOMMITS": "1"}, lib)
    assert env["LD_PRELOAD"] == f"{lib}:/a.so"
    assert env["MIMALLOC_PURGE_DECOMMITS"] == "1"  # the user's value wins over our default
    assert allocator.preload_env({}, lib) == {"LD_PRELOAD": str(lib), "MIMALLOC_PURGE_DECOMMITS": "0",
                                              "MIMALLOC_ARENA_EAGER_COMMIT": "0"}
