"""Where results go: records on stdout or in a file, and files that appear only when complete.

Every file written for the user goes to a temporary name beside its final one and is renamed
when complete (as checkpoints are), so an error or Ctrl-C never leaves a partial file behind.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from ptft.errors import UserError

RECORD_FORMATS = ("jsonl", "csv")


@contextlib.contextmanager
def atomic_file(path: Path | str, option: str = "--out") -> Iterator[Path]:
    """A temporary path beside `path`, renamed to `path` if the block completes, deleted otherwise.

    The temporary name keeps the suffix, for writers that choose a format by it (numpy's .npy).

    Raises:
        UserError: `path` is a folder, or its folder does not exist.
    """
    path = check_out_path(path, option)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def check_out_path(path: Path | str, option: str = "--out") -> Path:
    """`path` as a Path, if a file can be written there (checked before any work, and again on writing).

    Raises:
        UserError: `path` is a folder, or its folder does not exist.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{option} '{path}': is a folder (expected a file name)")
    if not path.parent.is_dir():
        raise UserError(f"{option} '{path}': its folder '{path.parent}' does not exist")
    return path


def check_record_format(fmt: str) -> None:
    if fmt not in RECORD_FORMATS:
        raise UserError(f"--format: expected one of {', '.join(RECORD_FORMATS)}, got {fmt!r}")


class RecordWriter:
    """One record per input: a JSON object per line, or a CSV row under a header of `columns`."""

    def __init__(self, stream: TextIO, fmt: str, columns: list[str]):
        self._stream, self._fmt = stream, fmt
        if fmt == "csv":
            self._csv = csv.DictWriter(stream, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
            self._csv.writeheader()

    def write(self, record: dict) -> None:
        if self._fmt == "jsonl":
            self._stream.write(json.dumps(record) + "\n")
        else:  # nested values (top_k) as JSON text in their cell
            self._csv.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in record.items()})


@contextlib.contextmanager
def open_records(out: Path | None, fmt: str, columns: list[str]) -> Iterator[RecordWriter]:
    """Records to `out` (complete or absent) or, without it, to stdout as they come."""
    check_record_format(fmt)
    if out is None:
        yield RecordWriter(sys.stdout, fmt, columns)
        sys.stdout.flush()
        return
    with atomic_file(out) as tmp, open(tmp, "w", newline="") as stream:
        yield RecordWriter(stream, fmt, columns)
