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
