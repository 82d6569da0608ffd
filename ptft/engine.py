"""The one training loop: steps, validation, best tracking, checkpoints, interrupts.

Step-based: epochs are a view of steps. Everything a step does is a function of the step
number and the state saved in the last checkpoint (data order, per-step seeds of the noise and
of the model's dropout, optimizer state), so a run resumed from any checkpoint ends bitwise
equal to an uninterrupted one, on every rank.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ptft import checkpoint as ckpt
from ptft import distributed as dist
from ptft.data.batches import DeviceBatches, iterate_eval
from ptft.errors import NonFiniteLossError, TrainingInterrupted, UserError
from ptft.finetuning import apply_freeze, frozen_patterns, keep_frozen_norms_in_eval
from ptft.console import MetricsLog, progress_bar
from ptft.runtime import InterruptFlag, autocast


@dataclass
class TrainParts:
    """Everything the loop trains and reads; built by a stage."""

    model: torch.nn.Module
    objective: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    batches: DeviceBatches
    val: object  # TensorSplit with .x, .y on the device
    device: torch.device
    step_module: torch.nn.Module  # what the loop calls: TrainStep, maybe DDP-wrapped


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
    eval_every: int
    log_every: int
    save_every: int | None
    accumulate: int
    grad_clip: float | None
    precision: str
    keep_last: int
    seed: int
    eval_batch_size: int
    finetune_cfg: object | None = None


@dataclass
class FitResult:
    step: int
    last: Path | None
    best: Path | None
    stopped_early: bool = False
    final_metrics: dict = field(default_factory=dict)


class TrainStep(torch.nn.Module):
    """Model + objective as one module, so DDP and torch.compile see a single forward."""

    def __init__(self, model: torch.nn.Module, objective: torch.nn.Module):
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, x, y, generator):
        return self.objective(self.model, x, y, generator)


# 2**64 / golden ratio: odd, so rank * stride differs in the low 32 bits for every pair of ranks.
_RANK_STRIDE = 0x9E3779B97F4A7C15


def step_seed(run_seed: int, step: int, micro: int, rank: int = 0) -> int:
    """Seed of the per-step generator (noise, masks, augmentations): a function of the step alone.

    Under DDP each rank draws its own noise for its own slice of the batch; rank 0 draws
    what a single process draws. A CPU generator keeps only the seed's low 32 bits, so the
    rank enters them too, times an odd constant: ranks never share a seed at the same step.
    """
    return (run_seed * 1_000_003 + step * 64 + micro + rank * _RANK_STRIDE) % (2**63)


def _model_rng_seed(run_seed: int, step: int, micro: int, rank: int) -> int:
    """Seed of torch's global generators for one micro-batch; unrelated to `step_seed`'s stream."""
    digest = hashlib.sha256(f"ptft-model-rng:{run_seed}:{rank}:{step}:{micro}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _global_seeders(device: torch.device) -> list:
    """Seed setters of the global generators a forward on `device` draws from (dropout)."""
    seeders = [torch.default_generator.manual_seed]
    if device.type == "cuda":
        # This process's training GPU only: torch.manual_seed would reseed every GPU it sees.
        torch.cuda.init()
        index = device.index if device.index is not None else torch.cuda.current_device()
        seeders.append(torch.cuda.default_generators[index].manual_seed)
    elif device.type == "mps":
        seeders.append(torch.mps.manual_seed)
    return seeders


class StepRandomness:
    """Every random draw of a training micro-batch, as a function of (seed, rank, step, micro).

    The objective draws noise, masks and views from `generator`; the model (dropout) draws from
    torch's global generators. Both are reseeded before every micro-batch on every rank, rank 0
    included, so what a step draws never depends on where the run last started: a resumed run
    draws what an unbroken one does on each rank, and no rank's stream needs saving. Reseeding
    takes microseconds and no device sync.
    """

    def __init__(self, run_seed: int, device: torch.device):
        self.run_seed, self.rank = run_seed, dist.rank()
        self.generator = torch.Generator(device=device)
        self._seeders = _global_seeders(device)

    def reseed(self, step: int, micro: int) -> torch.Generator:
        """Seed every generator for micro-batch `micro` of `step`; return the objective's."""
        self.generator.manual_seed(step_seed(self.run_seed, step, micro, self.rank))
        model_seed = _model_rng_seed(self.run_seed, step, micro, self.rank)
        for seed in self._seeders:
            seed(model_seed)
        return self.generator


