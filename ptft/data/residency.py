"""Rows of the memory-mapped decode cache read without making the cache resident in this process.

Every page of a mapped file a process touches counts in its resident set (RSS) until the kernel
needs the memory back, and on a machine with spare RAM it never does. Worse, a fault maps the
whole page-cache folio around the touched page (up to 2 MiB on current kernels): gathering 32
random 224 px rows through the mapping made 100 MiB of it resident. An epoch of data.placement
host over a 20 GiB cache would show 20 GiB of RSS, which is what schedulers, containers and OOM
killers look at.

So a batch of rows of a registered mapping is read with `preadv` into the batch's own buffer:
the file's pages stay in the kernel's page cache (shared, reclaimable, a second read costs a
memory copy) and none is mapped into this process. One system call per row: the copy of the
row's bytes, not the call, is the cost (a 147 KiB row copies in ~15 us, the call adds ~1 us).
A pass that does read a whole mapping (the row digests of an entry written before them) hands
its pages back afterwards with `release_all` (madvise MADV_DONTNEED; the cache is mapped
copy-on-write and never written, so a dropped page reads back the same bytes from the file).
"""

from __future__ import annotations

import mmap
import os
import threading
import weakref
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class _Mapping:
    start: int  # address of the mapping's first byte
    end: int  # one past its last
    file_offset: int  # offset in the file of the mapping's first byte
    fd: int  # the file, open for reading (closed when the mapping is)
    mapping: weakref.ref  # the mmap.mmap; dead once numpy has dropped it


_MAPPINGS: list[_Mapping] = []
_LOCK = threading.Lock()


def track(array: np.ndarray) -> None:
    """Register the file mapping behind `array` (a numpy memmap from np.load(mmap_mode=...)); others are ignored."""
    mapped = getattr(array, "_mmap", None)
    if not isinstance(mapped, mmap.mmap) or getattr(array, "filename", None) is None:
        return
    view = np.frombuffer(mapped, dtype=np.uint8)  # its address; the export ends with the view
    start = view.ctypes.data
    del view
    file_offset = array.offset - (array.ctypes.data - start)  # the array's data is array.offset into the file
    with _LOCK:
        if any(m.start == start and m.mapping() is mapped for m in _MAPPINGS):
            return
        try:
            # The path names the mapped file, or a complete file of the same key (the same pixels) that
            # another process renamed over it; if it is gone already, rows are read through the mapping.
            fd = os.open(array.filename, os.O_RDONLY)
        except OSError:
            return
        entry = _Mapping(start, start + len(mapped), file_offset, fd, weakref.ref(mapped))
        weakref.finalize(mapped, _forget, entry)
        _MAPPINGS.append(entry)


def read_rows(part: torch.Tensor, rows: torch.Tensor, out: torch.Tensor) -> bool:
    """Rows `rows` of `part` into `out` ((len(rows), *part.shape[1:]), contiguous, CPU) by reading the file
    behind `part`'s mapping; False (nothing read) when `part` is not a registered mapping's contiguous rows."""
    if not hasattr(os, "preadv") or not part.is_contiguous() or out.dtype != part.dtype:
        return False  # (os.preadv: Linux and the BSDs) the caller gathers through the mapping instead
    entry = _entry_at(part.data_ptr())
    if entry is None:
        return False
    if len(rows) == 0:
        return True
    row_bytes = part[0].nbytes if len(part) else 0
    first_row = entry.file_offset + part.data_ptr() - entry.start  # file offset of part's row 0
    buffer = memoryview(out.numpy()).cast("B")
    for j, row in enumerate(rows.tolist()):
        target = buffer[j * row_bytes:(j + 1) * row_bytes]
        if os.preadv(entry.fd, [target], first_row + row * row_bytes) != row_bytes:
            raise OSError(f"short read of row {row} from the decode cache (was the file truncated?)")
    return True


def release_all() -> None:
    """Hand every registered mapping's resident pages back (after a pass that read a whole cache)."""
    with _LOCK:
        for entry in _MAPPINGS:
            mapped = entry.mapping()
            if mapped is not None and not mapped.closed and hasattr(mmap, "MADV_DONTNEED"):
                mapped.madvise(mmap.MADV_DONTNEED)


def _entry_at(address: int) -> _Mapping | None:
    with _LOCK:
        return next((m for m in _MAPPINGS if m.start <= address < m.end and m.mapping() is not None), None)


def _forget(entry: _Mapping) -> None:
    with _LOCK:
        _MAPPINGS[:] = [m for m in _MAPPINGS if m is not entry]
    os.close(entry.fd)
