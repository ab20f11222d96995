"""One `align` command in a child process, measured from outside: the benches' shared way to time a stage.

The child's CPU time, page faults and peak RSS come from wait4 on it (its own rusage, not a self-report and not the
driver's), its wall time from the driver's clock; stderr is drained while it runs so a chatty stage cannot block.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass
class AlignRun:
    code: int
    """The exit code (`align` errors are exit 2)."""
    err: str
    """Everything the child wrote to stderr."""
    wall_s: float
    usage: object
    """The child's resource.struct_rusage: ru_utime, ru_stime, ru_minflt, ru_maxrss (KiB)."""


def run_align(args: list[str], env_extra: dict | None = None) -> AlignRun:
    """`python -m alignment.cli ARGS` from the repository root, stdout discarded, with passive OpenMP waiting and no
    hub downloads (plus `env_extra`)."""
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "alignment.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = proc.stderr.read().decode(errors="replace")  # drain while it runs; wait4 keeps the rusage
    _, status, usage = os.wait4(proc.pid, 0)
    return AlignRun(os.waitstatus_to_exitcode(status), err, time.perf_counter() - t0, usage)
