"""Items -> batches of the model's input, in input order, in constant memory.

Files are decoded in chunks of one batch each, by a pool of worker processes when the job is
large enough to repay starting them, with at most a few chunks in flight: memory holds a few
batches of pixels whatever the number of inputs. A split of the run's own dataset is sliced
from its tensors. Either way a batch carries the decoded images and, for each item, the reason
it could not be decoded (or None).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ptft.console import stderr
from ptft.errors import UserError
from ptft.inference.decode import decode_chunk
from ptft.inference.inputs import Item, expand_inputs
from ptft.inference.preprocess import Preprocessing

MAX_WORKERS = 8
SPLITS = ("test", "val")
CHUNKS_IN_FLIGHT_PER_WORKER = 2
POOL_STARTUP_SECONDS = 1.0  # what starting decoding processes costs, roughly


@dataclass
class Batch:
    """items (B,); images (G, C, H, W) for the G items whose error is None, in item order."""

    items: list[Item]
    images: torch.Tensor
    errors: list[str | None]


def file_batches(items: list[Item], prep: Preprocessing, batch_size: int, workers: int | None) -> Iterator[Batch]:
    """Decoded batches of `items`, in order.

    `workers`: decoding processes; 0 decodes in this process; None decides after the first
    chunk, starting a pool only when the rest would take longer than starting one.
    """
    chunks = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    paths = [[item.path for item in chunk] for chunk in chunks]
    decoded = _decoded_in_order(paths, (prep.decode_shape, prep.resize, prep.pixel_rules), workers)
    for chunk, (images, errors) in zip(chunks, decoded):
        yield Batch(chunk, torch.from_numpy(images), errors)


def _decoded_in_order(chunks: list[list[str]], rule: tuple, workers: int | None) -> Iterator[tuple]:
    # rule: (shape (C, H, W), resize, pixel rules), the arguments after the paths of every decode_chunk call
    if workers is None and chunks:
        started = time.perf_counter()
        yield decode_chunk(chunks[0], *rule)
        remaining = (time.perf_counter() - started) * (len(chunks) - 1)
        # One core stays with this process, which runs the model and writes the records meanwhile: on
        # 2 cores, 2 decoders beside the model's threads made predict 3x slower than no pool at all.
        spare = min((os.cpu_count() or 1) - 1, MAX_WORKERS, len(chunks) - 1)
        # Starting workers costs about a second: small jobs finish sooner in this process.
        workers = spare if spare >= 1 and remaining > POOL_STARTUP_SECONDS else 0
        chunks = chunks[1:]
    if not workers:
        yield from (decode_chunk(chunk, *rule) for chunk in chunks)
    else:
        yield from _pool_decoded(chunks, rule, workers)


def _pool_decoded(chunks: list[list[str]], rule: tuple, workers: int) -> Iterator[tuple]:
    # spawn, not fork: the parent runs torch's thread pools and rich's refresh thread, which a
    # forked child could inherit mid-lock. A spawned worker imports decode.py (PIL, numpy) and
    # the caller's __main__ module (ptft's CLI: no torch), so it starts in well under a second.
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.submit(decode_chunk, chunk, *rule))
            if len(pending) >= workers * CHUNKS_IN_FLIGHT_PER_WORKER:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # --strict or an error stops early: drop the rest


def split_batches(name: str, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> Iterator[Batch]:
    """Batches of a split of the run's dataset; items are named `<split>:<index>`."""
    for start in range(0, len(x), batch_size):
        labels = y[start:start + batch_size].tolist()
        items = [Item(f"{name}:{start + i}", label) for i, label in enumerate(labels)]
        yield Batch(items, x[start:start + batch_size].cpu(), [None] * len(items))


class _Bar:
    def __init__(self, progress: Progress | None, task):
        self._progress, self._task = progress, task

    def advance(self, count: int) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, count)


@contextlib.contextmanager
def progress(total: int, what: str) -> Iterator[_Bar]:
    """A progress bar over `total` images on stderr, off when stderr is not a terminal."""
    if not sys.stderr.isatty():
        yield _Bar(None, None)
        return
    columns = (TextColumn(what), MofNCompleteColumn(), BarColumn(), TimeElapsedColumn(), TextColumn("eta"),
               TimeRemainingColumn())
    with Progress(*columns, console=stderr, transient=True) as bar:
        yield _Bar(bar, bar.add_task(what, total=total))


def run_batches(batches: Iterator[Batch], total: int, what: str, handle: Callable[[Batch], None]) -> None:
    """Call `handle` on every batch under a progress bar."""
    with progress(total, what) as bar:
        for batch in batches:
            handle(batch)
            bar.advance(len(batch.items))


def input_batches(target, inputs: list[str], *, split: str | None, batch_size: int,
                  workers: int | None) -> tuple[int, Iterator[Batch]]:
    """(number of inputs, their batches) for INPUT arguments or a split of the run's dataset.

    Raises:
        UserError: both or neither given, an unknown split, or bad INPUT arguments.
    """
    if split is None:
        items = expand_inputs(inputs, target.prep.class_names)
        return len(items), file_batches(items, target.prep, batch_size, workers)
    if inputs:
        raise UserError(f"--split {split}: give either INPUT paths or --split, not both")
    if split not in SPLITS:
        raise UserError(f"--split: expected one of {', '.join(SPLITS)}, got {split!r}")
    from ptft.data import build_data

    data = getattr(build_data(target.cfg.data, "cpu"), split)
    return len(data.x), split_batches(split, data.x, data.y, batch_size)
