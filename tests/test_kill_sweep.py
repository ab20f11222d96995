"""Kill -9 every tiny stage at several points, including inside publish, and resume: the result is a complete
artifact that verifies in full, and nothing that was published before is lost.

Each attempt runs in a forked child of the test process (the libraries are imported once, so an attempt costs
only the stage itself). The child stops at a named point through the runner's test hook (ALIGN_TEST_PAUSE_AT,
alignment.artifacts.pause_point) and is killed there; "mid" kills it as soon as the stage has written its first
checkpoint (or label shard), while it keeps training. Points of one stage are swept in order on the same
partial folder, so every resume starts from what the previous kill left.

`align pipeline` is killed too: SIGTERM is forwarded to its stage, SIGKILL reaches the stage through
PR_SET_PDEATHSIG, and in both cases no stage process is left holding the lock.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest

from alignment.artifacts import ArtifactStore
from alignment.config import config_hash
from alignment.manifest import MANIFEST
from alignment.runner import load_stage_config, run_stage

BEFORE, AFTER = "run:before", "run:after"
WRITTEN, MOVED, RENAMED = "publish:manifest_written", "publish:old_moved", "publish:renamed"
MID = "mid"

# (stage, run, overrides, kill points in order). `sft` re-runs with another lr over the published one, so the
# old artifact is moved aside inside publish (the MOVED point); `base` goes to a run of its own.
SWEEP = [
    ("base", "kb", [], [BEFORE, AFTER, WRITTEN, RENAMED]),
    ("sft", "tiny", ["train.lr=0.002"], [BEFORE, MID, AFTER, WRITTEN, MOVED, RENAMED]),
    ("reward", "tiny", [], [BEFORE, MID, AFTER, WRITTEN, RENAMED]),
    ("dpo", "tiny", [], [BEFORE, MID, AFTER, WRITTEN, RENAMED]),
    ("label", "tiny", [], [BEFORE, MID, AFTER, WRITTEN, RENAMED]),
    ("ppo", "tiny", [], [BEFORE, AFTER, WRITTEN, RENAMED]),
    ("eval", "tiny", [], [BEFORE, AFTER, WRITTEN, RENAMED]),
]


def _mid_reached(partial: Path) -> bool:
    """The stage has saved work it can resume from and is still going."""
    return any(partial.glob("checkpoints/checkpoint-*/trainer_state.json")) or any(partial.glob("labels/*.jsonl"))


def _attempt(stage, cfg, overrides, root: Path, run: str, point: str | None) -> str:
    """Run the stage in a forked child; SIGKILL it at `point`. 'killed', or 'finished' when it ran to the end."""
    pause = root / ".pause"
    pause.unlink(missing_ok=True)
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            if point not in (None, MID):
                os.environ.update(ALIGN_TEST_PAUSE_AT=point, ALIGN_TEST_PAUSE_FILE=str(pause))
            run_stage(stage, cfg, overrides, root=root, run=run)
        except BaseException:
            traceback.print_exc()
            code = 1
        os._exit(code)
    partial = ArtifactStore(root).partial_dir(run, stage)
    deadline = time.time() + 600
    while time.time() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            assert code == 0, f"{stage}: the attempt aiming at {point} failed (exit {code}); see the captured stderr"
            return "finished"
        if (point == MID and _mid_reached(partial)) or (point not in (None, MID) and pause.is_file()):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "killed"
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"{stage}: no {point} within 10 minutes")


def _published(root: Path) -> dict[Path, str]:
    """Every folder holding a manifest (published or moved aside) -> its manifest's bytes, hashed."""
    import hashlib

    return {m.parent: hashlib.sha256(m.read_bytes()).hexdigest() for m in root.glob(f"*/*/{MANIFEST}")}


