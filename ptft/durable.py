"""Durability on disk: a file's bytes or a directory's entries (new files, renames) survive a crash."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: Path | str) -> None:
    """fsync a file or a directory by path (for a directory: its entries, so a rename is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
