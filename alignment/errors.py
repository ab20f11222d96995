"""Errors the CLI turns into one-line messages and exit code 2 (no traceback)."""


class AlignError(Exception):
    """A user-facing error: bad config, bad data, missing upstream artifact, lock held."""

    exit_code = 2


class ConfigError(AlignError):
    """One or more config problems; each line names the file and the key path."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class DataError(AlignError):
    """A dataset problem; the message names the file and the row."""


class ArtifactError(AlignError):
    """A missing, stale, incomplete or incompatible artifact."""


class LockError(AlignError):
    """Another process holds the stage's lock."""


class StoreIOError(AlignError):
    """The file system refused (disk full, read-only, permission, a file where a folder belongs)."""


_IO_HINTS = {
    "ENOSPC": "the disk is full: free space and re-run (finished work is kept, the same command resumes)",
    "EDQUOT": "the disk quota is exceeded: free space and re-run (the same command resumes)",
    "EROFS": "the file system is read-only: point --artifacts at a writable folder",
    "EACCES": "permission denied: point --artifacts at a folder you can write, or fix its permissions",
    "EPERM": "operation not permitted: point --artifacts at a folder you can write",
    "ENOTDIR": "a part of this path is a file, not a folder",
    "EISDIR": "this is a folder, not a file",
    "ENOENT": "no such file or folder",
}


def io_error(e: OSError) -> StoreIOError:
    """One line for any OSError: the path, what the system said, and what to do."""
    import errno

    name = errno.errorcode.get(e.errno or 0, "")
    what = e.strerror or str(e)
    where = e.filename if e.filename is not None else "(no path)"
    hint = _IO_HINTS.get(name)
    return StoreIOError(f"{where}: {what}" + (f"; {hint}" if hint and hint != what.lower() else ""))
