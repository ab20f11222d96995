"""The typed model of `manifest.json`, the record that makes an artifact complete.

DVC-style: every output is listed with its path, size and sha256; every input with the
sha256 of its manifest, so a changed upstream makes this stage stale.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import platform
import subprocess
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
# Written by the runner into the partial folder; not outputs. The stage log keeps growing after the outputs are
# hashed (alignment/logs.py); failure.json and tracking.json describe attempts, not the result.
INTERNAL = {MANIFEST, "checkpoints", "run_state.json", "stage.log", "failure.json", "tracking.json"}


class OutputEntry(BaseModel):
    path: str
    size: int
    sha256: str


class InputEntry(BaseModel):
    stage: str
    path: str
    manifest_sha256: str


class BaseModelId(BaseModel):
    """Which base weights + tokenizer an artifact descends from; adapters only fit their own base."""

    name: str
    fingerprint: str


class Manifest(BaseModel):
    schema_version: int = SCHEMA_VERSION
    stage: str
    run: str
    status: Literal["complete", "failed_gate"] = "complete"
    config: dict
    config_hash: str
    inputs: dict[str, InputEntry] = {}
    outputs: list[OutputEntry] = []
    metrics: dict = {}
    base_model: BaseModelId | None = None
    lineage: dict = {}
    versions: dict[str, str] = {}
    git_commit: str | None = None
    host: str = ""
    started_at: str = ""
    finished_at: str = ""


def json_schema() -> dict:
    """JSON Schema of manifest.json, for tools outside Python."""
    return Manifest.model_json_schema()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def list_outputs(folder: Path) -> list[OutputEntry]:
    """Every file under folder (sorted), except the runner's own bookkeeping."""
    entries = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if p.is_file() and rel.parts[0] not in INTERNAL:
            entries.append(OutputEntry(path=rel.as_posix(), size=p.stat().st_size, sha256=sha256_file(p)))
    return entries


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("alignment-pipeline", "torch", "transformers", "trl", "peft", "datasets", "accelerate"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    from alignment.allocator import loaded
    from alignment.hardware import device_label

    out["allocator"] = loaded()  # speed and peak memory depend on it (alignment/allocator.py)
    out["device"] = device_label()  # and on where the stage ran
    return out


def git_commit() -> str | None:
    try:
        res = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout.strip() or None if res.returncode == 0 else None
