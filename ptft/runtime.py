"""Where and how computation runs: device, precision, seeds, interrupt signals."""

from __future__ import annotations

import contextlib
import random
import signal
import sys

import torch

from ptft.errors import UserError

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(spec: str) -> torch.device:
    """`train.device` -> a torch.device; `auto` picks CUDA, then MPS, then CPU.

    Raises:
        UserError: the requested accelerator is not available on this machine.
    """
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"train.device: {spec!r} requested but CUDA is not available here; use 'auto' or 'cpu'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"train.device: {spec!r} but only {torch.cuda.device_count()} CUDA device(s) exist")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"train.device: {spec!r} requested but MPS is not available here; use 'auto' or 'cpu'")
    return device


def check_precision(precision: str, device: torch.device) -> None:
    """fp16 autocast needs CUDA's kernels and a grad scaler; refuse it elsewhere up front."""
    if precision == "fp16" and device.type != "cuda":
        raise UserError(f"train.precision: fp16 needs a CUDA device (got {device.type}); use bf16 or fp32")


def autocast(precision: str, device: torch.device):
    """Mixed-precision context for the forward pass; a no-op for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_DTYPES[precision])


def seed_everything(seed: int) -> None:
    """Seed every RNG a run may touch (weight init, dropout)."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # numpy is optional for torch; nothing to seed then
        pass


def configure_backend(device: torch.device) -> None:
    """Fast kernels on CUDA: cuDNN autotuning and TF32 matmuls."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


class InterruptFlag:
    """Turns SIGINT/SIGTERM into a flag the training loop checks between steps.

    The loop then writes a resumable checkpoint and exits 130, instead of dying mid-write.
    A second signal falls back to the default behaviour, so a stuck run can still be killed.
    """

    def __init__(self):
        self.raised = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "InterruptFlag":
        if not _is_main_thread():
            return self
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.raised:
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            raise KeyboardInterrupt
        self.raised = True
        print("\ninterrupt received: saving a resumable checkpoint (again to abort)", file=sys.stderr)


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
