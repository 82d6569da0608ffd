"""What people see (stderr) and what machines read (metrics.jsonl).

stdout is reserved for the one machine-readable result of a command; everything here
writes to stderr or to files, except `write_stdout`, which writes that result.

Under torchrun only rank 0 prints and writes: on the other ranks every function here does
nothing, so callers never ask which rank they are on.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

stderr = Console(stderr=True, highlight=False)


def _is_writer() -> bool:
    # ptft.distributed.is_writer's rule (rank 0 of torchrun, or no torchrun), read from the
    # environment: this module stays torch-free, for config loading prints notes with it.
    return os.environ.get("RANK", "0") == "0"


class MetricsLog:
    """Appends one JSON object per logged step to RUN_DIR/metrics.jsonl (rank 0; a no-op elsewhere)."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = Path(path)
        self._enabled = _is_writer()
        if not self._enabled:
            return
        if resume_step is not None:
            self._truncate_after(resume_step)
        elif self.path.exists():
            self.path.unlink()

    def _truncate_after(self, step: int) -> None:
        # A killed run may have logged steps past its last checkpoint; the resumed run
        # logs them again, so drop them to keep one record per step.
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if not self._enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")


class _Bar:
    def __init__(self, progress: Progress | None, task):
        self._progress, self._task = progress, task

    def advance(self, step: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=step)

    def show(self, record: dict) -> None:
        if self._progress is None:
            return
        shown = {k: v for k, v in record.items() if k in ("train/loss", "val/loss", "val/acc")}
        text = "  ".join(f"{k} {v:.4g}" for k, v in shown.items())
        self._progress.update(self._task, info=text)


@contextlib.contextmanager
def progress_bar(total: int, start: int):
    """A rich progress bar on stderr, off when stderr is not a terminal (logs, CI, pipes)."""
    if not (_is_writer() and sys.stderr.isatty()):
        yield _Bar(None, None)
        return
    columns = (TextColumn("step"), MofNCompleteColumn(), BarColumn(), TimeElapsedColumn(), TextColumn("eta"),
               TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
    with Progress(*columns, console=stderr, transient=False) as progress:
        task = progress.add_task("train", total=total, completed=start, info="")
        yield _Bar(progress, task)


def print_key_report(rows: list[tuple[str, int, str]], source: str) -> None:
    """The finetune weight-load report: category, count, example keys."""
    if not _is_writer():
        return
    table = Table(title=f"weights from {source}", title_justify="left")
    table.add_column("keys")
    table.add_column("count", justify="right")
    table.add_column("examples")
    for category, count, examples in rows:
        table.add_row(category, str(count), examples)
    stderr.print(table)


def note(message: str) -> None:
    """One line for people, on stderr."""
    if _is_writer():
        stderr.print(message, soft_wrap=True)


def write_stdout(text: str) -> None:
    """The command's machine-readable output, on stdout."""
    if _is_writer():
        sys.stdout.write(text)
