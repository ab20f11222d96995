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

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class OutputError(AlignError):
    """An output path that would lose data or break an artifact."""


def published_stage(path: Path) -> Path | None:
    """The published stage folder (one holding manifest.json) that `path` lies in, if any."""
    for parent in Path(path).resolve().parents:
        if (parent / "manifest.json").is_file():
            return parent
    return None


def check_output(path, option: str, *, inputs=(), suffixes: tuple[str, ...] = (), force: bool = False,
                 force_flag: str | None = "--force", require_suffix: bool = False) -> Path:
    """`path` checked as the target of `option` (e.g. '--json'); returns it as a Path.

    inputs: files the command reads (refused as targets, symlinks followed). suffixes: the kinds of file the
    command writes there; an existing file of another kind is refused unless `force`. An existing folder is
    always refused. force_flag: the option the refusal suggests (None: the command has none). require_suffix:
    a new file must be named with one of `suffixes` too (a plot whose format follows its name)."""
    out = Path(path)
    real = out.resolve()
    for given in inputs:
        if given is not None and Path(given).resolve() == real:
            raise OutputError(f"{option} {path}: would overwrite an input of this command; write the output elsewhere")
    stage = published_stage(out)
    if stage is not None:
        raise OutputError(f"{option} {path}: inside the published artifact {stage}, whose manifest lists every file "
                          f"it holds; write it outside the stage folders")
    if real.is_dir():
        raise OutputError(f"{option} {path}: is a folder; name a file")
    kinds = "/".join(suffixes)
    if require_suffix and real.suffix.lower() not in suffixes:
        raise OutputError(f"{option} {path}: this command writes a {kinds} file; name one ending in {kinds}")
    if real.exists() and not force and real.suffix.lower() not in suffixes:
        kind = f"is not a {kinds} file this command writes" if suffixes else "exists"
        raise OutputError(f"{option} {path}: {kind}; name a new file"
                          + (f" or pass {force_flag} to replace it" if force_flag else ""))
    return out


def check_plot(path, option: str, *, inputs=()) -> Path:
    """A PNG plot's target: named .png, and an existing file replaced only when it really is a PNG (a re-run's own
    plot), never a user's file that merely has the name."""
    out = check_output(path, option, inputs=inputs, suffixes=(".png",), force_flag=None, require_suffix=True)
    if out.is_file():
        with out.open("rb") as f:
            if f.read(len(PNG_MAGIC)) != PNG_MAGIC:
                raise OutputError(f"{option} {path}: exists and is not a PNG image; name a new file")
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
        os.chmod(tmp, _file_mode(path))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _file_mode(path: Path) -> int:
    """mkstemp's files are 0600: the output keeps the mode of the file it replaces, else gets a new file's."""
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        mask = os.umask(0)
        os.umask(mask)
        return 0o666 & ~mask


def write_text(path: Path, option: str, text: str) -> None:
    """`text` at `path` through atomic_target: a reader never finds half a report."""
    with atomic_target(path, option) as tmp:
        tmp.write_text(text, encoding="utf-8")


def save_png(fig, path: Path, option: str, *, dpi: int) -> None:
    """A matplotlib figure as a PNG at `path` (the format given: the temporary name has no .png to go by)."""
    with atomic_target(path, option) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
