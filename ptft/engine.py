"""The one training loop: steps, validation, best tracking, checkpoints, interrupts.

Step-based: epochs are a view of steps. Everything a step does is a function of the step
number and the state saved in the last checkpoint (data order, per-step seeds of the noise and
of the model's dropout, optimizer state), so a run resumed from any checkpoint ends bitwise
equal to an uninterrupted one, on every rank.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ptft import checkpoint as ckpt
from ptft import distributed as dist
from ptft.console import progress_bar
from ptft.data.batches import Batches
from ptft.data.tensors import TensorSplit
from ptft.ema import STATE_KEY as EMA_STATE_KEY
from ptft.ema import ModelEma
from ptft.errors import NonFiniteLossError, TrainingInterrupted, UserError
from ptft.finetuning import FreezeSchedule, apply_freeze, keep_frozen_norms_in_eval
from ptft.loggers import Throughput, open_loggers
from ptft.meta import CheckpointMeta
from ptft.rng import StepRandomness, capture_rng_state, restore_rng_state
from ptft.rundir import RunDir
from ptft.scoring import evaluate_objective, saved_modules
from ptft.runtime import InterruptFlag, autocast, peak_memory


@dataclass
class TrainParts:
    """Everything the loop trains and reads; built by `ptft.assembly.build_train_parts`."""

    model: torch.nn.Module
    objective: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    batches: Batches  # this rank's training batches
    val: TensorSplit  # on the device
    device: torch.device
    step_module: torch.nn.Module  # what the loop calls: TrainStep, maybe DDP-wrapped
    knn: Callable[..., dict[str, float]] | None = None  # ptft.knn_monitor.KnnMonitor: adds val/knn_acc
    ema: ModelEma | None = None  # train.ema_decay: the average, validated and saved in place of the trained weights
    # What the objective runs on `batches` and `val` when not `model` itself: a linear probe on
    # precomputed features runs the model's head alone (ptft/features.py). `model` is what is saved.
    forward_model: torch.nn.Module | None = None


@dataclass
class BestTracker:
    """Best value of the monitored metric, and the early-stopping counter."""

    monitor: str
    mode: str
    patience: int | None = None
    best: float | None = None
    best_step: int | None = None
    bad_evals: int = 0

    def update(self, metrics: dict[str, float], step: int) -> bool:
        if self.monitor not in metrics:
            raise UserError(f"checkpoint.monitor: {self.monitor!r} is not a validation metric of this run; "
                            f"available: {', '.join(sorted(metrics))}")
        value = metrics[self.monitor]
        if not math.isfinite(value):
            self.bad_evals += 1
            return False
        better = self.best is None or (value < self.best if self.mode == "min" else value > self.best)
        if better:
            self.best, self.best_step, self.bad_evals = value, step, 0
        else:
            self.bad_evals += 1
        return better

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.bad_evals >= self.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_step, self.bad_evals = state["best"], state["best_step"], state["bad_evals"]


@dataclass
class LoopSettings:
    """The loop's schedule, resolved from `train` and `checkpoint` config sections."""

    total_steps: int
    steps_per_epoch: int  # optimizer steps: batches of an epoch // accumulate, at least 1
    eval_every: int
    log_every: int
    save_every: int | None
    accumulate: int
    grad_clip: float | None
    precision: str
    keep_last: int
    seed: int
    eval_batch_size: int
    freeze: FreezeSchedule | None = None  # finetuning's; None: the loop leaves requires_grad alone
    loggers: tuple[str, ...] = ("jsonl",)  # train.loggers: where records go (ptft/loggers.py)


@dataclass
class FitResult:
    step: int
    last: Path | None
    best: Path | None
    stopped_early: bool = False


@dataclass(frozen=True)
class ResumePoint:
    """The checkpoint a run resumed from: `fit` starts at its step and pruning keeps it."""

    step: int
    checkpoint: Path


class TrainStep(torch.nn.Module):
    """Model + objective as one module, so DDP and torch.compile see a single forward."""

    def __init__(self, model: torch.nn.Module, objective: torch.nn.Module):
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, x, y, generator):
        return self.objective(self.model, x, y, generator)


