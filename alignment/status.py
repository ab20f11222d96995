"""`align status [RUN]`: one row per stage with status, age, config hash and key metrics.

When the run was submitted to Slurm (`align submit` records `<run>/.slurm.json`), a `slurm` column shows
each stage's newest job id and state (from squeue / `scontrol show job`); without Slurm it stays empty."""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from alignment.artifacts import ArtifactStore
from alignment.errors import AlignError
from alignment.manifest import MANIFEST
from alignment.runner import STAGES

KEY_METRICS = ("eval_loss", "eval_loss_before", "accuracy", "win_rate", "mean_reward", "kl")


def stage_rows(store: ArtifactStore, run: str) -> list[dict]:
    rows = []
    jobs = slurm_jobs(store.root / run)
    for stage in STAGES:
        if stage in jobs and not (store.stage_dir(run, stage) / MANIFEST).is_file() \
                and not store.partial_dir(run, stage).exists():
            rows.append({"stage": stage, "status": "submitted", "age_s": None, "config_hash": "", "metrics": ""})
        final, partial = store.stage_dir(run, stage), store.partial_dir(run, stage)
        if (final / MANIFEST).is_file():
            rows.append(_published_row(store, stage, final))
        if partial.exists():
            running = store.lock(run, stage).held_elsewhere()
            rows.append({"stage": stage, "status": "running" if running else "interrupted (partial)",
                         "age_s": time.time() - partial.stat().st_mtime, "config_hash": "", "metrics": ""})
    for r in rows:
        r["slurm"] = jobs.get(r["stage"], "")
    return rows


def _published_row(store: ArtifactStore, stage: str, final: Path) -> dict:
    """A published artifact's row; one that does not verify (cached hashes) shows as broken with the first reason."""
    age = time.time() - (final / MANIFEST).stat().st_mtime
    try:
        manifest, _ = store.load_manifest(final)
    except AlignError as e:
        return {"stage": stage, "status": "broken", "age_s": age, "config_hash": "", "metrics": str(e)}
    problems = store.problems(final, manifest)
    if problems:
        return {"stage": stage, "status": "broken", "age_s": age, "config_hash": manifest.config_hash[:12],
                "metrics": problems[0] + (f" (+{len(problems) - 1} more: align verify)" if len(problems) > 1 else "")}
    return {"stage": stage, "status": manifest.status, "age_s": age, "config_hash": manifest.config_hash[:12],
            "metrics": _key_metrics(manifest.metrics)}


def slurm_jobs(run_dir: Path) -> dict[str, str]:
    """{stage: "job <id> <STATE>"} for the run's newest Slurm submission; {} when it was never submitted.
    States need squeue/scontrol; without them (not a Slurm node) only the job ids show."""
    from alignment.cluster import job_states, read_submissions

    subs = read_submissions(run_dir)["submissions"]
    if not subs:
        return {}
    jobs = {j["stage"]: j["job_id"] for j in subs[-1].get("jobs", []) if "job_id" in j}
    states = job_states(list(jobs.values()))
    return {stage: f"job {jid} {states.get(jid, '')}".strip() for stage, jid in jobs.items()}


def _key_metrics(metrics: dict) -> str:
    return "  ".join(f"{k}={metrics[k]:.4g}" for k in KEY_METRICS if isinstance(metrics.get(k), (int, float)))


def _age(seconds: float | None) -> str:
    if seconds is None:
        return ""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def print_status(root: str | None, run: str | None) -> None:
    store = ArtifactStore(root)
    runs = [run] if run else store.runs()
    if not runs:
        raise AlignError(f"no runs under {store.root}")
    console = Console()
    for name in runs:
        if not store.run_dir(name).is_dir():
            raise AlignError(f"run '{name}' not found under {store.root}")
        table = Table(title=f"run {name} ({Path(store.root) / name})")
        rows = stage_rows(store, name)
        slurm = any(r["slurm"] for r in rows)
        for col in ("stage", "status", "age", "config", "metrics") + ("slurm",) * slurm:
            table.add_column(col)
        for r in rows:
            table.add_row(r["stage"], r["status"], _age(r["age_s"]), r["config_hash"], r["metrics"],
                          *[r["slurm"]] * slurm)
        console.print(table)
        stale = store.stale_folders(name)
        if stale:  # partial work of an older config: never resumed, only disk used
            console.print(f"{len(stale)} stale partial folder(s), never resumed; remove with: "
                          f"rm -rf {' '.join(str(p) for p in stale)}", soft_wrap=True)