@pytest.fixture
def one_thread():
    """Forked children inherit no busy thread pool; the session's setting comes back afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_kill_every_stage_at_every_point_then_resume(tiny_store, tmp_path, one_thread):
    src, _ = tiny_store
    root = tmp_path / "store"
    shutil.copytree(src, root)
    store = ArtifactStore(root)
    counts = {"kills_tried": 0, "clean_resumes": 0, "lost": 0, "stages": {}}
    for stage, run, overrides, points in SWEEP:
        cfg = f"configs/tiny/{stage}.yaml"
        before = _published(root)
        kills = resumes = 0
        pending = False  # the previous attempt was killed: this one is a resume
        for point in points:
            outcome = _attempt(stage, cfg, overrides, root, run, point)
            resumes += pending
            pending = outcome == "killed"
            kills += pending
            assert outcome == "killed", f"{stage}: never reached {point}"
        final = run_stage(stage, cfg, overrides, root=root, run=run)  # the last resume, in-process
        resumes += pending

        # A complete artifact of this config, verifying in full, nothing left over.
        art = store.read(final, verify="full")
        assert store.problems(final, art.manifest, full=True) == []
        assert art.manifest.config_hash == config_hash(load_stage_config(stage, cfg, overrides))
        assert not store.partial_dir(run, stage).exists() and not (final / "checkpoints").exists()
        # Nothing published before was lost: every manifest is still there (an artifact replaced by this stage
        # was moved aside as <stage>.old-*) and its folder verifies.
        after = _published(root)
        lost = [p for p, digest in before.items() if digest not in after.values()]
        for folder in after:
            assert store.problems(folder, store.load_manifest(folder)[0], full=True) == [], folder
        counts["kills_tried"] += kills
        counts["clean_resumes"] += resumes
        counts["lost"] += len(lost)
        counts["stages"][stage] = {"kills": kills, "clean_resumes": resumes, "lost": len(lost)}
        assert not lost, f"{stage}: lost {lost}"
    assert any(root.glob("tiny/sft.old-*")), "the sft re-run moves the published sft aside"
    assert counts["clean_resumes"] == counts["kills_tried"] >= 30
    if os.environ.get("ALIGN_SWEEP_REPORT"):
        Path(os.environ["ALIGN_SWEEP_REPORT"]).write_text(json.dumps(counts, indent=2))


def _pipeline(tmp_path: Path, root: Path, signum: int, launch: str) -> tuple[int, str, int]:
    """Start `align pipeline` on a one-stage pipeline (its stage forked or exec'd: ALIGN_STAGE_LAUNCH), wait until
    its stage pauses, send signum to the pipeline. (pipeline exit code, its stderr, the stage's pid)."""
    (tmp_path / "p.yaml").write_text(f"run: kp\nstages:\n  - {{stage: base, config: {Path.cwd()}/configs/tiny/base.yaml}}\n")
    pause = tmp_path / "pause"
    env = {**os.environ, "ALIGN_TEST_PAUSE_AT": BEFORE, "ALIGN_TEST_PAUSE_FILE": str(pause), "ALIGN_STAGE_LAUNCH": launch}
    proc = subprocess.Popen([sys.executable, "-m", "alignment.cli", "pipeline", "-c", str(tmp_path / "p.yaml"),
                             "--artifacts", str(root)], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not pause.is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert pause.is_file(), proc.communicate()[1][-2000:]
    child = int(pause.read_text().split()[0])
    # a forked stage still shows its pipeline's command line; an exec'd one its own
    cmdline = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
    assert (b"pipeline" in cmdline) == (launch == "fork") and (b"run" in cmdline) == (launch == "exec"), cmdline
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err, child


def _gone(pid: int, wait: float = 30) -> bool:
    deadline = time.time() + wait
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # A zombie (exited, not yet reaped by its dead parent's reaper) counts as gone.
        try:
            if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
                return True
        except OSError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.slow
@pytest.mark.parametrize("launch", ["fork", "exec"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_killed_pipeline_takes_its_stage_down(tmp_path, signum, launch):
    root = tmp_path / "art"
    code, err, child = _pipeline(tmp_path, root, signum, launch)
    assert _gone(child), f"the stage process {child} outlived its pipeline"
    assert not ArtifactStore(root).lock("kp", "base").held_elsewhere()
    if signum == signal.SIGTERM:  # forwarded: the pipeline waits for its stage, then says where it stopped
        assert code == 128 + signal.SIGTERM
        lines = [line for line in err.splitlines() if line.startswith("align: error:")]
        assert lines == ["align: error: pipeline stopped at stage 'base' (killed by SIGTERM); fix it and re-run: "
                         "finished stages skip"]
    else:
        assert code == -signal.SIGKILL
