"""The artifact store: `<root>/<run>/<stage>/` folders published atomically with a manifest.

A stage works in `<stage>.partial/`; the manifest is written last and the folder renamed
into place, so a crash never leaves something that looks complete. Downstream stages read
upstream artifacts only through `ArtifactStore.read`, which verifies sizes and hashes.

Safety rules (issue 15):
- run and stage names are one plain folder name each, and every path the store writes resolves under its root
  (a symlinked run folder pointing elsewhere is refused too);
- an artifact verifies when every listed output has its size and sha256 and no unlisted file sits beside them
  (a planted `*.bin`/`*.py` is refused, never loaded). Hashes are cached under `<root>/.cache/verified/`, keyed
  on (size, mtime, ctime, inode): ctime cannot be set back by `touch`, so an edit always re-hashes.
  `ALIGN_VERIFY=size` checks sizes only (huge models on slow disks); `align verify` re-hashes everything;
- publishing writes the manifest, moves any old artifact aside, renames, and only then removes checkpoints, so a
  kill anywhere in that window loses neither the finished training nor the old artifact.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from alignment.config import name_problem
from alignment.errors import AlignError, ArtifactError, LockError, io_error
from alignment.manifest import MANIFEST, Manifest, sha256_file

log = logging.getLogger("align")
LEFTOVERS = {"checkpoints", "run_state.json", "stage.log", "failure.json", "tracking.json"}
"""What may sit unlisted in a published artifact: the runner's bookkeeping (checkpoints only after a kill in the
publish window; the next run of the stage removes them), the stage's log and dashboard id, which no stage loads."""


def first_problem(problems: list[str]) -> str:
    """One line for an artifact that does not verify: its first problem and how many more `align verify` lists."""
    return problems[0] + (f" (+{len(problems) - 1} more: align verify)" if len(problems) > 1 else "")


def pause_point(name: str) -> None:
    """Test hook for the kill sweep: with ALIGN_TEST_PAUSE_AT=<name>, write '<pid> <name>' to
    $ALIGN_TEST_PAUSE_FILE and sleep, so a test kills the process at exactly this point."""
    if os.environ.get("ALIGN_TEST_PAUSE_AT") != name:
        return
    Path(os.environ["ALIGN_TEST_PAUSE_FILE"]).write_text(f"{os.getpid()} {name}")
    time.sleep(3600)


