"""`align status [RUN]`: one row per stage with status, age, config hash and key metrics."""

from __future__ import annotations

import json
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
    for stage in STAGES:
        final, partial = store.stage_dir(run, stage), store.partial_dir(run, stage)
        if (final / MANIFEST).is_file():
            m = json.loads((final / MANIFEST).read_text())
            rows.append({"stage": stage, "status": m["status"], "age_s": time.time() - (final / MANIFEST).stat().st_mtime,
                         "config_hash": m["config_hash"][:12], "metrics": _key_metrics(m.get("metrics", {}))})
        if partial.exists():
            running = store.lock(run, stage).held_elsewhere()
            rows.append({"stage": stage, "status": "running" if running else "interrupted (partial)",
                         "age_s": time.time() - partial.stat().st_mtime, "config_hash": "", "metrics": ""})
    return rows


def _key_metrics(metrics: dict) -> str:
    return "  ".join(f"{k}={metrics[k]:.4g}" for k in KEY_METRICS if isinstance(metrics.get(k), (int, float)))


def _age(seconds: float) -> str:
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
        if not (store.root / name).is_dir():
            raise AlignError(f"run '{name}' not found under {store.root}")
        table = Table(title=f"run {name} ({Path(store.root) / name})")
        for col in ("stage", "status", "age", "config", "metrics"):
            table.add_column(col)
        for r in stage_rows(store, name):
            table.add_row(r["stage"], r["status"], _age(r["age_s"]), r["config_hash"], r["metrics"])
        console.print(table)
