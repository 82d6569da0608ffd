"""Where and how computation runs: device, precision, seeds, interrupt signals."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sys
from pathlib import Path

import torch

from ptft.console import note
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


def configure_backend(device: torch.device, train) -> None:
    """Kernel choices for a run (`cfg.train`): speed by default, bitwise repeatability on request.

    By default CUDA autotunes cuDNN convolutions and runs float32 matmuls in TF32: fastest, but
    two runs may differ in the last bits. `train.deterministic` turns both off and makes PyTorch
    use deterministic algorithms only. Set every time, so one run's choice never leaks into the
    next run of the same process.
    """
    deterministic = train.deterministic
    tf32 = (not deterministic) if train.tf32 is None else train.tf32
    if deterministic:
        # cuBLAS reads this when it creates its handle (the first CUDA matmul, which is later):
        # without it, deterministic cuBLAS calls raise.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if torch.are_deterministic_algorithms_enabled() != deterministic:
        # Only on a change: the call imports torch's compiler stack (1.6 s of every command's start on a CPU).
        torch.use_deterministic_algorithms(deterministic)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = deterministic
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        _warn_if_bf16_is_emulated(train.precision, device)


def _warn_if_bf16_is_emulated(precision: str, device: torch.device) -> None:
    # Before Ampere, bf16 has no tensor cores: it runs, emulated, slower than fp32.
    major, minor = torch.cuda.get_device_capability(device)
    if precision == "bf16" and major < 8:
        note(f"warning: train.precision=bf16 on a GPU of compute capability {major}.{minor} (< 8.0) is emulated "
             f"and slower than fp32; use fp16 (with its grad scaler) or fp32 there")


def peak_memory(device: torch.device) -> dict:
    """This process's peak memory so far: host resident set, and CUDA's allocated bytes on a GPU.

    Host: the maximum resident set size, which includes Python, torch's libraries and data on the
    CPU: Linux's VmHWM where /proc has it, else getrusage. Device: torch.cuda.max_memory_allocated,
    i.e. tensors, not the caching allocator's reserve or the CUDA context. None where it is not
    measured (MPS).
    """
    host = _peak_rss_bytes()
    on_device = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"device": str(device), "peak_host_bytes": int(host),
            "peak_device_bytes": None if on_device is None else int(on_device)}


def _peak_rss_bytes() -> int:
    # Linux's getrusage reports at least the RSS of the process that forked this one (the forked
    # address space keeps its high-water mark through exec), so ptft started by a large parent (a
    # notebook, a test runner, a bench) would record the parent's peak. VmHWM is this process's own.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    import resource

    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak_rss if sys.platform == "darwin" else peak_rss * 1024  # macOS counts bytes, Linux KiB


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
        # Ctrl-C reaches every torchrun process; rank 0 alone says so (note is silent elsewhere).
        note("\ninterrupt received: saving a resumable checkpoint (again to abort)")


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
