"""A real single-node Slurm cluster for the tests: slurmctld + slurmd (+ munge) in a fresh directory.

Runs as root without systemd. Everything the cluster writes (state, spool, logs, pid files, job
completion log) lives under the directory given to `SlurmCluster`; both daemons listen on free ports
chosen at start, so a leftover cluster never answers for this one. `stop()` ends the daemons by
their pid files, never by name. munged is shared by the machine: started only when its socket is
absent, and then stopped by its pid file too.

    with SlurmCluster(tmp_dir) as cluster:      # waits until the node is idle
        env = cluster.env()                      # SLURM_CONF=... for sbatch/squeue/scontrol
        cluster.job(job_id)                      # `scontrol show job` as a dict
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

MUNGE_SOCKET = Path("/run/munge/munge.socket.2")
MUNGE_PID = Path("/run/munge/munged.pid")
MUNGE_KEY = Path("/etc/munge/munge.key")


def missing() -> str | None:
    """Why a cluster cannot start here, or None."""
    for tool in ("slurmctld", "slurmd", "sbatch", "scontrol", "munged"):
        if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists():
            return f"{tool} is not installed (scripts/install-slurm.sh installs Slurm + munge)"
    if os.geteuid() != 0:
        return "the test cluster runs its daemons as root"
    return None


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def _mem_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return max(1024, int(line.split()[1]) // 1024 - 1024)
    return 4096


class SlurmCluster:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.jobcomp = self.root / "jobcomp.txt"
        self._started_munge = False
        self.bring_up_s: float | None = None

    # -- life cycle -------------------------------------------------------------------------------
    def write_conf(self) -> None:
        for d in ("state", "spool", "log", "run"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        ctld_port, d_port = _free_ports(2)
        r = self.root
        self.conf.write_text("\n".join([
            "ClusterName=aligntest",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={d_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # A requeued job reuses its credential id: the default 120 s expiry would hold it that long.
            "AuthInfo=cred_expire=10",
            "MpiDefault=none",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            # sacct needs slurmdbd; finished jobs are read from `scontrol show job` or this file.
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={self.jobcomp}",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerParameters=bf_interval=2,sched_interval=5",
            # Without it, jobs behind a failed dependency stay pending forever.
            "DependencyParameters=kill_invalid_depend",
            "SlurmdParameters=config_overrides",
            "ReturnToService=2",
            "MinJobAge=3600",
            "KillWait=5",
            "InactiveLimit=0",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'run' / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'run' / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
            f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory={_mem_mb()} State=UNKNOWN",
            f"PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP",
            "",
        ]))

    def env(self) -> dict:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self, timeout: float = 60) -> "SlurmCluster":
        t0 = time.monotonic()
        self._ensure_munge()
        self.write_conf()
        subprocess.run([_sbin("slurmctld"), "-f", str(self.conf), "-i"], check=True, env=self.env())
        subprocess.run([_sbin("slurmd"), "-f", str(self.conf), "-N", self.host], check=True, env=self.env())
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True,
                                   env=self.env()).stdout.strip()
            if state == "idle":
                self.bring_up_s = time.monotonic() - t0
                return self
            time.sleep(0.5)
        logs = "\n".join(p.read_text()[-2000:] for p in (self.root / "log").glob("*.log"))
        self.stop()
        raise RuntimeError(f"slurm node not idle after {timeout:.0f} s (sinfo says {state!r}); logs:\n{logs}")

    def stop(self) -> None:
        for name in ("slurmd", "slurmctld"):
            _stop_pidfile(self.root / "run" / f"{name}.pid")
        if self._started_munge:
            _stop_pidfile(MUNGE_PID)
            self._started_munge = False

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _ensure_munge(self) -> None:
        if MUNGE_SOCKET.exists() and subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
            return
        subprocess.run(["chown", "munge:munge", str(MUNGE_KEY)], check=True)
        MUNGE_KEY.chmod(0o400)
        subprocess.run(["install", "-d", "-o", "munge", "-g", "munge", "-m", "0755", "/run/munge"], check=True)
        subprocess.run(["runuser", "-u", "munge", "--", _sbin("munged")], check=True)
        self._started_munge = True

    # -- queries ----------------------------------------------------------------------------------
    def job(self, job_id: str) -> dict:
        """`scontrol show job -o ID` as {key: value} (JobState, ExitCode, Restarts, ...)."""
        out = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True,
                             env=self.env()).stdout
        fields = {}
        for tok in out.split():
            k, sep, v = tok.partition("=")
            if sep:
                fields[k] = v
        return fields

    def wait(self, job_ids, *, timeout: float, done=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                          "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED")) -> dict:
        """Wait until every job is finished; return {id: JobState}."""
        deadline = time.monotonic() + timeout
        states = {}
        while time.monotonic() < deadline:
            states = {j: self.job(j).get("JobState", "?") for j in job_ids}
            if all(s in done for s in states.values()):
                return states
            time.sleep(1)
        raise TimeoutError(f"jobs not finished after {timeout:.0f} s: {states}\n{self.queue()}")

    def queue(self) -> str:
        return subprocess.run(["squeue", "-o", "%i %j %T %r"], capture_output=True, text=True, env=self.env()).stdout


def _stop_pidfile(pidfile: Path, timeout: float = 10) -> None:
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
