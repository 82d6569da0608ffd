"""The same commands under torchrun: process group, DDP wrapping, rank-0 writes.

Without torchrun's environment every function here is the single-process identity, so the
rest of ptft calls them unconditionally and never branches on whether it is distributed.

Invariants that keep ranks from diverging or hanging: every rank reaches the same
collectives in the same order (saves, checks and stop decisions happen at the same steps),
and every decision that could differ between ranks (non-finite loss, interrupt, early stop)
is taken once for all of them. Validation and evaluate are sharded: each rank computes sums
over its slice of whole batches (`shard_rows`), and the sums over ranks are one process's.
No rank waits on a collective while another prepares data, save for a download.
"""

from __future__ import annotations

import contextlib
import datetime
import os

import torch
import torch.distributed as tdist

from ptft.errors import UserError

# Stands for "no step" in `earliest`: larger than any step a run takes.
_NO_STEP = 2**62
# Under torchrun the ranks agree on an interrupt every this many steps: a Ctrl-C then costs at
# most this many extra steps, and the loop no longer waits on a gloo all-reduce every step.
INTERRUPT_CHECK_EVERY = 10

# Where the loop's yes/no decisions are exchanged: a gloo group on the CPU even when
# gradients go over NCCL, so the per-step interrupt check never waits for the GPU.
# None means the default group (already gloo on CPUs).
_control_group = None


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_distributed() -> bool:
    return world_size() > 1


def is_writer() -> bool:
    """Only rank 0 writes files and prints: one run directory, one progress bar, one stdout."""
    return rank() == 0


@contextlib.contextmanager
def session(device_spec: str, *, timeout_s: float):
    """Join torchrun's process group (NCCL on GPUs, gloo on CPUs); yield this rank's device spec.

    `timeout_s` (`train.dist_timeout_s`) bounds every collective of both groups: the others
    wait that long while rank 0 alone validates, evaluates or writes a checkpoint, instead of
    torch's default of 10 (NCCL) or 30 (gloo) minutes killing a healthy job.

    Raises:
        UserError: `train.device` names something one process per GPU cannot use.
    """
    if not is_distributed():
        yield device_spec
        return
    global _control_group
    device_spec = _rank_device(device_spec)
    on_gpus = device_spec.startswith("cuda")
    timeout = datetime.timedelta(seconds=timeout_s)
    tdist.init_process_group(backend="nccl" if on_gpus else "gloo", timeout=timeout)
    _control_group = tdist.new_group(backend="gloo", timeout=timeout) if on_gpus else None
    try:
        yield device_spec
        # Leave together: a rank tearing gloo down while another still uses it can abort (SIGABRT).
        tdist.barrier()
    finally:
        _control_group = None
        tdist.destroy_process_group()


def _rank_device(spec: str) -> str:
    """Each process of a node takes the GPU of its local rank; CPU processes share the CPU."""
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return "cpu"
    if spec not in ("auto", "cuda"):
        raise UserError(f"train.device: {spec!r} under torchrun; use 'auto', 'cuda' or 'cpu' "
                        f"(each process takes cuda:LOCAL_RANK)")
    if not torch.cuda.is_available():
        raise UserError("train.device: 'cuda' requested but CUDA is not available here; use 'auto' or 'cpu'")
    local_rank, gpus = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
    if local_rank >= gpus:
        raise UserError(f"torchrun started more processes on this node than it has GPUs ({gpus}); "
                        f"pass --nproc_per_node={gpus} or less")
    torch.cuda.set_device(local_rank)
    return f"cuda:{local_rank}"


def check_global_batch(batch_size: int, examples: int) -> None:
    """`data.batch_size` is the global batch; it must split into equal per-rank slices.

    Raises:
        UserError: the batch (or the whole split, when smaller) is not a multiple of the world size.
    """
    batch = min(batch_size, examples)
    if batch % world_size():
        whole = f" (the whole training split of {examples} examples)" if batch < batch_size else ""
        raise UserError(f"data.batch_size: the global batch of {batch} examples{whole} does not split evenly "
                        f"over {world_size()} processes; use a multiple of {world_size()}")


