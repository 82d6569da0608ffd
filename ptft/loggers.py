"""Where a run's metric records go: metrics.jsonl always, TensorBoard and CSV when `train.loggers` asks.

`RunLoggers` is the one place a record is fanned out; each sink is a small class with
`log(step, record)` and `close()`. Only rank 0 writes: on the other ranks the fan-out holds no
sink. Every sink resumes the same way: a resumed run drops what a killed run had logged after the
checkpoint it resumes from (the resumed run logs those steps again), so each step appears once.
"""

from __future__ import annotations

import csv
import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from ptft.distributed import is_writer
from ptft.durable import replacing
from ptft.errors import UserError
from ptft.rundir import RunDir

TENSORBOARD_EXTRA = "pip install 'ptft[tensorboard]'"


class Logger(Protocol):
    def log(self, step: int, record: dict) -> None: ...

    def close(self) -> None: ...


class JsonlLogger:
    """RUN_DIR/metrics.jsonl: one JSON object per record, keys sorted."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = Path(path)
        if resume_step is not None:
            self._truncate_after(resume_step)
        else:
            self.path.unlink(missing_ok=True)

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        with replacing(self.path) as tmp:
            tmp.write_text("".join(line + "\n" for line in kept))

    def log(self, step: int, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")

    def close(self) -> None:
        pass  # each record opens and closes the file: nothing is held between records


class CsvLogger:
    """RUN_DIR/metrics.csv: one row per record, one column per key logged so far ("step" first, then sorted).

    Keys vary between records (val/* only at validations), so the header is the union of the keys
    seen. A record with a new key rewrites the file with the widened header (under a temp name,
    then renamed); any other record appends a row. A wide table is what spreadsheets and
    pandas.read_csv read as it is, where a long step,key,value table would need a pivot first; and
    the rewrites are few, as the set of keys grows only at the first records of a run.
    Cells of keys a record lacks are empty; numbers are written as Python's repr, which reads back exactly.
    """

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = Path(path)
        self.columns: list[str] = []
        if resume_step is None:
            self.path.unlink(missing_ok=True)
        elif self.path.exists():
            rows = [row for row in self._read() if int(row["step"]) <= resume_step]
            self._rewrite(self._header(row.keys() for row in rows), rows)

    def _read(self) -> list[dict[str, str]]:
        with self.path.open(newline="") as f:
            reader = csv.DictReader(f)
            self.columns = list(reader.fieldnames or [])
            return list(reader)

    @staticmethod
    def _header(key_sets) -> list[str]:
        keys = set().union(*key_sets)
        return ["step", *sorted(keys - {"step"})]

    def _rewrite(self, columns: list[str], rows: list[dict]) -> None:
        with replacing(self.path) as tmp, tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, columns, restval="")
            writer.writeheader()
            writer.writerows(rows)
        self.columns = columns

    def log(self, step: int, record: dict) -> None:
        if not set(record) <= set(self.columns):
            old = self._read() if self.path.exists() else []
            self._rewrite(self._header([set(self.columns), record.keys()]), [*old, record])
            return
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, self.columns, restval="").writerow(record)

    def close(self) -> None:
        pass


def summary_writer_class():
    """torch's TensorBoard SummaryWriter, or a UserError naming the extra when tensorboard is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch.utils.tensorboard imports the tensorboard package at once
        raise UserError(f"train.loggers: tensorboard needs the tensorboard package, which is not installed; "
                        f"install it with {TENSORBOARD_EXTRA}, or drop tensorboard from train.loggers") from None
    return SummaryWriter


class TensorBoardLogger:
    """Event files under RUN_DIR/tensorboard/: every number of a record as a scalar at its step.

    Flushed at every record, so all a checkpoint's steps are on disk before it, even if the run is
    then killed. A resumed run writes a new event file in the same directory whose first event
    purges, in TensorBoard's readers, the killed run's events after the resumed step.
    """

    def __init__(self, log_dir: Path, resume_step: int | None = None):
        writer_class = summary_writer_class()
        if resume_step is None:
            shutil.rmtree(log_dir, ignore_errors=True)  # a fresh run's curves start clean, as metrics.jsonl does
        # purge_step hides events at steps >= it; the resumed step's own record stays, as in metrics.jsonl.
        self.writer = writer_class(log_dir=str(log_dir), purge_step=None if resume_step is None else resume_step + 1)

    def log(self, step: int, record: dict) -> None:
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class RunLoggers:
    """Fans each record out to the run's loggers; a context manager that closes them."""

    def __init__(self, loggers: list[Logger]):
        self.loggers = loggers

    def log(self, step: int, record: dict) -> None:
        for logger in self.loggers:
            logger.log(step, record)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()

    def __enter__(self) -> RunLoggers:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_loggers(names: Sequence[str], run: RunDir, resume_step: int | None = None) -> RunLoggers:
    """The loggers `train.loggers` names (jsonl always) for the run in `run`; none off rank 0.

    Args:
        names: `train.loggers`, e.g. ["jsonl", "csv"].
        run: the run directory.
        resume_step: the step a resumed run starts from (records after it are dropped); None for a new run
            (the previous files, if any, are deleted).
    Raises:
        UserError: tensorboard is asked for but not installed.
    """
    if not is_writer():
        return RunLoggers([])
    loggers: list[Logger] = [JsonlLogger(run.metrics, resume_step)]
    if "csv" in names:
        loggers.append(CsvLogger(run.metrics_csv, resume_step))
    if "tensorboard" in names:
        loggers.append(TensorBoardLogger(run.tensorboard, resume_step))
    return RunLoggers(loggers)


def check_loggers(names: Sequence[str]) -> None:
    """Refuse, before any work, loggers whose package is missing (raises UserError naming the extra)."""
    if "tensorboard" in names:
        summary_writer_class()


class Throughput:
    """Samples per second over a logging window, timed from the window's first step to its record.

    The clock is read where the loop already waits for the device (a record reads its losses with
    .item(), and the next window starts after that), so timing adds no sync of its own.

    Args:
        samples_per_step: examples of one optimizer step over all ranks (global batch x accumulate).
    """

    def __init__(self, samples_per_step: int):
        self.samples_per_step = samples_per_step
        self._start: float | None = None

    def start(self) -> None:
        self._start = time.perf_counter()

    def record(self, steps: int) -> dict[str, float]:
        """`perf/samples_per_s` of the last `steps` steps, since `start`; empty if never started."""
        if self._start is None or steps == 0:
            return {}
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        return {"perf/samples_per_s": steps * self.samples_per_step / elapsed}
