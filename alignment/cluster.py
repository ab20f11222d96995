"""Slurm chains: one sbatch job per pipeline stage, each starting after the previous one succeeds.

Jobs are `--requeue`-able: a preempted or timed-out stage re-runs the same `align run` command,
which resumes from its newest checkpoint in `<stage>.partial/`, and an up-to-date stage skips.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

from alignment.config import Section, load_yaml
from alignment.errors import AlignError, ConfigError


class SlurmSpec(Section):
    partition: str | None = None
    account: str | None = None
    time: str = "04:00:00"
    cpus: int = 8
    mem: str = "32G"
    gpus: int = 0
    extra: list[str] = []
    """Further `#SBATCH` lines, e.g. ["--qos=high"]."""


def _spec(raw: dict | None, where: str) -> SlurmSpec:
    from pydantic import ValidationError

    try:
        return SlurmSpec.model_validate(raw or {})
    except ValidationError as e:
        raise ConfigError([f"{where}.{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()]) from None


def sbatch_script(stage: str, config: Path, overrides: list[str], *, run: str, artifacts: Path,
                  spec: SlurmSpec, workdir: Path, log_dir: Path) -> str:
    lines = ["#!/bin/bash", f"#SBATCH --job-name=align-{run}-{stage}", f"#SBATCH --time={spec.time}",
             f"#SBATCH --cpus-per-task={spec.cpus}", f"#SBATCH --mem={spec.mem}", "#SBATCH --requeue",
             f"#SBATCH --output={log_dir}/{run}-{stage}-%j.log"]
    lines += [f"#SBATCH --partition={spec.partition}"] * bool(spec.partition)
    lines += [f"#SBATCH --account={spec.account}"] * bool(spec.account)
    lines += [f"#SBATCH --gpus={spec.gpus}"] * bool(spec.gpus)
    lines += [f"#SBATCH {x}" for x in spec.extra]
    cmd = [sys.executable, "-m", "alignment.cli", "run", stage, "-c", str(config), *overrides,
           "--artifacts", str(artifacts), "--run", run]
    lines += ["set -euo pipefail", f"cd {shlex.quote(str(workdir))}", "export OMP_WAIT_POLICY=PASSIVE",
              "export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}", shlex.join(cmd), ""]
    return "\n".join(lines)


def submit_chain(pipeline: str, *, run: str | None, artifacts: str | None, out_dir: str, dry_run: bool) -> list[str]:
    """Write one script per stage into out_dir and submit them chained with afterok dependencies."""
    spec = load_yaml(pipeline)
    run = run or spec.get("run") or "default"
    artifacts = Path(artifacts or "artifacts").resolve()
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    default = spec.get("slurm") or {}
    ids, prev = [], None
    for i, step in enumerate(spec.get("stages") or []):
        stage = step["stage"]
        res = _spec({**default, **(step.get("slurm") or {})}, f"{pipeline}: stages.{i}.slurm")
        config = (Path(pipeline).parent / step.get("config", f"{stage}.yaml")).resolve()
        script = out / f"{run}-{i:02d}-{stage}.sbatch"
        script.write_text(sbatch_script(stage, config, step.get("overrides", []), run=run, artifacts=artifacts,
                                        spec=res, workdir=Path.cwd(), log_dir=out))
        if dry_run:
            ids.append(str(script))
            continue
        cmd = ["sbatch", "--parsable", *([f"--dependency=afterok:{prev}"] if prev else []), str(script)]
        try:
            res_ = subprocess.run(cmd, capture_output=True, text=True, check=True)
        except FileNotFoundError:
            raise AlignError("sbatch not found: run on a Slurm login node, or use --dry-run to write the scripts") from None
        except subprocess.CalledProcessError as e:
            raise AlignError(f"sbatch refused {script}: {e.stderr.strip() or e.returncode}") from None
        prev = res_.stdout.strip().split(";")[0]
        ids.append(prev)
    return ids
