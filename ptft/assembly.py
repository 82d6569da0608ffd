"""A run's parts, built from its config: data, model, objective, then what the loop needs.

The one place they are built. `ptft pretrain` / `finetune` (ptft/stages.py), `evaluate` and
scripts/bench.py all build them here, so what the benchmark times is what the CLI runs.
Building comes in two steps because the checks before training and a dry run need the model
as built (on the CPU, uncompiled, unwrapped, init weights not yet loaded): `build_run`, then
`build_train_parts` for a run that trains.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ptft import distributed as dist
from ptft.config import Config
from ptft.console import note_class_counts
from ptft.data import build_data
from ptft.data.batches import Batches, DeviceBatches, iterate_eval
from ptft.data.mixed import MixedBatches
from ptft.data.normalize import attach_normalization
from ptft.data.placement import place_splits
from ptft.data.resize import attach_input_size
from ptft.data.tensors import DataBundle, TensorSplit
from ptft.ema import build_ema
from ptft.engine import BestTracker, LoopSettings, TrainParts, TrainStep
from ptft.errors import UserError
from ptft.features import probe_features, switch_off_views, trains_on_features
from ptft.finetuning import FinetunePlan, finetune_plan, leaves_parameters_unused, param_groups
from ptft.knn_monitor import KnnMonitor
from ptft.models import build_model, enable_grad_checkpointing
from ptft.objectives import OBJECTIVES
from ptft.objectives.semi_supervised import semi_supervised
from ptft.optim import OPTIMIZERS, SCHEDULES


@dataclass
class Run:
    """What one training stage trains, as the config builds it (model and objective on the CPU)."""

    cfg: Config
    device: torch.device  # where build_train_parts moves model and objective; the data is there already
    stage: str  # "pretrain" | "finetune": what meta.json records
    plan: FinetunePlan | None  # what trains during finetuning; None for pretraining
    data: DataBundle
    model: torch.nn.Module
    objective: torch.nn.Module
    train_split: TensorSplit  # the labelled subset for objectives that need labels, else every example


def build_model_for(cfg: Config, data: DataBundle) -> torch.nn.Module:
    """The config's model for the data's input shape and classes, on the CPU, its inputs normalised
    as data.normalize says (ptft.data.normalize)."""
    model = build_model(cfg.model, data.input_shape, data.num_classes, cfg.objective.name)
    model = attach_input_size(model, data.input_shape[1:] if data.stored_size else None)
    return attach_normalization(model, data.normalization)


def build_run(cfg: Config, device: torch.device, *, stage: str) -> Run:
    """Data (the splits it reads placed for `device`), model and objective of a training stage ("pretrain"
    or "finetune").

    Raises:
        UserError: a finetune of a model that is no classifier, bad data or model options.
    """
    plan = finetune_plan(cfg, stage)
    # Placed below (place_splits), once the objective says which splits it reads.
    data = dist.load_on_every_rank(build_data, cfg.data, device, reads=())
    model = build_model_for(cfg, data)
    if cfg.train.grad_checkpointing:  # activations recomputed in the backward pass: less memory, more compute
        enable_grad_checkpointing(model, cfg.model.name)
    objective = OBJECTIVES.get(cfg.objective.name)(model, tuple(data.input_shape), **cfg.objective.options)
    check_decode_size(cfg, data, objective)
    if plan is not None:  # finetune.unlabelled: none keeps the supervised objective as it is
        objective = semi_supervised(objective, cfg.finetune, tuple(data.input_shape), data.num_classes)
    check_sampler(cfg, objective)
    data = place_splits(data, stage_reads(cfg, plan, objective), device, cfg.data.placement)
    train_split = data.labelled if objective.needs_labels else data.unlabelled
    if objective.needs_labels:
        note_class_counts(torch.bincount(train_split.y.cpu(), minlength=data.num_classes).tolist(), data.class_names)
    # What an objective sets from the labelled subset before training: balanced class weights, the prior of
    # distribution alignment.
    if hasattr(objective, "fit_to_labels"):
        objective.fit_to_labels(train_split.y)
    return Run(cfg, device, stage, plan, data, model, objective, train_split)


def stage_reads(cfg: Config, plan: FinetunePlan | None, objective: torch.nn.Module) -> list[str]:
    """The splits a training stage reads: only they are placed (data.placement). Test never is:
    evaluate streams it."""
    reads = ["labelled" if objective.needs_labels else "unlabelled", "val"]
    if cfg.train.knn_monitor:
        reads.append("labelled")  # the k-NN monitor's bank
    if plan is not None and cfg.finetune.unlabelled != "none":
        reads.append("unlabelled")  # semi-supervised finetuning's unlabelled batches
    return reads


def check_decode_size(cfg: Config, data: DataBundle, objective: torch.nn.Module) -> None:
    """Refuse data.decode_size for an objective whose loss compares the model's output with its input: the
    stored images are not the size the model reconstructs.

    Raises:
        UserError: naming data.decode_size and the objective.
    """
    if data.stored_size is not None and getattr(objective, "reconstructs_inputs", False):
        raise UserError(f"data.decode_size: objective {cfg.objective.name!r} reconstructs its inputs at "
                        f"data.image_size {cfg.data.image_size}, so it cannot train on images kept at "
                        f"{cfg.data.decode_size}; remove data.decode_size (crops from larger images are for "
                        "supervised, contrastive and vicreg)")


def check_sampler(cfg: Config, objective: torch.nn.Module) -> None:
    """Refuse data.sampler balanced for an objective that never sees labels: it has no classes to balance.

    The objective's own `needs_labels` decides (a user's registered objective included), so this
    check runs once the objective is built, before any data is batched.

    Raises:
        UserError: naming data.sampler and the objective.
    """
    if cfg.data.sampler == "balanced" and not objective.needs_labels:
        raise UserError(f"data.sampler: 'balanced' balances the classes of labelled batches, but objective "
                        f"{cfg.objective.name!r} trains without labels; set data.sampler: random (the default)")


def build_train_parts(run: Run) -> tuple[TrainParts, LoopSettings]:
    """Everything the loop needs, as `ptft pretrain` / `finetune` build it (scripts/bench.py times this).

    Moves model and objective to the run's device, shards the batches under torchrun, builds
    optimizer (the plan's parameter groups) and schedule, compiles when asked and wraps the
    step in DDP when distributed.
    """
    cfg, device, model, objective = run.cfg, run.device, run.model, run.objective
    model.to(device)
    objective.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    run, forward_model = on_features(run)
    batches = training_batches(run).shard(dist.rank(), dist.world_size())
    settings = loop_settings(cfg, batches.steps_per_epoch, run.plan)
    optimizer = OPTIMIZERS.get(cfg.optim.name)(param_groups(model, objective, run.plan, cfg.optim.lr), cfg.optim)
    scheduler = SCHEDULES.get(cfg.schedule.name)(optimizer, cfg.schedule, settings.total_steps)
    ema = build_ema(cfg.train.ema_decay, model, objective, forward_model)  # copies the modules: before compiling
    if cfg.train.compile:
        # Compile the children in place: state-dict keys stay free of `_orig_mod.`.
        for child in model.children():
            child.compile()
    step_module = dist.wrap(TrainStep(model if forward_model is None else forward_model, objective), device,
                            find_unused=leaves_parameters_unused(run.plan, objective)
                            or getattr(model, "leaves_parameters_unused", False))  # models/decoders.py
    parts = TrainParts(model=model, objective=objective, optimizer=optimizer, scheduler=scheduler,
                       scaler=torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16"),
                       batches=batches, val=run.data.val, device=device, step_module=step_module,
                       knn=KnnMonitor(run.data.labelled, run.data.num_classes) if cfg.train.knn_monitor else None,
                       forward_model=forward_model,
                       ema=ema)
    return parts, settings


def on_features(run: Run) -> tuple[Run, torch.nn.Module | None]:
    """The run as the loop sees it, and what the objective runs on its batches when not the model.

    A linear probe frozen for the whole run (ptft/features.py) trains its head on the encoder's
    features, computed here once (the model on the device, with the weights it starts from): its
    labelled subset and validation split become features, the head is what the objective runs.
    Any other run is itself, and the objective runs the model.
    """
    if not trains_on_features(run.plan, run.model):
        return run, None
    switch_off_views(run.objective)
    probe = probe_features(run.model, run.train_split, run.data.val, batch_size=run.cfg.data.eval_batch_size,
                           precision=run.cfg.train.precision)
    data = replace(run.data, labelled=probe.train, val=probe.val)  # labelled: the k-NN monitor's bank
    return replace(run, data=data, train_split=probe.train), probe.head


def training_batches(run: Run) -> Batches:
    """The run's training batches, all processes together: the train split's, or for semi-supervised
    finetuning its labelled subset's followed by `finetune.unlabelled_ratio` times as many unlabelled."""
    cfg, split = run.cfg, run.train_split
    if run.plan is not None and cfg.finetune.unlabelled != "none":
        return MixedBatches.from_splits(split, run.data.unlabelled, cfg.data.batch_size, cfg.finetune.unlabelled_ratio,
                                        seed=cfg.run.seed, sampler=cfg.data.sampler)
    return DeviceBatches(split.x, split.y, cfg.data.batch_size, seed=cfg.run.seed, sampler=cfg.data.sampler)


def loop_settings(cfg: Config, batches_per_epoch: int, plan: FinetunePlan | None) -> LoopSettings:
    """The loop's schedule from the `train` and `checkpoint` sections; an epoch is `batches_per_epoch` batches."""
    steps_per_epoch = max(1, batches_per_epoch // cfg.train.accumulate)
    total = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
    return LoopSettings(
        total_steps=total, steps_per_epoch=steps_per_epoch, eval_every=cfg.train.eval_every_steps or steps_per_epoch,
        log_every=cfg.train.log_every_steps, save_every=cfg.checkpoint.every_steps,
        accumulate=cfg.train.accumulate, grad_clip=cfg.train.grad_clip, precision=cfg.train.precision,
        keep_last=cfg.checkpoint.keep_last, seed=cfg.run.seed, eval_batch_size=cfg.data.eval_batch_size,
        freeze=plan.freeze if plan else None, loggers=tuple(cfg.train.loggers),
    )


def build_tracker(cfg: Config) -> BestTracker:
    """A fresh tracker of `checkpoint.monitor` (and of early stopping, train.early_stopping_patience)."""
    return BestTracker(cfg.checkpoint.monitor, cfg.checkpoint.mode, cfg.train.early_stopping_patience)


def check_monitor(run: Run) -> None:
    """Refuse a checkpoint.monitor that validation never logs, rather than at its first evaluation.

    Raises:
        UserError: naming the monitor and the metrics validation logs.
    """
    examples = run.data.val if len(run.data.val.x) else run.train_split  # the names do not depend on the examples
    names = validation_metric_names(run.model, run.objective, examples, run.cfg.run.seed)
    if run.cfg.train.knn_monitor:
        names.append("val/knn_acc")
    monitor = run.cfg.checkpoint.monitor
    if monitor not in names:
        raise UserError(f"checkpoint.monitor: {monitor!r} is not a metric this objective's validation logs; "
                        f"it logs {', '.join(names)}")


# Validation of a few examples tells the metric names: the model stays on the CPU, uncompiled.
MONITOR_PROBE_EXAMPLES = 4


@torch.inference_mode()
def validation_metric_names(model: torch.nn.Module, objective: torch.nn.Module, val: TensorSplit,
                            seed: int) -> list[str]:
    """The metrics `scoring.evaluate_objective` logs for this objective: "val/loss" and "val/<log>".

    One eval-mode pass over the first few validation examples, moved to the model's device:
    weights and batch-norm statistics stay as they are, and the train/eval modes are restored.
    """
    device = next(model.parameters()).device
    x, y = next(iterate_eval(val.x[:MONITOR_PROBE_EXAMPLES], val.y[:MONITOR_PROBE_EXAMPLES], MONITOR_PROBE_EXAMPLES))
    modes = [(module, module.training) for module in (*model.modules(), *objective.modules())]
    model.eval()
    objective.eval()
    try:
        _, logs = objective(model, x.to(device), y.to(device), torch.Generator(device=device).manual_seed(seed))
    finally:
        for module, training in modes:
            module.training = training
    return ["val/loss", *(f"val/{key}" for key in logs)]
