"""Pretrain and finetune: config -> data, model, objective -> engine -> checkpoint.

Both stages are one function, `train`, with the differences spelled out where they
happen: finetuning needs a classifier, trains on the labelled subset, starts from
`init.checkpoint` and may freeze parts of the model.
"""

from __future__ import annotations

import contextlib
import platform
import sys
from pathlib import Path

import torch

import ptft
from ptft import checkpoint as ckpt
from ptft import distributed as dist
from ptft.config import Config, config_hash, config_to_yaml
from ptft.console import MetricsLog, note, print_key_report
from ptft.data import build_data
from ptft.data.batches import DeviceBatches, iterate_eval
from ptft.engine import BestTracker, LoopSettings, TrainParts, TrainStep, fit, restore_training_state
from ptft.errors import UserError
from ptft.finetuning import check_freeze_patterns, check_parent_split, frozen_patterns, random_probe_warning
from ptft.models import MODELS, summarize
from ptft.objectives import OBJECTIVES
from ptft.optim import OPTIMIZERS, SCHEDULES, build_param_groups
from ptft.rundir import check_resume_compatible, prepare_run_dir, run_dir_lock, write_config
from ptft.runtime import check_precision, configure_backend, resolve_device, seed_everything
from ptft.weights import match_into, read_state_dict


def build_model(cfg: Config, input_shape, num_classes: int) -> torch.nn.Module:
    """The registry's model with the config's options (on the CPU)."""
    return MODELS.get(cfg.model.name)(tuple(input_shape), num_classes, **cfg.model.options)


def check_stage(cfg: Config, stage: str) -> None:
    """Finetuning trains a classifier with the supervised objective; say so before any work."""
    if stage != "finetune":
        return
    kind = MODELS.meta(cfg.model.name).get("kind")
    if kind not in (None, "classifier"):
        raise UserError(
            f"model.name: finetune trains a classifier, but {cfg.model.name!r} is an {kind}; use the matching "
            f"*_classifier model with the same options so the encoder weights line up"
        )
    if cfg.objective.name != "supervised":
        raise UserError(f"objective.name: finetune uses 'supervised', got {cfg.objective.name!r}")


def load_init_weights(cfg: Config, model: torch.nn.Module, fingerprint: dict) -> dict:
    """Load `init.checkpoint` into a fresh model, print the key report, return lineage facts.

    `fingerprint` is this run's data split (DataBundle.fingerprint), held against a ptft parent's.
    """
    source = cfg.init.checkpoint
    state = read_state_dict(source, prefix_map=cfg.init.prefix_map)
    parent = {"path": str(source)}
    try:
        resolved = ckpt.resolve_checkpoint(source)
    except UserError:  # a foreign file, not a ptft checkpoint directory
        parent.update(hash=ckpt.file_sha256(Path(source)), lineage=[])
    else:
        parent_meta = ckpt.read_meta(resolved)
        warning = check_parent_split(fingerprint, parent_meta, source)
        if warning and dist.is_writer():
            note(warning)
        parent.update(path=str(resolved), hash=ckpt.checkpoint_hash(resolved),
                      lineage=parent_meta.get("lineage", []) + [_lineage_entry(resolved, parent_meta)])
    report = match_into(model, state, load_head=cfg.init.load_head, strict=cfg.init.strict, source=str(source))
    if dist.is_writer():
        print_key_report(report.rows(), source)
    parent["report"] = report.as_dict()
    return parent


def _lineage_entry(path: Path, meta: dict) -> dict:
    return {"path": str(path), "stage": meta.get("stage"), "step": meta.get("step"),
            "config_hash": meta.get("config_hash"), "hash": ckpt.checkpoint_hash(path)}


