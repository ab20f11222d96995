"""The artifact store: `<root>/<run>/<stage>/` folders published atomically with a manifest.

A stage works in `<stage>.partial/`; the manifest is written last and the folder renamed
into place, so a crash never leaves something that looks complete. Downstream stages read
upstream artifacts only through `ArtifactStore.read`, which verifies sizes and hashes.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from alignment.errors import ArtifactError, LockError
from alignment.manifest import MANIFEST, Manifest, sha256_file


def default_root() -> Path:
    return Path(os.environ.get("ALIGN_ARTIFACTS", "artifacts"))


@dataclass
class Artifact:
    """A published, verified artifact."""

    path: Path
    manifest: Manifest
    manifest_sha256: str

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    @property
    def stage(self) -> str:
        return self.manifest.stage


class StageLock:
    """An fcntl lock on `<run>/.locks/<stage>.lock`: one writer per stage, released on exit or crash."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def __enter__(self) -> "StageLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise LockError(f"{self.path}: another process (pid {holder}) is writing this stage; "
                            "wait for it or stop it") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def held_elsewhere(self) -> bool:
        """True when another process holds the lock (used by `align status`)."""
        if not self.path.exists():
            return False
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)


class ArtifactStore:
    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else default_root()

    # -- layout -----------------------------------------------------------------
    def stage_dir(self, run: str, stage: str) -> Path:
        return self.root / run / stage

    def partial_dir(self, run: str, stage: str) -> Path:
        return self.root / run / f"{stage}.partial"

    def lock(self, run: str, stage: str) -> StageLock:
        return StageLock(self.root / run / ".locks" / f"{stage}.lock")

    # -- reading ----------------------------------------------------------------
    def exists(self, run: str, stage: str) -> bool:
        return (self.stage_dir(run, stage) / MANIFEST).is_file()

    def read(self, path: Path, *, verify: bool = True) -> Artifact:
        """Load a published artifact; with verify, check every output's size and sha256."""
        mpath = Path(path) / MANIFEST
        if not mpath.is_file():
            raise ArtifactError(f"{path}: no manifest.json; the stage did not finish (run it first)")
        try:
            manifest = Manifest.model_validate_json(mpath.read_text())
        except ValueError as e:
            raise ArtifactError(f"{mpath}: not a valid manifest ({str(e).splitlines()[0]})") from None
        if verify:
            for out in manifest.outputs:
                f = Path(path) / out.path
                if not f.is_file() or f.stat().st_size != out.size or sha256_file(f) != out.sha256:
                    raise ArtifactError(f"{f}: missing or changed since it was published "
                                        f"(manifest says {out.size} bytes, sha256 {out.sha256[:12]}); "
                                        f"re-run stage '{manifest.stage}' with --force")
        return Artifact(Path(path), manifest, sha256_file(mpath))

    def read_stage(self, run: str, stage: str, *, needed_by: str = "") -> Artifact:
        path = self.stage_dir(run, stage)
        if not (path / MANIFEST).is_file():
            hint = f" `align run {stage} -c configs/<profile>/{stage}.yaml --run {run}`"
            who = f"{needed_by} needs" if needed_by else "missing"
            raise ArtifactError(f"{who} the '{stage}' artifact of run '{run}' ({path}), which does not exist; "
                                f"run it first:{hint}")
        return self.read(path)

    # -- writing ----------------------------------------------------------------
    def publish(self, run: str, stage: str, manifest: Manifest) -> Path:
        """Write the manifest last into the partial folder, then rename it into place.

        An existing artifact (a --force re-run) is moved aside, never deleted.
        """
        partial, final = self.partial_dir(run, stage), self.stage_dir(run, stage)
        tmp = partial / (MANIFEST + ".tmp")
        tmp.write_text(manifest.model_dump_json(indent=2))
        os.replace(tmp, partial / MANIFEST)
        if final.exists():
            aside = final.with_name(f"{stage}.old-{time.strftime('%Y%m%d-%H%M%S')}")
            os.rename(final, aside)
        os.rename(partial, final)
        _fsync_dir(final.parent)
        return final

    def set_aside(self, path: Path, why: str) -> Path:
        """Move a folder out of the way (stale partial work) with a timestamped name."""
        aside = path.with_name(f"{path.name}.{why}-{time.strftime('%Y%m%d-%H%M%S')}")
        os.rename(path, aside)
        return aside

    def runs(self) -> list[str]:
        if not self.root.is_dir():
            return []
        # Dot folders hold caches (judge verdicts) and bookkeeping, not runs.
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, data: dict) -> None:
    """Write JSON atomically (tmp + rename) so a kill never leaves half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