def _train_mode(parts: TrainParts) -> None:
    parts.step_module.train()
    keep_frozen_norms_in_eval(parts.model)


def _optimizer_step(parts: TrainParts, settings: LoopSettings, step: int,
                    rng: StepRandomness) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One optimizer step over `accumulate` micro-batches; returns the mean loss and the last
    micro-batch's logs (on device)."""
    losses = []
    for micro in range(settings.accumulate):
        x, y = parts.batches.batch(step * settings.accumulate + micro)
        if parts.device.type == "cuda" and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        generator = rng.reseed(step, micro)
        with dist.sync_gradients(parts.step_module, sync=micro == settings.accumulate - 1):
            with autocast(settings.precision, parts.device):
                loss, logs = parts.step_module(x, y, generator)
            # Without accumulation the division is one more kernel per step, and x / 1 == x.
            parts.scaler.scale(loss / settings.accumulate if settings.accumulate > 1 else loss).backward()
        losses.append(loss.detach().float())
    if settings.grad_clip is not None:
        parts.scaler.unscale_(parts.optimizer)
        params = [p for group in parts.optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
    # fp16: the scaler skips a step whose gradients hold inf/NaN and lowers its scale; the schedule
    # must not advance for an update that never happened. Reading the scale syncs, so only then.
    scale = parts.scaler.get_scale() if parts.scaler.is_enabled() else None
    parts.scaler.step(parts.optimizer)
    parts.scaler.update()
    parts.optimizer.zero_grad(set_to_none=True)
    if scale is None or parts.scaler.get_scale() >= scale:
        parts.scheduler.step()
        if getattr(parts, "ema", None) is not None:  # like the schedule: only after an update that happened
            parts.ema.update()
    return (losses[0] if settings.accumulate == 1 else sum(losses) / settings.accumulate), logs


class _Loop:
    """State of one `fit` call; split out so each piece of the loop reads on its own."""

    def __init__(self, parts, settings, run_dir, tracker, meta_base, resumed):
        self.parts, self.settings, self.run_dir = parts, settings, Path(run_dir)
        self.tracker, self.meta_base = tracker, meta_base
        self.protect = (resumed.checkpoint,) if resumed else ()  # pruning keeps the checkpoint resumed from
        self.loggers = open_loggers(settings.loggers, RunDir(run_dir), resume_step=resumed.step if resumed else None)
        # One batch tells the examples a step trains on: batches are drop_last, so every step's is that size.
        self.throughput = Throughput(len(parts.batches.batch(0)[0]) * settings.accumulate * dist.world_size())
        # Losses of the steps since the last log record (the first at `window_start`), kept on the
        # device so no step forces a sync, and checked for NaN/inf when read (each record and save).
        # A record comes at least every `log_every` steps, so that many slots suffice.
        self.losses = torch.zeros(settings.log_every, device=parts.device)
        self.loss_count = 0
        self.window_start = 0
        self.rng = StepRandomness(settings.seed, parts.device)
        # Module.train() walks every module (50-100 us, a percent of a small model's step), so it
        # runs only after evaluation or a change of frozen layers may have changed some mode.
        self.train_mode_stale = True
        self.last_saved: Path | None = None
        self.last_saved_step = -1
        self.frozen: tuple[str, ...] | None = None
        # The objective's `train_logs` (semi-supervised: mask_rate, unsup_loss) of the latest step,
        # on the device until a record reads them.
        self.train_logs: dict[str, torch.Tensor] = {}

    def train_step(self, step: int) -> None:
        """Optimizer step `step` (0-based), in train mode with the layers frozen at that step."""
        self.refresh_freeze(step)
        self.ensure_train_mode()
        if self.loss_count == 0:  # the first step of a logging window
            self.throughput.start()
        loss, logs = _optimizer_step(self.parts, self.settings, step, self.rng)
        self.note_loss(loss, step)
        self.train_logs = {key: logs[key] for key in getattr(self.parts.objective, "train_logs", ()) if key in logs}

    def log_and_validate(self, step: int, epoch: float, bar) -> tuple[dict[str, float] | None, bool]:
        """Step `step`'s metrics.jsonl record and validation, when due.

        Returns:
            The validation metrics (None when `step` does not validate), and whether they are the best so far.
        """
        settings = self.settings
        record = self.log_train(step, epoch) if step % settings.log_every == 0 else None
        metrics, improved = None, False
        if step % settings.eval_every == 0 or step == settings.total_steps:
            # Every rank validates its slice; the figures, summed over ranks, are one process's.
            metrics = evaluate_objective(self.parts, self.parts.val, settings)
            self.train_mode_stale = True  # evaluation left every module in eval mode
            improved = self.tracker.update(metrics, step)
            record = {**(record or self.log_train(step, epoch)), **metrics}
        if record is not None:
            self.loggers.log(step, record)
            bar.show(record)
        return metrics, improved

    def note_loss(self, loss: torch.Tensor, step: int) -> None:
        if self.loss_count == 0:
            self.window_start = step
        self.losses[self.loss_count] = loss  # one copy kernel, no sync
        self.loss_count += 1

    def ensure_train_mode(self) -> None:
        if self.train_mode_stale:
            _train_mode(self.parts)
            self.train_mode_stale = False

    def check_finite(self) -> None:
        bad = -1
        if self.loss_count:
            finite = torch.isfinite(self.losses[:self.loss_count])
            if not bool(finite.all()):
                bad = self.window_start + int(finite.int().argmin())  # argmin: the first non-finite
        # Every rank checks at the same steps and all stop together, whichever rank saw it.
        bad = dist.earliest(bad)
        if bad >= 0:
            raise NonFiniteLossError(
                f"non-finite loss at step {bad + 1}; stopped without saving these weights "
                f"(last good checkpoint: {self.last_saved or 'none'}). Try a lower optim.lr or train.grad_clip."
            )

    def refresh_freeze(self, step: int) -> None:
        if self.settings.freeze is None:
            return
        patterns = self.settings.freeze.frozen_at(step)
        if patterns != self.frozen:
            apply_freeze(self.parts.model, patterns)
            self.frozen = patterns
            self.train_mode_stale = True
            # DDP buckets what requires a gradient when it is built: rebuilt after freezing (a linear
            # probe all-reduces its head alone) and once more at the unfreeze.
            self.parts.step_module = dist.rewrap(self.parts.step_module, self.parts.device)

    def log_train(self, step: int, epoch: float) -> dict:
        self.check_finite()
        record = {"step": step, "epoch": round(epoch, 4), **_lr_record(self.parts.optimizer)}
        if self.loss_count:
            # Each rank's mean over its slice; their average is the global batch's mean.
            record["train/loss"] = dist.average(self.losses[:self.loss_count].mean()).item()
            record.update({f"train/{key}": dist.average(value.float()).item() for key, value in self.train_logs.items()})
            record.update(self.throughput.record(self.loss_count))  # after .item(): the device has caught up
        peak = peak_memory(self.parts.device)["peak_device_bytes"]  # CUDA only
        if peak is not None:
            record["perf/peak_device_bytes"] = peak
        self.loss_count = 0
        return record

    def save(self, step: int, epoch: float, metrics: dict, best: bool) -> Path:
        self.check_finite()
        # Rank 0 writes; every rank waits for it and learns the path, so no rank reads a
        # partial checkpoint or exits (and has torchrun stop rank 0) while it is written.
        path = dist.on_writer(self._write, step, epoch, metrics, best)
        self.last_saved, self.last_saved_step = path, step
        return path

    def save_unless_saved(self, step: int, epoch: float, metrics: dict) -> None:
        """A checkpoint of `step` before the loop ends early, unless its schedule saved one."""
        if self.last_saved_step != step:
            self.save(step, epoch, metrics, best=False)

    def _write(self, step: int, epoch: float, metrics: dict, best: bool) -> Path:
        parts = self.parts
        state = {
            "step": step,
            "optimizer": parts.optimizer.state_dict(),
            "scheduler": parts.scheduler.state_dict(),
            "scaler": parts.scaler.state_dict(),
            "rng": capture_rng_state(parts.device),
            "tracker": self.tracker.state_dict(),
            "data": {"seed": self.settings.seed, "position": step * self.settings.accumulate,
                     "steps_per_epoch": parts.batches.steps_per_epoch},
        }
        if parts.ema is not None:  # model.safetensors holds the average; the weights that train go here
            state[EMA_STATE_KEY] = parts.ema.resume_state()
        tracker = self.tracker
        meta = self.meta_base.at(step=step, epoch=epoch, metrics=metrics,
                                 best={"monitor": tracker.monitor, "value": tracker.best, "step": tracker.best_step},
                                 memory=peak_memory(parts.device))
        return ckpt.save_checkpoint(self.run_dir, ckpt.pack_weights(*saved_modules(parts)), state, meta,
                                    best=best, keep_last=self.settings.keep_last, protect=self.protect)


def _lr_record(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """`lr` when every group trains at one rate (old metrics stay readable), else `lr/<group>` each."""
    groups = optimizer.param_groups
    if len({group["lr"] for group in groups}) == 1:
        return {"lr": groups[0]["lr"]}
    return {f"lr/{group.get('name', index)}": group["lr"] for index, group in enumerate(groups)}


def _save_due(settings: LoopSettings, step: int, evaluated: bool) -> bool:
    """Whether `step` saves on schedule: after each validation unless every N steps, and at the end."""
    periodic = settings.save_every is not None and step % settings.save_every == 0
    return (evaluated and settings.save_every is None) or periodic or step == settings.total_steps


def fit(parts: TrainParts, settings: LoopSettings, run_dir: Path, *, tracker: BestTracker, meta_base: CheckpointMeta,
        resumed: ResumePoint | None = None) -> FitResult:
    """Train to `settings.total_steps`, validating, logging and checkpointing on schedule.

    Args:
        parts: model, objective, optimizer, scheduler, scaler, batches and validation split.
        settings: step counts and loop options.
        run_dir: where checkpoints and metrics.jsonl go (written by rank 0 only under torchrun).
        tracker: best-metric / early-stopping state (restored when resuming).
        meta_base: facts every checkpoint's meta.json carries (config hash, lineage, ...).
        resumed: the checkpoint a resumed run starts from (its state already restored), None for a new run.
    Returns:
        FitResult with the final step and the last / best checkpoint paths.
    Raises:
        NonFiniteLossError: a loss was NaN or infinite.
        TrainingInterrupted: SIGINT/SIGTERM arrived; a checkpoint of the current step was saved.
    """
    loop = _Loop(parts, settings, run_dir, tracker, meta_base, resumed)
    step, stopped_early = resumed.step if resumed else 0, False
    with InterruptFlag() as interrupt, progress_bar(settings.total_steps, step) as bar, loop.loggers:
        while step < settings.total_steps:
            loop.train_step(step)
            step += 1
            epoch = step / settings.steps_per_epoch
            metrics, improved = loop.log_and_validate(step, epoch, bar)
            if improved or _save_due(settings, step, evaluated=metrics is not None):
                loop.save(step, epoch, metrics or {}, best=improved)
            bar.advance(step)
            if dist.any_rank_every(interrupt.raised, step):  # an all-reduce every few steps, not every step
                loop.save_unless_saved(step, epoch, {})
                raise TrainingInterrupted(str(loop.last_saved) if loop.last_saved else None)
            if metrics is not None and dist.any_rank(tracker.should_stop):
                stopped_early = True
                loop.save_unless_saved(step, epoch, metrics)
                break
    loop.check_finite()
    best = RunDir(run_dir).best
    return FitResult(step=step, last=loop.last_saved, best=best.resolve() if best.exists() else None,
                     stopped_early=stopped_early)


def restore_training_state(parts: TrainParts, tracker: BestTracker, state: dict) -> int:
    """Load optimizer, scheduler, scaler, tracker and RNG state from a checkpoint; return its step."""
    parts.optimizer.load_state_dict(state["optimizer"])
    parts.scheduler.load_state_dict(state["scheduler"])
    parts.scaler.load_state_dict(state["scaler"])
    tracker.load_state_dict(state["tracker"])
    restore_rng_state(state["rng"], parts.device)
    return int(state["step"])

