"""data.placement: where the images of the splits a stage reads live, and how a batch reaches the device.

    device   each split is one tensor on the training device, batched by index there: no copy per
             step, the fastest path while the data fits
    host     the splits stay in host memory (for an imagefolder, the memory-mapped decode cache
             itself, never copied whole); each batch is gathered on the CPU (into pinned memory on
             CUDA) and copied to the device, non-blocking on a side stream, the next step's batch
             already in flight: data larger than the device
    auto     device when the splits fit DEVICE_FRACTION of the free device memory, else host; on
             the CPU always device (the images are where the model is already)

A split no stage part reads is not placed at all: it stays as `HostRows` over the dataset's arrays,
each batch read onto the device only if something reads it (evaluate streams its split that way).
Both placements give the same batches, bitwise: the same rows, picked by the same index drawing
(ptft.data.batches), differ only in where they are gathered.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator

import torch

from ptft.console import note
from ptft.data import residency
from ptft.data.tensors import DataBundle, TensorSplit

SPLITS = ("unlabelled", "labelled", "val", "test")
# Of the free device memory, what auto lets the images take: the rest is for the model, its
# optimizer state and the activations of a batch.
DEVICE_FRACTION = 0.5


class HostRows:
    """Rows of CPU image arrays, read on demand: a split of a dataset without a copy of its images.

    `parts` ((N_i, C, H, W) CPU tensors: a memory-mapped decode cache, or the dataset's arrays) are
    seen as one concatenated array, and row j of this view is its row `rows[j]`. Selecting rows
    (`x[a:b]`, `x[index]`, `x[mask]`) gives another HostRows and reads nothing; `read` gathers them
    into host memory, and `batches.to_float` reads them onto `device`, where their batches go.

    Args:
        parts: the arrays, same dtype and image shape.
        rows: (K,) int64 rows of their concatenation, on the CPU.
        device: the training device.
    """

    def __init__(self, parts: list[torch.Tensor], rows: torch.Tensor, device: torch.device | str):
        self.parts, self.rows, self.device = parts, rows, torch.device(device)
        # ends[i]: one past part i's last row in the concatenation.
        self._ends = torch.tensor([len(p) for p in parts]).cumsum(0)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.rows), *self.parts[0].shape[1:]))

    @property
    def dtype(self) -> torch.dtype:
        return self.parts[0].dtype

    @property
    def nbytes(self) -> int:
        return self.shape.numel() * self.parts[0].element_size()

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key) -> HostRows:
        if isinstance(key, torch.Tensor):
            key = key.cpu()
        return HostRows(self.parts, self.rows[key], self.device)

    def read(self) -> torch.Tensor:
        """The rows (K, C, H, W) gathered into host memory, pinned when they are bound for a GPU."""
        out = torch.empty(self.shape, dtype=self.dtype, pin_memory=self.device.type == "cuda")
        if len(self.parts) == 1:
            return _gather(self.parts[0], self.rows, out)
        part_of = torch.bucketize(self.rows, self._ends, right=True)  # (K,) which part holds each row
        for i, part in enumerate(self.parts):
            where = (part_of == i).nonzero().squeeze(1)
            start = int(self._ends[i]) - len(part)
            out[where] = _gather(part, self.rows[where] - start, torch.empty((len(where), *out.shape[1:]),
                                                                             dtype=out.dtype))
        return out

    def split(self, size: int) -> Iterator[torch.Tensor]:
        """Consecutive chunks of `size` rows, each read into host memory (as Tensor.split, for statistics)."""
        for start in range(0, len(self), size):
            yield self[start:start + size].read()


def _gather(part: torch.Tensor, rows: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Rows `rows` of `part` into `out`: read from the file when `part` is a mapped decode cache (none of
    its pages then becomes resident here, ptft.data.residency), else indexed in memory."""
    if residency.read_rows(part, rows, out):
        return out
    return torch.index_select(part, 0, rows, out=out)


def host_rows(arrays: Iterable[torch.Tensor], rows: torch.Tensor | None, device) -> HostRows:
    """Rows `rows` (all when None) of the concatenation of `arrays` (CPU), nothing read."""
    parts = list(arrays)
    total = sum(len(p) for p in parts)
    return HostRows(parts, torch.arange(total) if rows is None else rows.cpu(), device)


def to_device(x: HostRows, device) -> torch.Tensor:
    """The rows as one tensor on `device`: the copy data.placement device makes, once per stage."""
    whole = len(x.parts) == 1 and torch.equal(x.rows, torch.arange(len(x.parts[0])))
    return (x.parts[0] if whole else x.read()).to(device)  # a whole array needs no gather first


def place_splits(bundle: DataBundle, reads: Iterable[str], device, setting: str) -> DataBundle:
    """`bundle` with the splits named in `reads` placed as data.placement `setting` says.

    The others are left as they are: HostRows over the dataset's arrays, labels on the CPU.
    A split shared by two names (labelled is unlabelled without a label budget) stays shared.
    """
    device = torch.device(device)
    names = [name for name in SPLITS if name in set(reads)]
    distinct = {id(getattr(bundle, name)): getattr(bundle, name) for name in names}
    nbytes = sum(split.x.nbytes for split in distinct.values())
    placement = resolve_placement(setting, device, nbytes)
    if names:
        note(f"data: {', '.join(names)} ({nbytes / 2**20:,.1f} MiB of images) "
             f"{'on ' + str(device) if placement == 'device' else 'in host memory, batches copied to ' + str(device)}"
             f" (data.placement {setting})")
    placed = {key: _place(split, device, placement) for key, split in distinct.items()}
    return dataclasses.replace(bundle, **{name: placed[id(getattr(bundle, name))] for name in names})


def resolve_placement(setting: str, device: torch.device, nbytes: int) -> str:
    """"device" or "host" for data.placement `setting` and `nbytes` of images bound for `device`."""
    if setting != "auto":
        return setting
    if device.type != "cuda":
        return "device"  # the CPU holds them either way; MPS shares the host's memory
    free, _ = torch.cuda.mem_get_info(device)
    return "device" if nbytes <= DEVICE_FRACTION * free else "host"


def _place(split: TensorSplit, device: torch.device, placement: str) -> TensorSplit:
    # Labels go to the device either way: they are small, and k-NN, class weights and losses use them there.
    x = to_device(split.x, device) if placement == "device" else HostRows(split.x.parts, split.x.rows, device)
    return TensorSplit(x, split.y.to(device))  # HostRows: a new view, in case the bundle was built for another device


class Prefetcher:
    """Host batches copied to the device one step ahead: step s's batch comes back, step s + 1's is sent.

    On CUDA the copy runs on a side stream from pinned memory, and the consuming stream waits on an
    event; on the CPU it is a plain (free) `.to`, the same code path. Resuming or an unexpected key
    simply loads the asked batch first: batches are pure functions of the key.

    Args:
        device: the training device.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._pending: tuple[tuple, tuple] | None = None

    def get(self, key: tuple[int, ...], load: Callable[[tuple], tuple[torch.Tensor, torch.Tensor]]):
        """(x, y) of `key` = (step, ...) on the device; load(key) gives them in host memory."""
        if self._pending is not None and self._pending[0] == key:
            sent = self._pending[1]
        else:
            sent = self._send(*load(key))
        following = (key[0] + 1, *key[1:])
        self._pending = (following, self._send(*load(following)))
        return self._received(*sent)

    def _send(self, x: torch.Tensor, y: torch.Tensor) -> tuple:
        if self._stream is None:
            return x.to(self.device), y.to(self.device), None
        with torch.cuda.stream(self._stream):
            x, y = x.to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._stream)
        return x, y, done

    def _received(self, x: torch.Tensor, y: torch.Tensor, done) -> tuple[torch.Tensor, torch.Tensor]:
        if done is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(done)
            # Made on the side stream, used on this one: the allocator must not reuse them early.
            x.record_stream(stream)
            y.record_stream(stream)
        return x, y