def wrap(module: torch.nn.Module, device: torch.device, *, find_unused: bool) -> torch.nn.Module:
    """DistributedDataParallel around the train step when distributed, else the module itself.

    `find_unused`: some parameters get no gradient in some steps (an objective that trains only
    the encoder, frozen parameters); DDP must then look for them instead of waiting forever.
    """
    if not is_distributed():
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=find_unused)


def rewrap(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """A fresh DDP around a wrapped module whose set of trainable parameters changed, else `module`.

    DDP reads `requires_grad` once, when built: built after freezing, its buckets hold only the
    trainable parameters (a linear probe all-reduces its head, not the frozen encoder); rebuilt
    after unfreezing, they hold the newly trainable ones too. The old wrapper must be dropped.
    """
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(module, DistributedDataParallel):
        return module
    return wrap(module.module, device, find_unused=module.find_unused_parameters)


def sync_gradients(module: torch.nn.Module, sync: bool):
    """Context for one backward: skip DDP's all-reduce on all but the last accumulated micro-batch."""
    if sync or not hasattr(module, "no_sync"):
        return contextlib.nullcontext()
    return module.no_sync()


def _all_reduce_int(value: int, op) -> int:
    tensor = torch.tensor([value], dtype=torch.int64)
    tdist.all_reduce(tensor, op=op, group=_control_group)
    return int(tensor.item())


def any_rank(flag: bool) -> bool:
    """True on every rank when any rank says so: all stop together, none hangs."""
    if not is_distributed():
        return flag
    return bool(_all_reduce_int(int(flag), tdist.ReduceOp.MAX))


def any_rank_every(flag: bool, step: int, every: int = INTERRUPT_CHECK_EVERY) -> bool:
    """`any_rank`, asked only at steps that are multiples of `every` (False between them).

    For decisions that can wait a few steps (an interrupt): one all-reduce per `every` steps
    instead of one per step. Every rank asks at the same steps, so none waits for another.
    """
    if not is_distributed():
        return flag
    return any_rank(flag) if step % every == 0 else False


def earliest(step: int) -> int:
    """The smallest non-negative `step` over ranks, or -1 when every rank says -1."""
    if not is_distributed():
        return step
    value = _all_reduce_int(step if step >= 0 else _NO_STEP, tdist.ReduceOp.MIN)
    return -1 if value == _NO_STEP else value


def average(value: torch.Tensor) -> torch.Tensor:
    """Element-wise mean of a tensor on the training device over ranks (a copy): slice means -> batch means."""
    if not is_distributed():
        return value
    total = value.detach().clone()
    tdist.all_reduce(total, op=tdist.ReduceOp.SUM)
    return total / world_size()


def on_writer(fn, *args, **kwargs):
    """Run fn on rank 0 only and hand its result, or its error, to every rank.

    Also a barrier: no rank goes on before rank 0 has finished (a checkpoint is complete
    before any rank may read it or exit).

    Raises:
        UserError: fn raised one on rank 0 (the same message on every rank).
        RuntimeError: fn failed otherwise on rank 0 (other ranks; rank 0 re-raises the original).
    """
    if not is_distributed():
        return fn(*args, **kwargs)
    payload: list = [None]
    failure = None
    if is_writer():
        try:
            payload = [("ok", fn(*args, **kwargs))]
        except Exception as exc:  # every rank must learn of it, or the others wait forever
            failure = exc
            payload = [("user" if isinstance(exc, UserError) else "crash", str(exc))]
    tdist.broadcast_object_list(payload, src=0, group=_control_group)
    status, value = payload[0]
    if failure is not None:
        raise failure
    if status == "user":
        raise UserError(value)
    if status == "crash":
        raise RuntimeError(f"rank 0 failed: {value}")
    return value


def share_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (batch-norm statistics) on every rank, in place.

    DDP sends rank 0's buffers at the start of each forward, so after a step each rank's hold its
    own last batch's update; before the ranks validate slices, they take rank 0's (the saved ones).
    """
    if not is_distributed():
        return
    for buffer in module.buffers():
        tdist.broadcast(buffer, src=0)


def shard_rows(rows: int, batch_size: int) -> slice:
    """This rank's contiguous share of `rows` examples, in whole batches of `batch_size`.

    Rank r takes batches [r * k, (r + 1) * k) of the ceil(rows / batch_size) batches (k their
    ceiling share), so its batches are exactly those a single process makes there (a chunked
    objective's figures depend on the chunking) and the shards, concatenated in rank order, are the
    split in its own order. A rank may get an empty slice when there are fewer batches than ranks.
    """
    if not is_distributed():
        return slice(0, rows)
    batches = -(-rows // batch_size)
    share = -(-batches // world_size())
    start = min(rank() * share * batch_size, rows)
    return slice(start, min(start + share * batch_size, rows))


def sum_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over ranks of `values` (a copy on the CPU): slice tallies -> the split's.

    Over the gloo control group, so float64 and int64 sums work whatever carries the gradients.
    """
    values = values.detach().to("cpu", copy=True)
    if is_distributed():
        tdist.all_reduce(values, op=tdist.ReduceOp.SUM, group=_control_group)
    return values


def sum_by_key(values: dict[str, float]) -> dict[str, float]:
    """Per-key sums over ranks of Python numbers; a key missing on a rank (no examples there) counts 0."""
    if not is_distributed():
        return dict(values)
    every: list = [None] * world_size()
    tdist.all_gather_object(every, dict(values), group=_control_group)
    keys = [key for part in every for key in part]
    return {key: sum(part.get(key, 0) for part in every) for key in dict.fromkeys(keys)}


def gather_rows(rows: torch.Tensor | None, *, everywhere: bool = True) -> torch.Tensor | None:
    """The ranks' `rows` (N_r, ...) concatenated in rank order (on the CPU under torchrun); None: no rows.

    With `shard_rows` slices this is the whole split in its own order. `everywhere=False` gathers
    on rank 0 alone (the others get None): for what only rank 0 uses, such as the probes' features.
    """
    if rows is None or len(rows) == 0:
        rows = None
    if not is_distributed():
        return rows  # one process: where they are, no copy
    rows = None if rows is None else rows.detach().cpu()
    every: list = [None] * world_size()
    if everywhere:
        tdist.all_gather_object(every, rows, group=_control_group)
    else:
        tdist.gather_object(rows, every if is_writer() else None, dst=0, group=_control_group)
        if not is_writer():
            return None
    present = [part for part in every if part is not None]
    return torch.cat(present) if present else None


def load_on_every_rank(build, data_cfg, *args, **kwargs):
    """`build(data_cfg, *args, **kwargs)` on every rank at once: each decodes its own data.

    No rank waits on a collective while another decodes (the decode cache is safe for concurrent
    writers: the first takes the entry's lock, the others map what it wrote). A download alone is
    done once: with `data.download` rank 0 builds first (torchvision downloads inside its loaders)
    and the others start when it has finished.
    """
    if getattr(data_cfg, "download", False):
        return writer_first(build, data_cfg, *args, **kwargs)
    return build(data_cfg, *args, **kwargs)


def writer_first(fn, *args, **kwargs):
    """Run fn on rank 0, then on the other ranks: downloads and caches happen once."""
    if not is_distributed():
        return fn(*args, **kwargs)
    # Rank 0's result stays local (data tensors are not sent); the broadcast only says it is done.
    done: list = []
    on_writer(lambda: done.append(fn(*args, **kwargs)))
    return done[0] if is_writer() else fn(*args, **kwargs)
