"""`ptft ARGS...` under torchrun, counting the floats each DDP all-reduces (a comm hook on every wrap).

Run by tests/test_distributed.py as `torchrun ... tests/ddp_comm_counter.py OUT_DIR ptft-args...`;
each rank writes OUT_DIR/rank<R>.json: {"floats": total floats all-reduced, "calls": bucket all-reduces,
"wraps": DDP modules built}.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as tdist

from ptft import distributed as dist

counts = {"floats": 0, "calls": 0, "wraps": 0}
_real_wrap = dist.wrap


def _counting_all_reduce(state, bucket):
    # DDP's default hook (sum, then average), plus the count.
    buffer = bucket.buffer()
    counts["floats"] += buffer.numel()
    counts["calls"] += 1
    future = tdist.all_reduce(buffer / tdist.get_world_size(), async_op=True).get_future()
    return future.then(lambda done: done.value()[0])


def _wrap(module, device, *, find_unused):
    wrapped = _real_wrap(module, device, find_unused=find_unused)
    if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
        wrapped.register_comm_hook(None, _counting_all_reduce)
        counts["wraps"] += 1
    return wrapped


def main() -> None:
    out, args = Path(sys.argv[1]), sys.argv[2:]
    dist.wrap = _wrap  # assembly and engine call dist.wrap through the module
    # cli._run, not cli.main: main leaves a torchrun process with os._exit, which would skip writing the counts.
    from ptft.cli import _run as ptft_main

    sys.argv = ["ptft", *args]
    try:
        ptft_main()
    finally:
        (out / f"rank{os.environ['RANK']}.json").write_text(json.dumps(counts))


if __name__ == "__main__":
    main()