def loop_settings(cfg: Config, batches: DeviceBatches, stage: str) -> LoopSettings:
    steps_per_epoch = max(1, batches.steps_per_epoch // cfg.train.accumulate)
    total = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
    return LoopSettings(
        total_steps=total, eval_every=cfg.train.eval_every_steps or steps_per_epoch,
        log_every=cfg.train.log_every_steps, save_every=cfg.checkpoint.every_steps,
        accumulate=cfg.train.accumulate, grad_clip=cfg.train.grad_clip, precision=cfg.train.precision,
        keep_last=cfg.checkpoint.keep_last, seed=cfg.run.seed, eval_batch_size=cfg.data.eval_batch_size,
        finetune_cfg=cfg.finetune if stage == "finetune" else None,
    )


def _meta_base(cfg: Config, stage: str, data, parent: dict | None) -> dict:
    return {
        "stage": stage, "config_hash": config_hash(cfg), "config": cfg.model_dump(mode="json"),
        "model": {"name": cfg.model.name, "options": cfg.model.options, "kind": MODELS.meta(cfg.model.name).get("kind")},
        "objective": cfg.objective.name, "data": data.fingerprint,
        # What predict / embed / export need to feed the model without the training data at hand.
        "inputs": {"shape": list(data.input_shape), "class_names": list(data.class_names)},
        "versions": {"ptft": ptft.__version__, "torch": torch.__version__, "python": platform.python_version()},
        "parent": parent, "lineage": list(parent["lineage"]) if parent else [],
    }


def train(cfg: Config, stage: str, *, resume: bool = False, overwrite: bool = False, dry_run: bool = False) -> Path | None:
    """Run one training stage ("pretrain" or "finetune") as the config says.

    Returns:
        The checkpoint the next stage should start from (best, else last), or None for a dry run.
    Raises:
        UserError: bad config values, data, init checkpoint or run directory (exit 2).
        TrainingInterrupted: SIGINT/SIGTERM; a resumable checkpoint was written (exit 130).
    """
    check_stage(cfg, stage)
    # `held` keeps the run dir's lock (taken by rank 0 in _prepare) until fitting ends.
    with dist.session(cfg.train.device) as device_spec, contextlib.ExitStack() as held:
        device = resolve_device(device_spec)
        check_precision(cfg.train.precision, device)
        configure_backend(device)
        seed_everything(cfg.run.seed)
        data = dist.writer_first(build_data, cfg.data, device)  # a download happens once
        model = build_model(cfg, data.input_shape, data.num_classes)
        objective = OBJECTIVES.get(cfg.objective.name)(model, tuple(data.input_shape), **cfg.objective.options)
        train_split = data.labelled if objective.needs_labels else data.unlabelled
        parent = check_before_training(cfg, stage, model, objective, data, train_split, resume)
        if dry_run:
            if dist.is_writer():
                _print_dry_run(cfg, model, objective, data, train_split)
            return None
        dist.check_global_batch(cfg.data.batch_size, len(train_split.x))
        run_dir = Path(cfg.run.dir)
        resume_from = dist.on_writer(_prepare, run_dir, cfg, resume, overwrite, held)
        if dist.is_writer():
            write_config(run_dir, cfg)
        return _fit(cfg, stage, device, data, model, objective, train_split, run_dir, resume_from, parent)


def check_before_training(cfg: Config, stage: str, model, objective, data, train_split, resume: bool) -> dict | None:
    """What a dry run and a real run refuse before step 1, cheapest first; loads `init.checkpoint`.

    Returns:
        The init checkpoint's lineage facts (`load_init_weights`), or None without one.
    Raises:
        UserError: a freeze pattern matching nothing, a monitor validation never logs, init
            weights that do not load, a supervised parent split another way.
    """
    if stage == "finetune":
        check_freeze_patterns(model, cfg.finetune.freeze)
        warning = random_probe_warning(cfg.finetune, cfg.init.checkpoint)
        if warning and dist.is_writer():
            note(warning)
    examples = data.val if len(data.val.x) else train_split  # the names do not depend on the examples
    check_monitor(cfg.checkpoint.monitor, validation_metric_names(model, objective, examples, cfg.run.seed))
    if cfg.init.checkpoint and not resume:
        return load_init_weights(cfg, model, data.fingerprint)
    return None


# Validation of a few examples tells the metric names: the model stays on the CPU, uncompiled.
MONITOR_PROBE_EXAMPLES = 4


@torch.inference_mode()
def validation_metric_names(model: torch.nn.Module, objective: torch.nn.Module, val, seed: int) -> list[str]:
    """The metrics `engine.evaluate_objective` logs for this objective: "val/loss" and "val/<log>".

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


def check_monitor(monitor: str, names: list[str]) -> None:
    """Refuse a checkpoint.monitor that validation never logs, rather than at its first evaluation."""
    if monitor not in names:
        raise UserError(f"checkpoint.monitor: {monitor!r} is not a metric this objective's validation logs; "
                        f"it logs {', '.join(names)}")


def _prepare(run_dir: Path, cfg: Config, resume: bool, overwrite: bool, held: contextlib.ExitStack) -> Path | None:
    held.enter_context(run_dir_lock(run_dir))  # before anything reads or clears the directory
    resume_from = prepare_run_dir(run_dir, resume=resume, overwrite=overwrite)
    if resume:
        check_resume_compatible(run_dir, cfg)
    return resume_from


def build_train_parts(cfg: Config, stage: str, device: torch.device, data, model, objective,
                      train_split) -> tuple[TrainParts, LoopSettings]:
    """Everything the loop needs, as `ptft pretrain` / `finetune` build it (scripts/bench.py times this).

    Moves model and objective to `device`, shards the batches under torchrun, builds optimizer
    and schedule (finetune's parameter groups for stage "finetune"), compiles when asked and
    wraps the step in DDP when distributed.
    """
    model.to(device)
    objective.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    batches = dist.shard_batches(DeviceBatches(train_split.x, train_split.y, cfg.data.batch_size, seed=cfg.run.seed))
    settings = loop_settings(cfg, batches, stage)
    optimizer = OPTIMIZERS.get(cfg.optim.name)(
        build_param_groups(model, objective, cfg.finetune if stage == "finetune" else None, cfg.optim.lr), cfg.optim)
    scheduler = SCHEDULES.get(cfg.schedule.name)(optimizer, cfg.schedule, settings.total_steps)
    if cfg.train.compile:
        # Compile the children in place: state-dict keys stay free of `_orig_mod.`.
        for child in model.children():
            child.compile()
    step_module = dist.wrap(TrainStep(model, objective), device,
                            find_unused=_leaves_parameters_unused(cfg, stage, objective))
    parts = TrainParts(model=model, objective=objective, optimizer=optimizer, scheduler=scheduler,
                       scaler=torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16"),
                       batches=batches, val=data.val, device=device, step_module=step_module)
    return parts, settings


def _fit(cfg, stage, device, data, model, objective, train_split, run_dir, resume_from, parent) -> Path:
    parts, settings = build_train_parts(cfg, stage, device, data, model, objective, train_split)
    tracker = BestTracker(cfg.checkpoint.monitor, cfg.checkpoint.mode, cfg.train.early_stopping_patience)
    start_step, meta_base, protect = 0, _meta_base(cfg, stage, data, parent), ()
    if resume_from is not None:
        start_step, meta_base = _resume(parts, tracker, resume_from, meta_base)
        protect = (resume_from,)
        if dist.is_writer():
            note(f"resuming {run_dir} from step {start_step} ({resume_from.name})")
    log = MetricsLog(run_dir / "metrics.jsonl", resume_step=start_step if resume_from else None) if dist.is_writer() else None
    result = fit(parts, settings, run_dir, start_step=start_step, tracker=tracker, meta_base=meta_base, log=log,
                 protect=protect)
    handoff = result.best or result.last
    if dist.is_writer():
        note(f"{stage} done at step {result.step}" + (" (early stop)" if result.stopped_early else "")
             + f"; best {tracker.monitor} {tracker.best} at step {tracker.best_step}; next stage starts from {handoff}")
    return handoff


def _leaves_parameters_unused(cfg: Config, stage: str, objective) -> bool:
    """Whether some parameters get no gradient in some steps (DDP must then look for them)."""
    if getattr(objective, "uses_only_encoder", False):
        return True
    # Freezing (linear probe, finetune.freeze) starts at step 0; unfreezing only ends it.
    return stage == "finetune" and bool(frozen_patterns(cfg.finetune, 0))


def _resume(parts: TrainParts, tracker: BestTracker, checkpoint: Path, meta_base: dict) -> tuple[int, dict]:
    weights = ckpt.load_weights(checkpoint)
    model_keys = {k: v for k, v in weights.items() if not k.startswith("objective.")}
    objective_keys = {k[len("objective."):]: v for k, v in weights.items() if k.startswith("objective.")}
    parts.model.load_state_dict(model_keys)
    parts.objective.load_state_dict(objective_keys)
    step = restore_training_state(parts, tracker, ckpt.load_state(checkpoint))
    if dist.is_writer():  # a kill between a save's pointer moves may have left `best` elsewhere
        ckpt.point_best_at(checkpoint.parent, tracker.best_step)
    saved = ckpt.read_meta(checkpoint)
    # Lineage belongs to the run, not to this invocation: keep the parent the run started from.
    meta_base = {**meta_base, "parent": saved.get("parent"), "lineage": saved.get("lineage", [])}
    return step, meta_base


def _print_dry_run(cfg: Config, model, objective, data, train_split) -> None:
    sys.stdout.write(config_to_yaml(cfg))
    rows = summarize(model) + [("objective", sum(p.numel() for p in objective.parameters()))]
    note(f"data: {cfg.data.name} input {tuple(data.input_shape)}, {data.num_classes} classes; "
         f"train {len(train_split.x)}, val {len(data.val.x)}, test {len(data.test.x)}")
    for name, count in rows:
        note(f"  {name:<12} {count:>10,} parameters")
    note(f"  {'total':<12} {sum(c for _, c in rows):>10,} parameters (dry run: nothing trained)")
