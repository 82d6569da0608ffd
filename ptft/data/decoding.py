"""A folder's image files -> one uint8 (N, C, H, W) array, decoded on every core, each file read once.

Files are decoded in chunks by a pool of worker processes (spawned, not forked: the parent may
run torch's thread pools), each file in its own colour (grey C = 1, colour C = 3) by the pixel
rules of `ptft.data.images`. The parent puts the chunks together in file order: colour anywhere
makes every image RGB (grey replicated, exactly what PIL's convert("RGB") gives), and without
`image_size` every image must share one size. No torch here, so workers start in a fraction of
a second.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ptft.data import images
from ptft.errors import DataError

CHUNK_FILES = 64  # files per task: large enough to amortise a task's overhead, small for a smooth bar
MAX_CHUNKS = 8192  # pooled chunks stay mapped until assembled: well under the kernel's ~65,000 mappings
POOL_STARTUP_SECONDS = 1.0  # what starting the worker processes costs, roughly


@dataclass(frozen=True)
class DecodeOptions:
    """The data.* settings that decide what a file decodes to, and what to do with unreadable ones."""

    image_size: int | None = None  # fit every image to this size squared; None: they must share one
    resize: str = "crop"  # how: images.RESIZE_RULES
    skip_bad_files: bool = False  # skip (and list) unreadable files instead of refusing the folder
    decoder: str = "auto"  # images.DECODERS: how JPEGs are decoded (the same pixels either way)

    @property
    def size(self) -> tuple[int, int] | None:
        return None if self.image_size is None else (self.image_size, self.image_size)

    def pixel_rules(self) -> dict:
        """What the decoded pixels depend on besides the files: part of a decode cache's key."""
        return {"rules_version": images.RULES_VERSION, "image_size": self.image_size,
                "resize": self.resize if self.image_size is not None else None}


