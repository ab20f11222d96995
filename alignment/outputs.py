"""Where a command may write a file a user named (`--out`, `--json`): never over one of its inputs, never into a
published artifact (whose manifest lists every file it holds, so a stray file breaks `align verify`), and over an
existing file only when that file is of the kind the command writes (a re-run refreshing its own report) or the
user said `--force`. One line naming the option otherwise; nothing is written."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from alignment.errors import AlignError


class OutputError(AlignError):
    """An output path that would lose data or break an artifact."""


def published_stage(path: Path) -> Path | None:
    """The published stage folder (one holding manifest.json) that `path` lies in, if any."""
    for parent in Path(path).resolve().parents:
        if (parent / "manifest.json").is_file():
            return parent
    return None


def check_output(path, option: str, *, inputs=(), suffixes: tuple[str, ...] = (), force: bool = False) -> Path:
    """`path` checked as the target of `option` (e.g. '--json'); returns it as a Path.

    inputs: files the command reads (refused as targets, symlinks followed). suffixes: the kinds of file the
    command writes there; an existing file of another kind is refused unless `force`. An existing folder is
    always refused."""
    out = Path(path)
    real = out.resolve()
    for given in inputs:
        if given is not None and Path(given).resolve() == real:
            raise OutputError(f"{option} {path}: is an input of this command; write the output elsewhere")
    stage = published_stage(out)
    if stage is not None:
        raise OutputError(f"{option} {path}: inside the published artifact {stage}, whose manifest lists every file "
                          f"it holds; write it outside the stage folders")
    if real.is_dir():
        raise OutputError(f"{option} {path}: is a folder; name a file")
    if real.exists() and not force and (not suffixes or real.suffix.lower() not in suffixes):
        kinds = "/".join(suffixes) or "output"
        raise OutputError(f"{option} {path}: exists and is not a {kinds} file this command writes; name a new file "
                          f"or pass --force to replace it")
    return out


@contextmanager
def atomic_target(path: Path, option: str):
    """A fresh temporary file beside `path` (never a name a user's file could have) that replaces `path` when the
    block ends without an error, and is removed when it raises."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise OutputError(f"{option} {path}: cannot write there ({e.strerror or e})") from None
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
