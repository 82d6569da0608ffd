"""The same commands under torchrun: process group, DDP wrapping, rank-0 writes.

Without torchrun's environment every function here is the single-process identity, so
the rest of ptft never branches on whether it is distributed.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as tdist

from ptft.errors import UserError


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_distributed() -> bool:
    return world_size() > 1


def is_writer() -> bool:
    """Only rank 0 writes files and prints: one run directory, one progress bar."""
    return rank() == 0


@contextlib.contextmanager
def session(device_spec: str):
    """Initialise the process group when torchrun started us; yield this rank's device spec."""
    if not is_distributed():
        yield device_spec
        return
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_spec in ("auto", "cuda") and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device_spec = f"cuda:{local_rank}"
    elif device_spec == "auto":
        device_spec = "cpu"
    tdist.init_process_group(backend="nccl" if use_cuda else "gloo")
    try:
        yield device_spec
    finally:
        tdist.destroy_process_group()


def check_global_batch(global_batch: int) -> int:
    """`data.batch_size` is the global batch; each rank takes an equal slice of it."""
    if global_batch % world_size():
        raise UserError(f"data.batch_size: {global_batch} does not split evenly over {world_size()} processes")
    return global_batch


class ShardedBatches:
    """Each rank's slice of the same global batch (same seeded permutation on every rank)."""

    def __init__(self, batches, rank_: int, world: int):
        self._batches, self._rank, self._world = batches, rank_, world
        self.steps_per_epoch = batches.steps_per_epoch

    def batch(self, step: int):
        x, y = self._batches.batch(step)
        size = len(x) // self._world
        start = self._rank * size
        return x[start:start + size], y[start:start + size]


def shard_batches(batches):
    return ShardedBatches(batches, rank(), world_size()) if is_distributed() else batches


def wrap(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around the train step when distributed, else the module itself."""
    if not is_distributed():
        return module
    from torch.nn.parallel import DistributedDataParallel

    # An objective that trains only the encoder leaves the decoder/head without gradients,
    # which DDP treats as an error unless told to look for unused parameters.
    unused = getattr(getattr(module, "objective", None), "uses_only_encoder", False)
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=unused)


def any_rank(flag: bool) -> bool:
    """True on every rank when any rank says so: all stop together, none hangs."""
    if not is_distributed():
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32)
    if tdist.get_backend() == "nccl":
        value = value.cuda()
    tdist.all_reduce(value, op=tdist.ReduceOp.MAX)
    return bool(value.item())


def on_writer(fn, *args, **kwargs):
    """Run fn on rank 0 only and hand its result (or its user error) to every rank."""
    if not is_distributed():
        return fn(*args, **kwargs)
    payload = [None]
    if is_writer():
        try:
            payload = [("ok", fn(*args, **kwargs))]
        except UserError as exc:
            payload = [("error", str(exc))]
    tdist.broadcast_object_list(payload, src=0)
    status, value = payload[0]
    if status == "error":
        raise UserError(value)
    return value

