"""Batching by index over tensors on the training device, or rows in host memory (data.placement).

A training batch is a pure function of (data, batch size, seed, global step): resuming at
step s needs nothing but s. Images stay in their stored dtype (uint8 takes a quarter of
float32's memory) and are converted to float32 in [0, 1] on the device one batch at a time.
Which examples a batch holds (the index drawing) does not depend on where they live: rows in
host memory (`placement.HostRows`) give the same batches, copied over one step ahead.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Protocol

import torch

from ptft.data.placement import HostRows, Prefetcher
from ptft.data.sampling import BalancedSampler


class Batches(Protocol):
    """What the training loop draws from: batch `step` is a pure function of `step`, so resuming needs only it."""

    steps_per_epoch: int

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of global step `step`: x (B, C, H, W) float32 in [0, 1], y (B,) int64."""
        ...


def to_float(x: torch.Tensor | HostRows) -> torch.Tensor:
    """Images as float32 in [0, 1]: uint8 is divided by 255, floating point is cast; rows in
    host memory are read and copied to their device first.

    Raises:
        TypeError: any other dtype.
    """
    if isinstance(x, HostRows):
        x = x.read().to(x.device, non_blocking=True)
    if x.dtype == torch.uint8:
        return x.float().div_(255)
    if x.is_floating_point():
        return x.float()
    raise TypeError(f"images must be uint8 or floating point, got {x.dtype}")


def _epoch_seed(seed: int, epoch: int) -> int:
    # Hashing keeps the per-epoch streams of different seeds apart, and apart from the
    # engine's per-step noise seeds, which are small arithmetic functions of the same seed.
    digest = hashlib.sha256(f"ptft-data-order:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class DeviceBatches:
    """Shuffled training batches addressed by global step.

    Each epoch is a fresh permutation drawn on the CPU (identical on every device) from a
    generator seeded with (seed, epoch). Batches drop the last partial batch, except when
    the data is smaller than one batch: then every step is one batch of all of it.

    Args:
        x: (N, C, H, W) images, uint8 or float, on the training device, or HostRows bound for it.
        y: (N,) int64 labels on the training device.
        batch_size: examples per batch.
        seed: seeds the data order (the run seed).
        sampler: data.sampler; balanced draws each batch with replacement, classes equally likely
            (ptft.data.sampling), still a pure function of (seed, step).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int, sampler: str = "random"):
        if len(x) != len(y) or len(x) == 0:
            raise ValueError(f"need as many labels as images, and at least one: got {len(x)} and {len(y)}")
        self.x, self.y, self.seed = x, y, seed
        self.batch_size = min(batch_size, len(x))
        self.steps_per_epoch = len(x) // self.batch_size
        self._cached_epoch: int | None = None
        self._permutation: torch.Tensor | None = None
        # data.placement host: rows are gathered on the CPU, by CPU indices, and sent a step ahead.
        self._on_host = isinstance(x, HostRows)
        self._prefetch = Prefetcher(x.device) if self._on_host else None
        self._host_y = y.cpu() if self._on_host else None
        self._balanced = BalancedSampler(y, seed) if sampler == "balanced" else None

    def permutation(self, epoch: int) -> torch.Tensor:
        """(N,) int64 example order of `epoch`, where the images are (the CPU for HostRows); one randperm per epoch."""
        if epoch != self._cached_epoch:
            generator = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
            order = torch.randperm(len(self.x), generator=generator)
            self._permutation = order if self._on_host else order.to(self.x.device)
            self._cached_epoch = epoch
        return self._permutation

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of global step `step`: x (B, C, H, W) float32 in [0, 1], y (B,) int64."""
        return self.slice(step, 0, self.batch_size)

    def slice(self, step: int, offset: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions [offset, offset + size) of step `step`'s batch."""
        if self._on_host:
            x, y = self._prefetch.get((step, offset, size), self._host_slice)
            return to_float(x), y
        index = self.indices(step, offset, size)
        return to_float(self.x[index]), self.y[index]

    def indices(self, step: int, offset: int, size: int) -> torch.Tensor:
        """(size,) int64 example indices at positions [offset, offset + size) of step `step`'s batch."""
        if self._balanced is not None:  # the whole global batch is drawn, so every rank's slice agrees
            return self._balanced.indices(step, self.batch_size)[offset:offset + size]
        epoch, position = divmod(step, self.steps_per_epoch)
        start = position * self.batch_size + offset
        return self.permutation(epoch)[start:start + size]

    def _host_slice(self, key: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        # (x, y) of positions key = (step, offset, size) in host memory (x pinned on CUDA).
        index = self.indices(*key).cpu()
        return self.x[index].read(), self._host_y[index]

    def shard(self, rank: int, world_size: int) -> Batches:
        """Rank `rank`'s slice of each batch, of `world_size` equal slices (itself for one process).

        Rank r takes positions [r * b, (r + 1) * b) of the global batch, b = batch_size / world_size,
        from the same seeded permutation on every rank: together the ranks see exactly the batch
        a single process would.

        Raises:
            ValueError: the batch does not split into `world_size` equal slices.
        """
        if world_size == 1:
            return self
        if self.batch_size % world_size:
            raise ValueError(f"global batch {self.batch_size} does not split over {world_size} processes")
        size = self.batch_size // world_size
        return _Shard(self, rank * size, size)


class _Shard:
    """One rank's fixed slice of every batch of a DeviceBatches (see `DeviceBatches.shard`)."""

    def __init__(self, batches: DeviceBatches, offset: int, size: int):
        self._batches, self._offset, self._size = batches, offset, size
        self.steps_per_epoch = batches.steps_per_epoch

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of this rank at global step `step`: x (b, C, H, W) float32 in [0, 1], y (b,)."""
        return self._batches.slice(step, self._offset, self._size)


def iterate_eval(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Sequential (x, y) batches over a whole split, the last partial one included.

    x is float32 in [0, 1], on the split's device (HostRows: read onto theirs, one batch at a
    time), and y beside it; for float data the batches are views into the split, so callers must
    not modify them in place.
    """
    for start in range(0, len(x), batch_size):
        xb = to_float(x[start:start + batch_size])
        yield xb, y[start:start + batch_size].to(xb.device, non_blocking=True)
