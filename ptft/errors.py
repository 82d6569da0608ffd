"""Error types that the CLI maps to exit codes.

A `UserError` is a problem the user can fix (bad config, path, data, checkpoint): the CLI
prints its message on stderr and exits 2, without a traceback. Anything else is a bug in
ptft and exits 1 with a traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix; exit code 2. The message names the file, key or value."""


class ConfigError(UserError):
    """One or more problems in a config file or its overrides, reported together."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        head = f"invalid config {source}" if source else "invalid config"
        lines = [f"{head}: {len(self.problems)} problem(s)"] + [f"  - {p}" for p in self.problems]
        super().__init__("\n".join(lines))


class DataError(UserError):
    """Dataset files missing or unusable, or a label budget the data cannot meet."""


class CheckpointError(UserError):
    """A checkpoint that is missing, truncated, corrupt, unsafe or incompatible."""


class RunDirError(UserError):
    """A run directory that already holds a run, or cannot be written."""


class NonFiniteLossError(UserError):
    """Training produced a NaN or infinite loss; the run stops without saving bad weights."""


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM arrived; a resumable checkpoint has been written. Exit code 130."""

    def __init__(self, checkpoint: str | None):
        self.checkpoint = checkpoint
        super().__init__(f"interrupted; resumable checkpoint: {checkpoint}")
