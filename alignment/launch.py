"""Stage processes of `align pipeline`, forked from a parent that imported the heavy libraries once.

Why: every stage process used to start a fresh interpreter and import torch, transformers, peft, datasets and
TRL's trainer again: 4.5-8.3 s of CPU each, measured with `python -X importtime` on the tiny stages, ~45 CPU-s
over the seven processes of the default chain (docs/pipeline.md, "Stages forked from one import"). The pipeline
now imports them once (`preload`, only when a step will train) and forks each stage from itself: the child shares
the imported modules copy-on-write and runs `alignment.cli.main` with the stage's arguments.

A forked stage is still its own process, as under `subprocess`: its own session (signals from the terminal go to
the pipeline, which forwards them), PR_SET_PDEATHSIG so a SIGKILLed pipeline takes it down, its stdout and stderr
on the step's log file, its exit status and rusage from `os.wait4`, its stage lock taken by itself. What the
parent must not do before forking, and does not: start threads, or run a torch op (OpenMP and oneDNN set up their
thread pools and caches at the first one). CUDA is the exception it cannot rule out: one `torch.cuda.is_available()`
in an imported library poisons every forked child's CUDA. So only a CPU build of torch forks; with a CUDA or ROCm
build (a GPU cluster, where a stage's import time is small beside its work) every stage gets a fresh interpreter.

`ALIGN_STAGE_LAUNCH=exec` starts every stage in a fresh interpreter as before (and is what a platform without
fork, a parent that already runs threads, or a GPU build of torch gets).
"""

from __future__ import annotations

import atexit
import importlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time

ENV = "ALIGN_STAGE_LAUNCH"
CHOICES = ("fork", "exec")
PRELOAD = ("torch", "transformers", "transformers.modeling_utils", "transformers.masking_utils", "peft", "datasets",
           "trl.trainer.base_trainer")
"""What a training or eval stage imports anyway (the tiny stages' `-X importtime`: torch 1.4-1.8 s, transformers'
modeling code 1.8-2.3 s, peft 2.8-4.0 s with what it pulls in, datasets 0.7 s, TRL's trainer 0.5 s)."""
_preloaded = False


def choice() -> str:
    value = os.environ.get(ENV, "").strip().lower() or "fork"
    if value not in CHOICES:
        raise ValueError(f"{ENV}={os.environ[ENV]!r}: expected one of {', '.join(CHOICES)}")
    return value


def align_argv(command: list[str]) -> list[str] | None:
    """The `align` arguments of a command that runs this interpreter's `-m alignment.cli`, else None."""
    head = [sys.executable, "-m", "alignment.cli"]
    return list(command[3:]) if list(command[:3]) == head else None


def wanted(command: list[str]) -> bool:
    """Whether this command would be forked if torch, once imported, is a CPU build."""
    # Linux only: macOS's system frameworks are not fork-safe, and PR_SET_PDEATHSIG is Linux's
    return align_argv(command) is not None and sys.platform.startswith("linux") and choice() == "fork"


def can_fork(command: list[str]) -> bool:
    return wanted(command) and threading.active_count() == 1 and not gpu_build()


def gpu_build() -> bool:
    """torch is imported here and built for CUDA or ROCm (without importing it: it is not, so nothing can be
    poisoned yet)."""
    torch = sys.modules.get("torch")
    return torch is not None and bool(getattr(torch.version, "cuda", None) or getattr(torch.version, "hip", None))


def preload() -> None:
    """Import PRELOAD into this process, once; torch first, and nothing more when it is a GPU build (those stages
    are not forked). A missing optional package is left to the stage to report."""
    global _preloaded
    if _preloaded:
        return
    _preloaded = True
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
        if gpu_build():
            return


def _streams_on_fds() -> None:
    """sys.stdout / sys.stderr on file descriptors 1 and 2, as in a fresh interpreter (a parent that replaced them,
    such as a test harness capturing output, would otherwise get the stage's output)."""
    for name, fd in (("stdout", 1), ("stderr", 2)):
        stream = getattr(sys, name)
        try:
            if stream.fileno() == fd:
                continue
        except (AttributeError, OSError, ValueError):
            pass
        setattr(sys, name, open(fd, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False))


class Forked:
    """The part of `subprocess.Popen` the pipeline uses, for a forked stage."""

    def __init__(self, pid: int):
        self.pid, self.returncode = pid, None

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
            elif deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(str(self.pid), timeout)
            else:
                time.sleep(0.05)
        return self.returncode


def fork_stage(command: list[str], out, in_child, forwarded) -> Forked:
    """Fork; the child runs `align <args>` of `command` with stdout and stderr on `out` (None: this process's own)
    after `in_child()` (the pipeline's PR_SET_PDEATHSIG), with the signals in `forwarded` back at their defaults."""
    argv = align_argv(command)
    for stream in (sys.stdout, sys.stderr):  # else the child writes the parent's buffered text again
        stream.flush()
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, forwarded)  # none reaches the parent's handler in the child
    pid = os.fork()
    if pid:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        return Forked(pid)
    code = 1
    try:
        os.setsid()
        in_child()
        for s in forwarded:
            signal.signal(s, signal.default_int_handler if s == signal.SIGINT else signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        if out is not None:
            os.dup2(out.fileno(), 1)
            os.dup2(out.fileno(), 2)
        _streams_on_fds()
        atexit._clear()  # the parent's exit handlers are the parent's; the stage's own run below
        logging.getLogger().handlers.clear()  # the stage sets up its console as a fresh process would
        sys.argv = [sys.argv[0], *argv]
        from alignment.cli import main

        code = main(argv)
    except SystemExit as e:  # argparse's errors, sys.exit in a stage
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - whatever happens, the child must not return into the parent's loop
        import traceback

        traceback.print_exc()
    finally:
        try:
            atexit._run_exitfuncs()
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code if isinstance(code, int) else 1)
