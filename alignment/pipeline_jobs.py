"""`align pipeline -j N`: a pipeline's stages as a dependency graph, up to N stage processes at once.

Why: the stages of the default chain are not a line. dpo reads only sft, so it can train while the reward model
does, and ppo waits only for the reward model. And on the 2-core reference machine a second torch thread is
worth less to one stage than a second process is to the machine (bench/threads.py: a bf16 matmul 1.58x on two
threads, 1.76x in two processes; sampling 16 rows 0.41x on two threads, docs/pipeline.md), so two stages side by
side on one thread each finish sooner than the same two one after the other on two threads each.

A step waits for the earlier steps whose stages it reads (the stage's `upstream(cfg)`, less the ones its config
points elsewhere with `inputs.<stage>`), so the pipeline file's order still decides which artifact a stage reads;
`-j 1` runs the file top to bottom as before. With N > 1 a stage process gets `threads = cores // k` unless its
config sets `threads`, k being how many stages can run beside it (at most N): base, sft and eval never have a
neighbour and keep every core (sampling 64 rows is 1.1-1.5x faster on two threads). Each stage's console output
goes to `<artifacts>/<run>/logs/<stage>.log` (two progress bars on one terminal are unreadable); the terminal
gets one line when a stage starts and one when it ends: done, up to date (skipped), or FAILED. A failed stage stops
new starts; the stages already running finish (as `make -j` does), then the pipeline fails naming it. A stage
process is forked from this one after the libraries were imported once (alignment/launch.py), or, with
ALIGN_STAGE_LAUNCH=exec, a fresh interpreter. With `-j 1` every stage writes to the terminal, under a header that
is its `align run` command, ready to paste.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from alignment import launch

log = logging.getLogger("align")

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
"""Signals `align pipeline` passes on to the running stages (USR1: checkpoint and requeue, TERM/INT: stop)."""


@dataclass
class Step:
    index: int
    stage: str
    command: list[str]
    deps: set[int] = field(default_factory=set)
    """Indexes of the earlier steps whose artifacts this one reads."""
    preload: bool = True
    """Import the heavy libraries into this process before forking it (alignment/launch.py): False for a step that
    looked up to date when planned (it only checks and exits, which needs none of them)."""
    published: Path | None = None
    """The stage folder it publishes: its manifest left as it was means the stage found itself up to date."""


@dataclass
class Finished:
    step: Step
    code: int
    wall_s: float
    user_s: float
    sys_s: float
    skipped: bool = False
    """It exited 0 leaving its published manifest as it was: it found its artifact up to date."""
    digest: str | None = None
    """sha256 of its published manifest when it ended (None: no manifest)."""


def dependencies(stages: list[str], reads: list[set[str]], *, own_stage: bool = True) -> list[set[int]]:
    """For each step, the latest earlier step of every stage it reads (a stage listed twice: the nearer one) and,
    with `own_stage`, the latest earlier step of its own stage: both publish the same folder."""
    out = []
    for i, wanted in enumerate(reads):
        latest = {stages[j]: j for j in range(i)}
        out.append({latest[s] for s in wanted | ({stages[i]} if own_stage else set()) if s in latest})
    return out


def threads_for(deps: list[set[int]], jobs: int, cores: int | None = None) -> list[int]:
    """Torch threads per step: the cores shared by as many stage processes as can run beside it (at most `jobs`).
    A step every other step is upstream or downstream of (base, sft and eval in the default chain) always runs
    alone and gets every core; reward, dpo and ppo, which can overlap, get cores // 2 with two jobs."""
    cores = cores or os.cpu_count() or 1
    above = [set() for _ in deps]  # every step upstream of step i
    for i, d in enumerate(deps):
        for j in d:
            above[i] |= {j} | above[j]
    out = []
    for i in range(len(deps)):
        beside = sum(1 for j in range(len(deps)) if j != i and j not in above[i] and i not in above[j])
        out.append(max(1, cores // min(jobs, 1 + beside)))
    return out


def run_steps(steps: list[Step], jobs: int, log_dir: Path | None) -> list[Finished]:
    """Run `steps` (each a command), at most `jobs` at once, a step only after its deps finished with exit 0.
    `log_dir`: where each step's stdout and stderr go (None: this process's own). Returns the finished steps in
    the order they ended; steps never started (after a failure) are not in it."""
    pending, running, done = list(steps), {}, []
    ok: set[int] = set()
    before: dict[int, str | None] = {}  # each step's published manifest when it started
    saved = _forward_signals(running)
    try:
        while pending or running:
            failed = any(f.code != 0 for f in done)
            while not failed and pending and len(running) < jobs:
                ready = next((s for s in pending if s.deps <= ok), None)
                if ready is None:
                    break
                pending.remove(ready)
                before[ready.index] = _manifest_digest(ready)
                running[ready.index] = _start(ready, log_dir)
            if not running:
                break  # what is left waits on a failed step
            time.sleep(0.2)
            for index, (step, proc, t0, out) in list(running.items()):
                pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
                if pid == 0:
                    continue
                proc.returncode = code = os.waitstatus_to_exitcode(status)
                if out is not None:
                    out.close()
                del running[index]
                after = _manifest_digest(step)
                skipped = code == 0 and before[index] is not None and after == before[index]
                done.append(Finished(step, code, time.perf_counter() - t0, ru.ru_utime, ru.ru_stime, skipped, after))
                if code == 0:
                    ok.add(index)
                if log_dir is not None:
                    log.info("== %s %s in %s (user %.0f s, sys %.0f s)", step.stage, _outcome(done[-1], log_dir),
                             _clock(done[-1].wall_s), ru.ru_utime, ru.ru_stime)
    finally:
        for step, proc, _, out in running.values():  # leaving on an exception: stop what still runs
            proc.terminate()
            _reap(proc)
        for s, handler in saved.items():
            signal.signal(s, handler)
    return done


def _outcome(f: Finished, log_dir: Path) -> str:
    if f.code != 0:
        return f"FAILED ({how_ended(f.code)}; log: {log_dir / (f.step.stage + '.log')})"
    return "up to date (skipped)" if f.skipped else "done"


def _manifest_digest(step: Step) -> str | None:
    """sha256 of the step's published manifest.json; None without one. A stage that runs publishes a new manifest
    (its times differ), one that finds its artifact up to date leaves it alone: the stage's own verdict, without
    reading its log."""
    return manifest_digest(step.published) if step.published is not None else None


def manifest_digest(folder: Path) -> str | None:
    """sha256 of `folder`'s manifest.json; None without one."""
    from alignment.manifest import MANIFEST, sha256_file

    try:
        return sha256_file(folder / MANIFEST)
    except OSError:
        return None


def drop_replaced_intermediates(finished: list[Finished]) -> list[Path]:
    """Remove what a step published when a later step of the same command replaced it (a stage listed twice: eval
    for dpo alone, beside ppo, then the last eval, which holds dpo's figures too). A fresh `make pipeline` then
    leaves no replaced artifact behind. Only those: one replaced by a re-run of an earlier command is a result
    the user had, and stays aside as `ArtifactStore.commit` leaves it. Returns the folders removed."""
    ours: dict[Path, list[str]] = {}  # published folder -> this command's manifests there, in step order
    for f in sorted(finished, key=lambda f: f.step.index):
        if f.code == 0 and not f.skipped and f.digest is not None and f.step.published is not None:
            ours.setdefault(f.step.published, []).append(f.digest)
    # the last one is the artifact in place
    return [old for final, digests in ours.items() for old in drop_replaced(final, set(digests[:-1]))]


def drop_replaced(final: Path, digests: set[str]) -> list[Path]:
    """Remove the artifacts moved aside from `final` whose manifest's sha256 is one of `digests` (what earlier
    steps of the same command published: `align pipeline`'s, or a Slurm chain's records). Returns them."""
    from alignment.artifacts import ArtifactStore, remove_tree
    from alignment.manifest import MANIFEST

    removed = []
    for old in ArtifactStore.replaced(final):
        # not through a link: what is removed is a folder of the store itself
        if digests and not old.is_symlink() and manifest_digest(old) in digests:
            # the manifest first: a kill mid-way leaves a folder `align verify` skips, not a broken artifact
            (old / MANIFEST).unlink()
            remove_tree(old)
            removed.append(old)
    return removed


def shown(command: list[str]) -> str:
    """A step's command as a user can paste it: `align ...` for a stage process, every argument shell-quoted."""
    argv = launch.align_argv(command)
    return shlex.join(command if argv is None else ["align", *argv])


def _start(step: Step, log_dir: Path | None):
    out = None
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        out = open(log_dir / f"{step.stage}.log", "ab")
        log.info("== %s started (log: %s)", step.stage, log_dir / f"{step.stage}.log")
    else:
        log.info("== %s: %s", step.stage, shown(step.command))
    if step.preload and launch.wanted(step.command):
        launch.preload()
    if launch.can_fork(step.command):
        proc = launch.fork_stage(step.command, out, _die_with_parent, FORWARDED)
    else:
        proc = subprocess.Popen(step.command, preexec_fn=_die_with_parent, start_new_session=True,
                                stdout=out, stderr=subprocess.STDOUT if out else None)
    return step, proc, time.perf_counter(), out


def _forward_signals(running: dict) -> dict:
    """Signals sent to the pipeline go on to every running stage (USR1: checkpoint and requeue, TERM: stop)."""
    import threading

    def forward(signum, _frame):
        for _, proc, _, _ in list(running.values()):
            if proc.returncode is None:
                proc.send_signal(signum)

    main = threading.current_thread() is threading.main_thread()  # signal.signal works there only
    return {s: signal.signal(s, forward) for s in FORWARDED} if main else {}


def _die_with_parent() -> None:
    """In the child, before exec: PR_SET_PDEATHSIG (Linux), so if the pipeline is killed outright (SIGKILL) the
    kernel sends its stages SIGTERM and none holds its stage lock on its own."""
    parent = os.getppid()
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the prctl
        os.kill(os.getpid(), signal.SIGTERM)


def _reap(proc) -> None:
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def how_ended(code: int) -> str:
    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit {code}"


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}:{s:02d}"
