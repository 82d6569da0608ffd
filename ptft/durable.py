"""Durability on disk: a file's bytes or a directory's entries (new files, renames) survive a crash,
and a file rewritten in place is never seen half written."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


def fsync_path(path: Path | str) -> None:
    """fsync a file or a directory by path (for a directory: its entries, so a rename is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary path beside `path`, renamed over it when the block completes (removed if it fails):
    a kill mid-write leaves the old file whole, never half of the new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