def run_weights(model: torch.nn.Module, objective: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What model.safetensors holds: the model's keys, and the objective's under `objective.`."""
    weights = dict(model.state_dict())
    weights.update({f"objective.{k}": v for k, v in objective.state_dict().items()})
    return weights


@torch.inference_mode()
def evaluate_objective(parts: TrainParts, split, settings: LoopSettings) -> dict[str, float]:
    """Mean objective loss (and its logs) over a split, with a fixed noise seed.

    Batches of the objective's `eval_chunk_size` when it has one (its figures depend on the
    batching), else of `settings.eval_batch_size`: either way the figures do not change with
    data.eval_batch_size, which --resume may change.
    """
    parts.model.eval()
    parts.objective.eval()
    generator = torch.Generator(device=parts.device).manual_seed(settings.seed)
    totals: dict[str, torch.Tensor] = {}
    count = 0
    batch_size = getattr(parts.objective, "eval_chunk_size", None) or settings.eval_batch_size
    for x, y in iterate_eval(split.x, split.y, batch_size):
        with autocast(settings.precision, parts.device):
            loss, logs = parts.objective(parts.model, x, y, generator)
        for key, value in {"loss": loss, **logs}.items():
            totals[key] = totals.get(key, 0) + value.detach().float() * len(x)
        count += len(x)
    return {f"val/{k}": (v / count).item() for k, v in totals.items()}


def _train_mode(parts: TrainParts) -> None:
    parts.step_module.train()
    keep_frozen_norms_in_eval(parts.model)


def _optimizer_step(parts: TrainParts, settings: LoopSettings, step: int, rng: StepRandomness) -> torch.Tensor:
    """One optimizer step over `accumulate` micro-batches; returns the mean loss (on device)."""
    losses = []
    for micro in range(settings.accumulate):
        x, y = parts.batches.batch(step * settings.accumulate + micro)
        if parts.device.type == "cuda" and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        generator = rng.reseed(step, micro)
        with dist.sync_gradients(parts.step_module, sync=micro == settings.accumulate - 1):
            with autocast(settings.precision, parts.device):
                loss, _ = parts.step_module(x, y, generator)
            # Without accumulation the division is one more kernel per step, and x / 1 == x.
            parts.scaler.scale(loss / settings.accumulate if settings.accumulate > 1 else loss).backward()
        losses.append(loss.detach().float())
    if settings.grad_clip is not None:
        parts.scaler.unscale_(parts.optimizer)
        params = [p for group in parts.optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
    parts.scaler.step(parts.optimizer)
    parts.scaler.update()
    parts.optimizer.zero_grad(set_to_none=True)
    parts.scheduler.step()
    return losses[0] if settings.accumulate == 1 else sum(losses) / settings.accumulate


class _Loop:
    """State of one `fit` call; split out so each piece of the loop reads on its own."""

    def __init__(self, parts, settings, run_dir, tracker, meta_base, log, protect):
        self.parts, self.settings, self.run_dir = parts, settings, Path(run_dir)
        self.tracker, self.meta_base, self.log, self.protect = tracker, meta_base, log, protect
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
        if self.settings.finetune_cfg is None:
            return
        patterns = tuple(frozen_patterns(self.settings.finetune_cfg, step))
        if patterns != self.frozen:
            apply_freeze(self.parts.model, patterns)
            self.frozen = patterns
            self.train_mode_stale = True

    def log_train(self, step: int, epoch: float) -> dict:
        self.check_finite()
        record = {"step": step, "epoch": round(epoch, 4), "lr": self.parts.optimizer.param_groups[0]["lr"]}
        if self.loss_count:
            # Each rank's mean over its slice; their average is the global batch's mean.
            record["train/loss"] = dist.average(self.losses[:self.loss_count].mean()).item()
        self.loss_count = 0
        return record

    def save(self, step: int, epoch: float, metrics: dict, best: bool) -> Path:
        self.check_finite()
        # Rank 0 writes; every rank waits for it and learns the path, so no rank reads a
        # partial checkpoint or exits (and has torchrun stop rank 0) while it is written.
        path = dist.on_writer(self._write, step, epoch, metrics, best)
        self.last_saved, self.last_saved_step = path, step
        return path

    def _write(self, step: int, epoch: float, metrics: dict, best: bool) -> Path:
        parts = self.parts
        state = {
            "step": step,
            "optimizer": parts.optimizer.state_dict(),
            "scheduler": parts.scheduler.state_dict(),
            "scaler": parts.scaler.state_dict(),
            "rng": ckpt.capture_rng_state(parts.device),
            "tracker": self.tracker.state_dict(),
            "data": {"seed": self.settings.seed, "position": step * self.settings.accumulate,
                     "steps_per_epoch": parts.batches.steps_per_epoch},
        }
        meta = {**self.meta_base, "step": step, "epoch": round(epoch, 4), "metrics": metrics,
                "best": {"monitor": self.tracker.monitor, "value": self.tracker.best, "step": self.tracker.best_step}}
        return ckpt.save_checkpoint(self.run_dir, step, run_weights(parts.model, parts.objective), state, meta,
                                    best=best, keep_last=self.settings.keep_last, protect=self.protect)


def fit(parts: TrainParts, settings: LoopSettings, run_dir: Path, *, start_step: int, tracker: BestTracker,
        meta_base: dict, log: MetricsLog | None, protect: tuple[Path, ...] = ()) -> FitResult:
    """Train from `start_step` to `settings.total_steps`, validating and checkpointing on schedule.

    Args:
        parts: model, objective, optimizer, scheduler, scaler, batches and validation split.
        settings: step counts and loop options.
        run_dir: where checkpoints go (written by rank 0 only under torchrun).
        start_step: 0 for a new run, the checkpoint's step when resuming.
        tracker: best-metric / early-stopping state (restored when resuming).
        meta_base: facts every checkpoint's meta.json carries (config hash, lineage, ...).
        log: metrics.jsonl writer, or None on non-writing ranks.
        protect: checkpoints pruning must keep (the one a run resumed from).
    Returns:
        FitResult with the final step and the last / best checkpoint paths.
    Raises:
        NonFiniteLossError: a loss was NaN or infinite.
        TrainingInterrupted: SIGINT/SIGTERM arrived; a checkpoint of the current step was saved.
    """
    loop = _Loop(parts, settings, run_dir, tracker, meta_base, log, protect)
    steps_per_epoch = max(1, parts.batches.steps_per_epoch // settings.accumulate)
    step, stopped_early, metrics = start_step, False, {}
    with InterruptFlag() as interrupt, progress_bar(settings.total_steps, start_step, enabled=dist.is_writer()) as bar:
        while step < settings.total_steps:
            loop.refresh_freeze(step)
            loop.ensure_train_mode()
            loop.note_loss(_optimizer_step(parts, settings, step, loop.rng), step)
            step += 1
            epoch = step / steps_per_epoch
            record = loop.log_train(step, epoch) if step % settings.log_every == 0 else None
            evaluated = step % settings.eval_every == 0 or step == settings.total_steps
            improved = False
            if evaluated:
                # Rank 0's figures (its weights and buffers are the ones saved) for every rank,
                # so best/early-stop decisions agree; equal to a single process's figures.
                metrics = dist.on_writer(evaluate_objective, parts, parts.val, settings)
                loop.train_mode_stale = True
                improved = tracker.update(metrics, step)
                record = {**(record or loop.log_train(step, epoch)), **metrics}
            if record is not None and log is not None:
                log.write(record)
                bar.show(record)
            periodic = settings.save_every is not None and step % settings.save_every == 0
            if improved or (evaluated and settings.save_every is None) or periodic or step == settings.total_steps:
                loop.save(step, epoch, metrics if evaluated else {}, best=improved)
            bar.advance(step)
            if dist.any_rank(interrupt.raised):
                if loop.last_saved_step != step:
                    loop.save(step, epoch, {}, best=False)
                raise TrainingInterrupted(str(loop.last_saved) if loop.last_saved else None)
            if evaluated and dist.any_rank(tracker.should_stop):
                stopped_early = True
                if loop.last_saved_step != step:
                    loop.save(step, epoch, metrics, best=False)
                break
    loop.check_finite()
    best = run_dir / "checkpoints" / "best"
    return FitResult(step=step, last=loop.last_saved, best=best.resolve() if best.exists() else None,
                     stopped_early=stopped_early, final_metrics=metrics)


def restore_training_state(parts: TrainParts, tracker: BestTracker, state: dict) -> int:
    """Load optimizer, scheduler, scaler, tracker and RNG state from a checkpoint; return its step."""
    parts.optimizer.load_state_dict(state["optimizer"])
    parts.scheduler.load_state_dict(state["scheduler"])
    parts.scaler.load_state_dict(state["scaler"])
    tracker.load_state_dict(state["tracker"])
    ckpt.restore_rng_state(state["rng"], parts.device)
    return int(state["step"])

