"""What people see (stderr), and the one result of a command (stdout).

stdout is reserved for the one machine-readable result of a command; everything here
writes to stderr, except `write_stdout`, which writes that result. Metric records go to files
through ptft/loggers.py.

Under torchrun only rank 0 prints and writes: on the other ranks every function here does
nothing, so callers never ask which rank they are on.
"""

from __future__ import annotations

import contextlib
import os
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

stderr = Console(stderr=True, highlight=False)


def _is_writer() -> bool:
    # ptft.distributed.is_writer's rule (rank 0 of torchrun, or no torchrun), read from the
    # environment: this module stays torch-free, for config loading prints notes with it.
    return os.environ.get("RANK", "0") == "0"


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


# Labelled classes further apart than this (largest count / smallest) are worth a line at the start.
IMBALANCE_RATIO = 1.5


def note_class_counts(counts: list[int], class_names: list[str]) -> None:
    """The labelled examples per class, on stderr, when they are imbalanced (see IMBALANCE_RATIO).

    Only then: equal counts (a labels_per_class budget) would add a line of identical numbers to
    every run, burying the warnings. A class with no example counts as imbalanced.
    """
    if not counts or (min(counts) > 0 and max(counts) / min(counts) <= IMBALANCE_RATIO):
        return
    shown = ", ".join(f"{name} {count}" for name, count in zip(class_names, counts))
    ratio = f"{max(counts) / min(counts):.1f}" if min(counts) else "inf"
    note(f"labelled examples per class (imbalanced, largest/smallest {ratio}): {shown}; "
         "data.sampler: balanced or objective.class_weights: balanced weighs the classes equally")


def write_stdout(text: str) -> None:
    """The command's machine-readable output, on stdout."""
    if _is_writer():
        sys.stdout.write(text)
