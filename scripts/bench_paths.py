"""The four training paths scripts/bench.py compares, and the clock that interleaves them.

A path either runs steps on request (`HandLoop`, `LoaderLoop`: `run(n)`) or owns its loop (ptft's
`fit`, Lightning's `Trainer.fit`); an owner drives a pass of `Interleaver`, which it calls as each
of its steps starts and which runs the requestable paths' blocks between the owner's blocks.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import platform
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from ptft.assembly import build_run, build_tracker, build_train_parts
from ptft.config import config_hash
from ptft.data.batches import Batches
from ptft.engine import TrainParts, fit
from ptft.meta import CheckpointMeta
from ptft.runtime import seed_everything

PATHS = {"ptft": "(a) ptft engine", "hand": "(b) hand-written loop", "dataloader": "(c) torchvision DataLoader",
         "lightning": "(d) Lightning defaults"}
MIB = 2**20


# ---- memory ------------------------------------------------------------------------------------

class Meter:
    """A clock read after a device sync, and each path's peak memory.

    The clock is wall time, or with `cpu_clock` this process's CPU time: on a machine shared with
    other jobs, CPU time counts the work a path does and not the time it waits for a core (with
    one torch thread; more threads add their spin-waiting to it).

    A path's peak is what it adds to the process: the memory its setup left behind (data, model,
    optimizer, warm-up) plus the largest rise above the starting level during any of its blocks.
    RSS rises are seen by resetting the kernel's high-water mark (Linux /proc/self/clear_refs)
    before each block and reading it (resource.getrusage) after; elsewhere RSS is not reported.
    On CUDA the same is done with the allocator's counters.
    """

    def __init__(self, device: torch.device, cpu_clock: bool = False):
        self.cuda = device.type == "cuda"
        self._clock = time.process_time if cpu_clock else time.perf_counter
        self.rss = _reset_rss_peak()
        self.setup: dict[str, dict[str, int]] = {}
        self.rise: dict[str, dict[str, int]] = {}
        self._setup_start: dict[str, dict[str, int]] = {}
        self._block_start: dict[str, int] = {}

    def _levels(self) -> dict[str, int]:
        levels = {"rss": _current_rss()} if self.rss else {}
        if self.cuda:
            levels["cuda"] = torch.cuda.memory_allocated()
        return levels

    def begin_setup(self, name: str) -> None:
        self._setup_start[name] = self._levels()

    def end_setup(self, name: str) -> None:
        start = self._setup_start.pop(name, None)
        if start is not None:
            self.setup[name] = {k: v - start[k] for k, v in self._levels().items()}

    def start(self) -> float:
        """Sync, reset the peaks, return the time: a block begins."""
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.rss = self.rss and _reset_rss_peak()
        self._block_start = self._levels()
        return self._clock()

    def stop(self, name: str) -> float:
        """Sync, book the block's memory rise to `name`, return the time: a block ends."""
        if self.cuda:
            torch.cuda.synchronize()
        now = self._clock()
        peaks = {"cuda": torch.cuda.max_memory_allocated()} if self.cuda else {}
        if self.rss:
            peaks["rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        rise = self.rise.setdefault(name, {})
        for key, peak in peaks.items():
            rise[key] = max(rise.get(key, 0), peak - self._block_start.get(key, peak))
        return now

    def peaks_mib(self, name: str) -> dict[str, float | None]:
        setup, rise = self.setup.get(name, {}), self.rise.get(name, {})
        keys = ("rss", "cuda") if self.cuda else ("rss",)
        return {f"peak_{key}_mib": round((setup.get(key, 0) + rise[key]) / MIB, 1) if key in rise else None
                for key in keys}


def write_report(report: dict, target: str | None) -> None:
    """The benches' `--json` target: '-' for stdout, a file path, or None for no JSON."""
    text = json.dumps(report, indent=2) + "\n"
    if target == "-":
        sys.stdout.write(text)
    elif target:
        Path(target).write_text(text)


def timed_fit(cfg, stage: str, device: torch.device, clock, run_dir: Path, instrument=None):
    """Build `stage`'s parts from `cfg` as `ptft pretrain|finetune` does and time `fit` alone (GPU work synced).

    Args:
        clock: time.perf_counter or time.process_time.
        instrument: called with the parts before the clock starts (to wrap what the bench times inside).
    Returns:
        (seconds, parts, settings).
    """
    seed_everything(cfg.run.seed)
    parts, settings = build_train_parts(build_run(cfg, device, stage=stage))
    if instrument is not None:
        instrument(parts)
    run_dir.mkdir(parents=True)
    _sync(device)
    start = clock()
    fit(parts, settings, run_dir, tracker=build_tracker(cfg),
        meta_base=CheckpointMeta(stage=stage, config_hash=config_hash(cfg)))
    _sync(device)
    return clock() - start, parts, settings


def alternating_rounds(variants: tuple[str, str], rounds: int, prefix: str, run_one, key: str = "variant") -> list[dict]:
    """Each round runs both variants back to back, the order alternating between rounds (a/b, b/a, ...),
    so each pair sees the same load and neither always runs on a warmer process.

    Args:
        run_one: (variant, round, run_dir) -> a dict of figures; run_dir is new, in a temporary folder.
    Returns:
        one dict per run: round, the variant (under `key`), then run_one's figures.
    """
    runs = []
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        for round_ in range(rounds):
            for variant in variants if round_ % 2 == 0 else variants[::-1]:
                result = run_one(variant, round_, Path(tmp) / f"{round_}-{variant}")
                runs.append({"round": round_, key: variant, **result})
    return runs


def machine_settings(device: torch.device, clock: str) -> dict:
    """Where a bench ran: the report's settings that every bench shares."""
    return {"device": str(device), "threads": torch.get_num_threads(), "clock": clock, "torch": torch.__version__,
            "python": platform.python_version(), "cpu_count": os.cpu_count(), "load_average": os.getloadavg()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _reset_rss_peak() -> bool:
    """Set the RSS high-water mark to the current RSS (Linux >= 4.0); False where that is impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ---- interleaving ------------------------------------------------------------------------------

class Interleaver:
    """One pass: the driving path calls `tick(step)` as each of its steps starts.

    After `warmup` steps, every `block` steps close the driver's block and run one block of each
    path in `others` (timed on its own) before the driver goes on. The driver must run
    `warmup + block * blocks + 1` steps; `finish()` after its loop returns the time of its last
    step and of whatever its loop does after it (ptft: validation and the final checkpoint).
    """

    def __init__(self, driver: str, others: dict, meter: Meter, warmup: int, block: int, blocks: int):
        self.driver, self.others, self.meter = driver, others, meter
        self.warmup, self.block, self.blocks = warmup, block, blocks
        self.times: dict[str, list[float]] = {name: [] for name in (driver, *others)}
        self._started: float | None = None

    @staticmethod
    def steps_needed(warmup: int, block: int, blocks: int) -> int:
        return warmup + block * blocks + 1  # +1: the step whose start closes the last block

    @property
    def total_steps(self) -> int:
        return self.steps_needed(self.warmup, self.block, self.blocks)

    def tick(self, step: int) -> None:
        if step < self.warmup or (step - self.warmup) % self.block:
            return
        if self._started is None:
            self.meter.end_setup(self.driver)
        else:
            self.times[self.driver].append(self.meter.stop(self.driver) - self._started)
        if len(self.times[self.driver]) < self.blocks:
            for name, stepper in self.others.items():
                started = self.meter.start()
                stepper.run(self.block)
                self.times[name].append(self.meter.stop(name) - started)
        self._started = self.meter.start()

    def finish(self) -> float:
        return self.meter.stop(self.driver) - self._started


# ---- (b) and (c): loops that run steps on request ------------------------------------------------

def workload_loss(objective: str):
    """The hand-written loss of ptft's objective: fn(output, x, y) -> scalar."""
    if objective == "reconstruction":
        return lambda output, x, y: F.mse_loss(output, x)
    if objective == "supervised":
        return lambda output, x, y: F.cross_entropy(output, y)
    raise ValueError(f"no hand-written loss for objective {objective!r}")


def unit_float(x: torch.Tensor) -> torch.Tensor:
    return x.float().div_(255) if x.dtype == torch.uint8 else x  # (B, C, H, W) uint8 -> float in [0, 1]


def train_step(model, optimizer, loss_fn, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = unit_float(x)
    loss = loss_fn(model(x), x, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


class HandLoop:
    """(b) The loop people write: a randperm per epoch over tensors on the device, index, step."""

    def __init__(self, model, optimizer, loss_fn, x: torch.Tensor, y: torch.Tensor, batch_size: int):
        self.model, self.optimizer, self.loss_fn = model.train(), optimizer, loss_fn
        self.x, self.y, self.batch_size = x, y, batch_size
        self.order, self.position = None, len(x)

    def run(self, steps: int) -> None:
        for _ in range(steps):
            if self.position + self.batch_size > len(self.x):
                self.order, self.position = torch.randperm(len(self.x), device=self.x.device), 0
            index = self.order[self.position:self.position + self.batch_size]
            self.position += self.batch_size
            train_step(self.model, self.optimizer, self.loss_fn, self.x[index], self.y[index])


class LoaderLoop:
    """(c) The classic pipeline: a map-style Dataset, DataLoader(shuffle, num_workers=0), .to(device)."""

    def __init__(self, model, optimizer, loss_fn, dataset, batch_size: int, device: torch.device):
        self.model, self.optimizer, self.loss_fn, self.device = model.train(), optimizer, loss_fn, device
        self.loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=0)
        self.batches = iter(self.loader)

    def run(self, steps: int) -> None:
        for _ in range(steps):
            batch = next(self.batches, None)
            if batch is None:  # a new epoch
                self.batches = iter(self.loader)
                batch = next(self.batches)
            x, y = batch
            train_step(self.model, self.optimizer, self.loss_fn, x.to(self.device), y.to(self.device))


class PerSampleImages(torch.utils.data.Dataset):
    """What torchvision.datasets.MNIST.__getitem__ does, over in-memory images (digits, synthetic)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform):
        # (N, 1, H, W) in [0, 1] -> (N, H, W) uint8, as MNIST stores its images
        self.x = x if x.dtype == torch.uint8 else x.mul(255).round().to(torch.uint8)
        self.x, self.y, self.transform = self.x[:, 0], y, transform

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.x[index].numpy(), mode="L")), int(self.y[index])


def loader_dataset(name: str, root: Path, tensors):
    """torchvision's MNIST with ToTensor, or the same per-sample work over `tensors` for other data."""
    from torchvision import datasets, transforms

    if name == "mnist":
        return datasets.MNIST(root, train=True, download=False, transform=transforms.ToTensor())
    return PerSampleImages(tensors.train_x, tensors.train_y, transforms.ToTensor())


# ---- (a) ptft ------------------------------------------------------------------------------------

class TickingBatches:
    """ptft's batch source as `fit` sees it, telling the interleaver as each step starts."""

    def __init__(self, batches: Batches, tick):
        self._batches, self._tick = batches, tick
        self.steps_per_epoch = batches.steps_per_epoch

    def batch(self, step: int):
        self._tick(step)  # accumulate is 1: batch index == step
        return self._batches.batch(step)


def build_ptft(cfg, device: torch.device):
    """The TrainParts and LoopSettings `ptft pretrain` builds (ptft.assembly), on `device`."""
    seed_everything(cfg.run.seed)
    return build_train_parts(build_run(cfg, device, stage="pretrain"))


def run_ptft(parts: TrainParts, settings, cfg, interleaver: Interleaver) -> float:
    """Drive a pass with ptft's own loop; returns the time of its last step plus validation and checkpoint."""
    assert settings.total_steps == interleaver.total_steps and settings.accumulate == 1
    parts.batches = TickingBatches(parts.batches, interleaver.tick)
    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True)
    fit(parts, settings, run_dir, tracker=build_tracker(cfg),
        meta_base=CheckpointMeta(stage="pretrain", config_hash=config_hash(cfg)))
    return interleaver.finish()


# ---- (d) Lightning -------------------------------------------------------------------------------

def lightning_available() -> bool:
    return importlib.util.find_spec("lightning") is not None


def run_lightning(model, optimizer, loss_fn, x: torch.Tensor, y: torch.Tensor, batch_size: int,
                  device: torch.device, interleaver: Interleaver, root: Path) -> None:
    """Drive a pass with `lightning.Trainer` defaults (only the device, step count and folder set)."""
    import lightning as L

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = model

        def training_step(self, batch, batch_idx):
            x, y = batch
            x = unit_float(x)
            loss = loss_fn(self.model(x), x, y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return optimizer

    class Tick(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            interleaver.tick(trainer.global_step)

    # Lightning's progress bar writes to stdout, which is the benchmark's machine output; its
    # advice (more workers, a shorter logging interval, other loggers) is beside the point here.
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size, shuffle=True)
    with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = L.Trainer(accelerator=device.type, devices=[device.index or 0] if device.type == "cuda" else 1,
                            max_steps=interleaver.total_steps, default_root_dir=root, callbacks=[Tick()])
        trainer.fit(Module(), loader)
    interleaver.finish()