def verify_mode() -> str:
    mode = os.environ.get("ALIGN_VERIFY", "sha256")
    if mode not in ("sha256", "size"):
        raise ArtifactError(f"ALIGN_VERIFY={mode!r}: expected sha256 (default) or size")
    return mode


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

    read_only = False
    """True when the store cannot be written: the lock is then shared (enough to check an up-to-date artifact)."""

    def __enter__(self) -> "StageLock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise io_error(e) from None
            return self._enter_read_only(e)
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

    def _enter_read_only(self, why: OSError) -> "StageLock":
        """A read-only store: nobody can publish into it, so a shared lock (or none, without a lock file) is enough
        to find an artifact up to date; running the stage is refused by the runner."""
        self.read_only, self.why = True, why
        if self.path.is_file():
            fd = os.open(self.path, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise LockError(f"{self.path}: another process is writing this stage; wait for it") from None
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
        if self.root.exists() and not self.root.is_dir():
            raise ArtifactError(f"{self.root}: the artifact root is a file, not a folder; point --artifacts "
                                "(or $ALIGN_ARTIFACTS) at a folder")

    # -- layout -----------------------------------------------------------------
    def _under_root(self, *names: tuple[str | None, str]) -> Path:
        """root / name / ...: each name one safe folder name, and the result resolving under the root."""
        path = self.root
        for what, name in names:
            problem = name_problem(name) if what else None  # what=None: a fixed name of ours (.locks)
            if problem:
                raise ArtifactError(f"{what} {name!r}: {problem}")
            path = path / name
        self.check_under_root(path)
        return path

    def check_under_root(self, path: Path) -> Path:
        """Refuse a path that resolves outside the root (a symlink in the way, a `..`)."""
        root, real = self.root.resolve(), Path(path).resolve()
        if real != root and root not in real.parents:
            raise ArtifactError(f"{path}: resolves to {real}, outside the artifact root {root}; refusing to use it")
        return Path(path)

    def run_dir(self, run: str) -> Path:
        return self._under_root(("run name", run))

    def stage_dir(self, run: str, stage: str) -> Path:
        return self._under_root(("run name", run), ("stage name", stage))

    def partial_dir(self, run: str, stage: str) -> Path:
        self._under_root(("stage name", stage))
        return self._under_root(("run name", run), ("stage folder", f"{stage}.partial"))

    def lock(self, run: str, stage: str) -> StageLock:
        self._under_root(("stage name", stage))
        return StageLock(self._under_root(("run name", run), (None, ".locks"), (None, f"{stage}.lock")))

    # -- reading ----------------------------------------------------------------
    def exists(self, run: str, stage: str) -> bool:
        return (self.stage_dir(run, stage) / MANIFEST).is_file()

    def read(self, path: Path, *, verify: bool | str = True) -> Artifact:
        """Load a published artifact. verify: True (sizes, and sha256 through the cache unless ALIGN_VERIFY=size),
        "full" (re-hash everything, `align verify`), False (the manifest only)."""
        path = Path(path)
        manifest, digest = self.load_manifest(path)
        if verify:
            problems = self.problems(path, manifest, full=verify == "full")
            if problems:
                raise ArtifactError(f"{problems[0]}; re-run stage '{manifest.stage}' with --force"
                                    + (f" ({len(problems) - 1} more problem(s): align verify)" if len(problems) > 1
                                       else ""))
        return Artifact(path, manifest, digest)

    @staticmethod
    def load_manifest(path: Path) -> tuple[Manifest, str]:
        """(manifest, sha256 of its bytes), read once so the hash is of what was parsed."""
        mpath = Path(path) / MANIFEST
        if not mpath.is_file():
            raise ArtifactError(f"{path}: no manifest.json; the stage did not finish (run it first)")
        try:
            data = mpath.read_bytes()
        except OSError as e:
            raise io_error(e) from None
        try:
            manifest = Manifest.model_validate_json(data)
        except ValueError as e:
            raise ArtifactError(f"{mpath}: not a valid manifest ({str(e).splitlines()[0]})") from None
        return manifest, hashlib.sha256(data).hexdigest()

    def problems(self, path: Path, manifest: Manifest, *, full: bool = False) -> list[str]:
        """Every reason the artifact at `path` does not match its manifest (empty: it verifies)."""
        path, out = Path(path), []
        listed = set()
        mode = "sha256" if full else verify_mode()
        cache = {} if full else self._read_cache(path)
        fresh = {}
        base = path.resolve()
        for entry in manifest.outputs:
            f = path / entry.path
            listed.add(entry.path)
            if Path(entry.path).is_absolute() or ".." in Path(entry.path).parts or base not in f.resolve().parents:
                out.append(f"{path / MANIFEST}: output {entry.path!r} points outside the artifact")
                continue
            try:
                st = f.lstat()
            except OSError:
                out.append(f"{f}: missing (the manifest lists it)")
                continue
            if not f.is_file() or f.is_symlink():
                out.append(f"{f}: not a regular file (the manifest lists one)")
            elif st.st_size != entry.size:
                out.append(f"{f}: {st.st_size} bytes, the manifest says {entry.size} (truncated or changed)")
            elif mode == "sha256":
                stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
                hit = cache.get(entry.path)
                digest = hit[1] if hit and hit[0] == stamp else sha256_file(f)
                fresh[entry.path] = [stamp, digest]
                if digest != entry.sha256:
                    out.append(f"{f}: sha256 {digest[:12]}, the manifest says {entry.sha256[:12]} (changed since it "
                               "was published)")
        for f in sorted(p for p in path.rglob("*") if not p.is_dir()):
            rel = f.relative_to(path)
            if rel.as_posix() not in listed and rel.parts[0] not in LEFTOVERS | {MANIFEST}:
                out.append(f"{f}: not listed in the manifest (planted, or left by another tool); it is never loaded: "
                           "remove it")
        if fresh and fresh != cache:
            self._write_cache(path, fresh)
        return out

    def _cache_file(self, path: Path) -> Path:
        key = hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:24]
        return self.root / ".cache" / "verified" / f"{key}.json"

    def _read_cache(self, path: Path) -> dict:
        try:
            data = json.loads(self._cache_file(path).read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _write_cache(self, path: Path, table: dict) -> None:
        """Best effort: a read-only or full disk only costs the next read a re-hash."""
        target = self._cache_file(path)
        tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(table))
            os.replace(tmp, target)
        except OSError:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass

    def check_published(self, path: Path, *, full: bool = False) -> tuple[Manifest | None, str, list[str]]:
        """(manifest, sha256 of its bytes, problems) of a published stage folder, for the commands that show every
        stage of a run instead of stopping at the first bad one (status, verify, report). A folder resolving outside
        the root (a symlink) is not read at all; manifest None: it could not be read."""
        try:
            self.check_under_root(path)
            manifest, digest = self.load_manifest(path)
        except AlignError as e:  # an unreadable file too (StoreIOError)
            return None, "", [str(e)]
        return manifest, digest, self.problems(path, manifest, full=full)

    def verify_run(self, run: str) -> list[tuple[str, str, list[str]]]:
        """(stage folder, status, problems) of every published artifact of a run, re-hashed in full."""
        out = []
        run_dir = self.run_dir(run)
        for folder in sorted(p for p in run_dir.iterdir() if p.is_dir() and (p / MANIFEST).is_file()):
            manifest, _, problems = self.check_published(folder, full=True)
            out.append((folder.name, manifest.status if manifest else "broken", problems))
        return out

    def stale_folders(self, run: str) -> list[Path]:
        """Partial work set aside because its config changed (`<stage>.partial.stale-*`): never resumed."""
        run_dir = self.run_dir(run)
        return sorted(run_dir.glob("*.partial.stale-*")) if run_dir.is_dir() else []

    def flag(self) -> str:
        """` --artifacts ROOT` for a command a user pastes, empty when the root is the default one."""
        return "" if self.root.resolve() == default_root().resolve() else f" --artifacts {self.root}"

    def read_stage(self, run: str, stage: str, *, needed_by: str = "") -> Artifact:
        path = self.stage_dir(run, stage)
        if not (path / MANIFEST).is_file():
            hint = f" `align run {stage} -c configs/<profile>/{stage}.yaml --run {run}{self.flag()}`"
            who = f"{needed_by} needs" if needed_by else "missing"
            if not self.run_dir(run).is_dir():
                raise ArtifactError(f"{who} the '{stage}' artifact of run '{run}', and there is no run '{run}' "
                                    f"under {self.root} (runs: {', '.join(self.runs()) or 'none'}); a new run:{hint}")
            raise ArtifactError(f"{who} the '{stage}' artifact of run '{run}' ({path}), which does not exist; "
                                f"run it first:{hint}")
        return self.read(path)

    # -- writing ----------------------------------------------------------------
    def publish(self, run: str, stage: str, manifest: Manifest) -> Path:
        """Write the manifest last into the partial folder, then rename it into place (`commit`).

        An existing artifact (a --force re-run) is moved aside, never deleted.
        """
        partial = self.partial_dir(run, stage)
        tmp = partial / (MANIFEST + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(manifest.model_dump_json(indent=2))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, partial / MANIFEST)
        pause_point("publish:manifest_written")
        return self.commit(run, stage)

    def commit(self, run: str, stage: str) -> Path:
        """Rename a partial folder holding its manifest into place; also finishes a publish a kill interrupted.
        Checkpoints go last: until the artifact is in place they are what a resume would train from."""
        partial, final = self.partial_dir(run, stage), self.stage_dir(run, stage)
        if final.exists():
            os.rename(final, self._aside_name(final, f"{stage}.old"))
            pause_point("publish:old_moved")
        os.rename(partial, final)
        _fsync_dir(final.parent)
        pause_point("publish:renamed")
        self.tidy(final)
        return final

    @staticmethod
    def replaced(final: Path) -> list[Path]:
        """The artifacts `commit` moved aside from `final` (re-runs that replaced them), oldest first."""
        return sorted(p for p in final.parent.glob(f"{final.name}.old-*") if p.is_dir())

    @staticmethod
    def tidy(final: Path) -> None:
        """Remove what a kill in the publish window left in a published artifact (its checkpoints)."""
        if (final / "checkpoints").exists():
            shutil.rmtree(final / "checkpoints", ignore_errors=True)

    def set_aside(self, path: Path, why: str) -> Path:
        """Move a folder out of the way (stale partial work) with a timestamped name. Of a stage's stale partial
        folders only the newest is kept: they are never resumed, and each may hold gigabytes of checkpoints."""
        self.check_under_root(path)
        aside = self._aside_name(path, f"{path.name}.{why}")
        os.rename(path, aside)
        for old in path.parent.glob(f"{path.name}.{why}-*"):
            if old != aside and old.is_dir():
                log.info("removing older set-aside partial work %s", old)
                shutil.rmtree(old, ignore_errors=True)
        return aside

    @staticmethod
    def _aside_name(path: Path, prefix: str) -> Path:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside, n = path.with_name(f"{prefix}-{stamp}"), 1
        while aside.exists():  # two set-asides within a second
            aside, n = path.with_name(f"{prefix}-{stamp}.{n}"), n + 1
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
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(data, indent=2, sort_keys=True, default=str))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