@dataclass
class Decoded:
    """The readable files' pixels in file order, and why each unreadable file could not be read."""

    pixels: list[np.ndarray]  # (C_i, H, W) uint8 per readable file, C_i its own channels
    bad: dict[int, str] = field(default_factory=dict)  # index into the files -> the reason
    seconds: float = 0.0

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(N, C, H, W) of the whole array: RGB when any image is colour."""
        channels = max(p.shape[0] for p in self.pixels)
        return (len(self.pixels), channels, *self.pixels[0].shape[1:])

    def fill(self, out: np.ndarray) -> np.ndarray:
        """Write every image into `out` (of `shape`), grey ones replicated when `out` is RGB."""
        for i, pixels in enumerate(self.pixels):
            out[i] = pixels  # (1, H, W) broadcasts into (3, H, W)
        return out

    def array(self) -> np.ndarray:
        """The (N, C, H, W) array in memory."""
        return self.fill(np.empty(self.shape, dtype=np.uint8))


def decode_chunk(paths: list[str], size: tuple[int, int] | None, resize: str,
                 decoder: str = "auto") -> list[np.ndarray | str]:
    """Decode files (in a worker process): (C, H, W) uint8 pixels in each file's own colour, or why
    the file could not be read."""
    from PIL import Image, UnidentifiedImageError

    out: list[np.ndarray | str] = []
    for path in paths:
        try:
            out.append(images.read_image(Path(path), None, size, resize, decoder=decoder).transpose(2, 0, 1))
        except DataError as exc:
            out.append(str(exc))
        # PIL refuses images of over 2 * Image.MAX_IMAGE_PIXELS pixels as decompression bombs.
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
            out.append(f"data.root: cannot read image '{path}' ({exc})")
    return out


def decode_chunk_to_file(paths: list[str], size: tuple[int, int] | None, resize: str, decoder: str,
                         scratch: str) -> tuple[str | None, list[tuple | str]]:
    """`decode_chunk` in a worker, its pixels written to one file in `scratch` instead of sent back
    through a pipe (pickled, they would be copied four times): (the file, or None when no file was
    readable; for each path the shape (C, H, W) of its pixels in the file, in order, or why it could
    not be read)."""
    results = decode_chunk(paths, size, resize, decoder)
    pixels = [result for result in results if not isinstance(result, str)]
    if not pixels:
        return None, results
    with tempfile.NamedTemporaryFile(dir=scratch, suffix=".u8", delete=False) as out:
        for array in pixels:
            out.write(np.ascontiguousarray(array).data)
    return out.name, [result if isinstance(result, str) else result.shape for result in results]


def _read_chunk_file(file: str | None, results: list[tuple | str]) -> list[np.ndarray | str]:
    """The arrays `decode_chunk_to_file` wrote: views of the file, mapped, then unlinked (the mapping
    keeps its pages; nothing is left behind on disk)."""
    if file is None:
        return results
    data = np.memmap(file, dtype=np.uint8, mode="r")
    os.unlink(file)
    out, offset = [], 0
    for result in results:
        if isinstance(result, str):
            out.append(result)
            continue
        size = math.prod(result)
        out.append(data[offset:offset + size].reshape(result))
        offset += size
    return out


def decode_files(files: list[str | Path], options: DecodeOptions, *, workers: int | None = None,
                 chunk_files: int = CHUNK_FILES, scratch: str | Path | None = None) -> Decoded:
    """Decode `files` in order, with a progress bar on stderr when it is a terminal.

    Args:
        files: image files, in dataset order.
        options: size rule and what to do with unreadable files.
        workers: decoding processes; 0 decodes in this process; None uses every core when the
            job is large enough to repay starting them (judged from the first chunk).
        chunk_files: files per task (more for a huge folder: each pooled task keeps one mapping).
        scratch: a folder for the workers' chunk files (default: the system's temporary folder).

    Raises:
        DataError: an unreadable file (unless skipped), no readable file at all, or images of
            different sizes without `image_size` (each names the files).
    """
    started = time.perf_counter()
    chunk_files = max(chunk_files, -(-len(files) // MAX_CHUNKS))
    chunks = [[str(path) for path in files[i:i + chunk_files]] for i in range(0, len(files), chunk_files)]
    decoded = Decoded([])
    first_size: dict = {}  # (H, W) -> the first file of that size
    with _progress(len(files)) as advance:
        index = 0
        for results in _decoded_chunks(chunks, options, workers, scratch):
            for result in results:
                _take(decoded, files, index, result, options, first_size)
                index += 1
            advance(index)
    if not decoded.pixels:
        first = decoded.bad[min(decoded.bad)].removeprefix("data.root: ") if decoded.bad else "no files"
        raise DataError(f"data.root: none of the {len(files)} image files could be read (first: {first})")
    decoded.seconds = time.perf_counter() - started
    return decoded


def _take(decoded: Decoded, files: list, index: int, result, options: DecodeOptions, first_size: dict) -> None:
    if isinstance(result, str):
        if not options.skip_bad_files:
            raise DataError(result)
        decoded.bad[index] = result
        return
    size = result.shape[1:]
    first_size.setdefault(size, files[index])
    if len(first_size) > 1:
        (a_size, a), (b_size, b) = first_size.items()
        root = os.path.commonpath([a, b])
        raise DataError(f"data.image_size: images in '{root}' differ in size ('{a}' is {a_size[1]}x{a_size[0]}, "
                        f"'{b}' is {b_size[1]}x{b_size[0]}); set data.image_size to resize them all")
    decoded.pixels.append(result)


def _decoded_chunks(chunks: list[list[str]], options: DecodeOptions, workers: int | None,
                    scratch: str | Path | None) -> Iterator[list]:
    """Each chunk's results, in order: in this process, or by a pool when `workers` (or the first chunk's
    timing) says so."""
    if workers is None and chunks:
        started = time.perf_counter()
        yield decode_chunk(chunks[0], options.size, options.resize, options.decoder)
        remaining = (time.perf_counter() - started) * (len(chunks) - 1)
        cores = min(_cores(), len(chunks) - 1)
        workers = cores if cores > 1 and remaining > POOL_STARTUP_SECONDS else 0
        chunks = chunks[1:]
    if not workers:
        yield from (decode_chunk(chunk, options.size, options.resize, options.decoder) for chunk in chunks)
        return
    # spawn, not fork: a forked child could inherit torch's or rich's threads mid-lock.
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    folder = tempfile.TemporaryDirectory(prefix="ptft-decode-", dir=scratch)
    try:
        # map submits every chunk at once: the results are all kept anyway, and in order.
        n = len(chunks)
        for file, results in pool.map(decode_chunk_to_file, chunks, [options.size] * n, [options.resize] * n,
                                      [options.decoder] * n, [folder.name] * n):
            yield _read_chunk_file(file, results)
    finally:
        # A refused file stops the decode: the chunks not started yet are dropped.
        pool.shutdown(wait=True, cancel_futures=True)
        folder.cleanup()


def _cores() -> int:
    # The cores this process may run on (a container or taskset may allow fewer than the machine has).
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextlib.contextmanager
def _progress(total: int) -> Iterator[Callable[[int], None]]:
    """advance(done): a bar with files/s and ETA on stderr, off when stderr is not a terminal
    (logs, CI, pipes) and on every torchrun rank but 0, as `ptft.console.progress_bar`."""
    if not (os.environ.get("RANK", "0") == "0" and sys.stderr.isatty()):
        yield lambda done: None
        return
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)
    from rich.text import Text

    from ptft.console import stderr

    class FilesPerSecond(ProgressColumn):
        def render(self, task) -> Text:
            return Text(f"{task.speed or 0:,.0f} files/s")  # speed is None until two updates

    columns = (TextColumn("decode"), MofNCompleteColumn(), BarColumn(), FilesPerSecond(), TimeElapsedColumn(),
               TextColumn("eta"), TimeRemainingColumn())
    with Progress(*columns, console=stderr, transient=True) as progress:
        task = progress.add_task("decode", total=total)
        yield lambda done: progress.update(task, completed=done)
