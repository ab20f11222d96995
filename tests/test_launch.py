"""alignment/launch.py: `align pipeline` forks its stages from one process that imported the libraries once; a
forked stage behaves as a process of its own (exit code, output, weights), and ALIGN_STAGE_LAUNCH=exec keeps the
fresh interpreter per stage. The kill tests of tests/test_kill_sweep.py run in both modes."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from alignment import launch
from alignment.pipeline_jobs import FORWARDED
from alignment.runner import _plan_steps, route_overrides, run_stage

REPO = Path(__file__).resolve().parent.parent
ALIGN = [sys.executable, "-m", "alignment.cli"]
sys.path.insert(0, str(REPO / "bench"))  # stage_launch imports its sibling page_faults
_spec = importlib.util.spec_from_file_location("bench_stage_launch", REPO / "bench" / "stage_launch.py")
stage_launch = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(stage_launch)


def test_only_this_interpreters_align_commands_are_forked(monkeypatch):
    assert launch.align_argv([*ALIGN, "run", "sft", "-c", "x.yaml"]) == ["run", "sft", "-c", "x.yaml"]
    assert launch.align_argv(["/other/python", "-m", "alignment.cli", "run", "sft"]) is None
    assert launch.align_argv([sys.executable, "-c", "print(1)"]) is None
    monkeypatch.setenv(launch.ENV, "exec")
    assert not launch.can_fork([*ALIGN, "run", "sft"])
    monkeypatch.setenv(launch.ENV, "fork")
    assert launch.can_fork([*ALIGN, "run", "sft"]) == (__import__("threading").active_count() == 1)


def test_a_gpu_build_of_torch_is_never_forked(monkeypatch):
    # one torch.cuda.is_available() in any imported library poisons a forked child's CUDA, so a CUDA or ROCm build
    # of torch gets a fresh interpreter per stage; a CPU build forks
    from types import SimpleNamespace

    monkeypatch.setenv(launch.ENV, "fork")
    monkeypatch.setattr(launch.threading, "active_count", lambda: 1)
    cmd = [*ALIGN, "run", "sft"]
    for cuda, hip, forks in ((None, None, True), ("12.4", None, False), (None, "6.2", False)):
        monkeypatch.setitem(sys.modules, "torch", SimpleNamespace(version=SimpleNamespace(cuda=cuda, hip=hip)))
        assert launch.wanted(cmd) and launch.can_fork(cmd) == forks, (cuda, hip)


def _forked(tmp_path: Path, *args: str) -> tuple[int, str]:
    out = open(tmp_path / "out.log", "wb")
    proc = launch.fork_stage([*ALIGN, *args], out, lambda: None, FORWARDED)
    _, status, usage = os.wait4(proc.pid, 0)
    out.close()
    return os.waitstatus_to_exitcode(status), (tmp_path / "out.log").read_text()


def test_a_forked_command_gives_its_exit_code_and_output_as_a_process_would(tmp_path):
    code, text = _forked(tmp_path, "config", "show", "-c", "configs/tiny/sft.yaml", "train.lr=0.5")
    assert code == 0 and "lr: 0.5" in text, text
    code, text = _forked(tmp_path, "config", "show", "-c", "configs/tiny/sft.yaml", "train.lr=oops")
    by_exec = subprocess.run([*ALIGN, "config", "show", "-c", "configs/tiny/sft.yaml", "train.lr=oops"],
                             capture_output=True, text=True, timeout=120)
    assert code == by_exec.returncode == 2
    assert text.splitlines() == by_exec.stderr.splitlines() and text.startswith("align: error: configs/tiny/sft.yaml")


def test_a_bad_launch_choice_is_one_line_and_exit_2(tmp_path):
    res = subprocess.run([*ALIGN, "pipeline", "-c", "configs/tiny/pipeline.yaml", "--artifacts", str(tmp_path)],
                         capture_output=True, text=True, timeout=120, env={**os.environ, launch.ENV: "spawn"})
    assert res.returncode == 2
    assert res.stderr.strip() == "align: error: environment: ALIGN_STAGE_LAUNCH='spawn': expected one of fork, exec"


def test_a_step_that_looks_up_to_date_is_started_without_importing_the_libraries(tmp_path):
    run_stage("base", str(REPO / "configs/tiny/base.yaml"), root=tmp_path, run="tiny")
    steps = [{"stage": "base", "config": "base.yaml"}, {"stage": "sft", "config": "sft.yaml"}]
    planned = _plan_steps(REPO / "configs/tiny/pipeline.yaml", steps, route_overrides([], ["base", "sft"]), tmp_path,
                          "tiny", False, jobs=1)
    assert [step.preload for step, _ in planned] == [False, True]
    forced = _plan_steps(REPO / "configs/tiny/pipeline.yaml", steps, route_overrides([], ["base", "sft"]), tmp_path,
                         "tiny", True, jobs=1)
    assert [step.preload for step, _ in forced] == [True, True]
    # sft up to date too, but base about to re-run (another seed): sft will re-run after it, so it is preloaded
    run_stage("sft", str(REPO / "configs/tiny/sft.yaml"), root=tmp_path, run="tiny")
    routed = route_overrides(["base.seed=7"], ["base", "sft"])
    stale_base = _plan_steps(REPO / "configs/tiny/pipeline.yaml", steps, routed, tmp_path, "tiny", False, jobs=1)
    fresh_both = _plan_steps(REPO / "configs/tiny/pipeline.yaml", steps, route_overrides([], ["base", "sft"]),
                             tmp_path, "tiny", False, jobs=1)
    assert [step.preload for step, _ in stale_base] == [True, True]
    assert [step.preload for step, _ in fresh_both] == [False, False]


@pytest.mark.slow
def test_forked_and_exec_stages_publish_the_same_weights(tmp_path):
    pipe = tmp_path / "p.yaml"
    pipe.write_text(f"run: tiny\njobs: 2\nstages:\n  - {{stage: base, config: {REPO}/configs/tiny/base.yaml}}\n"
                    f"  - {{stage: sft, config: {REPO}/configs/tiny/sft.yaml}}\n"
                    f"  - {{stage: reward, config: {REPO}/configs/tiny/reward.yaml}}\n")
    got = {}
    for mode in ("fork", "exec"):
        res = subprocess.run([*ALIGN, "-q", "pipeline", "-c", str(pipe), "--artifacts", str(tmp_path / mode)],
                             capture_output=True, text=True, timeout=600,
                             env={**os.environ, launch.ENV: mode, "ALIGN_TRACKING": "none"})
        assert res.returncode == 0, res.stderr[-2000:]
        got[mode] = stage_launch.weights(tmp_path / mode)
        assert (tmp_path / mode / "tiny/logs/sft.log").is_file()  # -j 2: each stage's output in its log
    assert len(got["fork"]) >= 3 and got["fork"] == got["exec"]
