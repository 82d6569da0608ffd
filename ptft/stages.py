"""Pretrain and finetune: config -> data, model, objective -> engine -> checkpoint.

The composition root. Both stages are one function, `train`, over parts built in
ptft/assembly.py; what differs for finetuning (a classifier, the labelled subset, frozen
layers, parameter groups) is its `FinetunePlan`, computed once, and `init.checkpoint`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from ptft import checkpoint as ckpt
from ptft import distributed as dist
from ptft.assembly import Run, build_run, build_tracker, build_train_parts, check_monitor
from ptft.config import Config, config_to_yaml
from ptft.console import note, print_key_report, write_stdout
from ptft.ema import STATE_KEY as EMA_STATE_KEY
from ptft.engine import BestTracker, ResumePoint, TrainParts, fit, restore_training_state
from ptft.features import trains_on_features, unused_views_warning
from ptft.finetuning import check_freeze_patterns, random_probe_warning
from ptft.lineage import check_parent_split, expected_inputs, normalization_warning, parent_facts, resolve_init
from ptft.loggers import check_loggers
from ptft.meta import CheckpointMeta, run_meta
from ptft.models import summarize
from ptft.objectives import OBJECTIVES
from ptft.rundir import check_resume_compatible, prepare_run_dir, run_dir_lock, write_config
from ptft.runtime import check_precision, configure_backend, resolve_device, seed_everything
from ptft.weights import match_into, read_state_dict


def load_init_weights(cfg: Config, model: torch.nn.Module, fingerprint: dict) -> dict:
    """Load `init.checkpoint` into a fresh model, print the key report, return lineage facts.

    `fingerprint` is this run's data split (DataBundle.fingerprint), held against a ptft parent's.
    """
    source = resolve_init(cfg.init)
    state = read_state_dict(source.path, prefix_map=cfg.init.prefix_map)
    warning = check_parent_split(fingerprint, source)
    if warning:
        note(warning)
    report = match_into(model, state, load_head=cfg.init.load_head, strict=cfg.init.strict, source=source.given)
    print_key_report(report.rows(), source.given)
    expects = expected_inputs(source, model)
    warning = normalization_warning(cfg.data.normalize, expects, source, model)
    if warning:
        note(warning)
    return parent_facts(source, report, expects)


def train(cfg: Config, stage: str, *, resume: bool = False, overwrite: bool = False, dry_run: bool = False) -> Path | None:
    """Run one training stage ("pretrain" or "finetune") as the config says.

    Returns:
        The checkpoint the next stage should start from (best, else last), or None for a dry run.
    Raises:
        UserError: bad config values, data, init checkpoint or run directory (exit 2).
        TrainingInterrupted: SIGINT/SIGTERM; a resumable checkpoint was written (exit 130).
    """
    # `held` keeps the run dir's lock (taken by rank 0 in _prepare) until fitting ends.
    with dist.session(cfg.train.device, timeout_s=cfg.train.dist_timeout_s) as device_spec, \
            contextlib.ExitStack() as held:
        device = resolve_device(device_spec)
        check_precision(cfg.train.precision, device)
        configure_backend(device, cfg.train)
        seed_everything(cfg.run.seed)
        run = build_run(cfg, device, stage=stage)
        parent = check_before_training(run, resume)
        if dry_run:
            _print_dry_run(run)
            return None
        dist.check_global_batch(cfg.data.batch_size, len(run.train_split.x))
        run_dir = Path(cfg.run.dir)
        resume_from = dist.on_writer(_prepare, run_dir, cfg, resume, overwrite, held)
        return _fit(run, run_dir, resume_from, parent)


def check_before_training(run: Run, resume: bool) -> dict | None:
    """What a dry run and a real run refuse before step 1, cheapest first; loads `init.checkpoint`.

    Returns:
        The init checkpoint's lineage facts (`load_init_weights`), or None without one.
    Raises:
        UserError: a logger whose package is missing, a freeze pattern matching nothing, a monitor
            validation never logs, init weights that do not load, a supervised parent split another way.
    """
    cfg = run.cfg
    check_loggers(cfg.train.loggers)
    if run.plan is not None:
        check_freeze_patterns(run.model, run.plan.freeze.patterns)
        builder = OBJECTIVES.get(cfg.objective.name)
        for warning in (random_probe_warning(run.plan, cfg.init.checkpoint),
                        unused_views_warning(run.plan, run.model, cfg.objective, builder)):
            if warning:
                note(warning)
    check_monitor(run)
    if cfg.init.checkpoint and not resume:
        return load_init_weights(cfg, run.model, run.data.fingerprint)
    return None


def _prepare(run_dir: Path, cfg: Config, resume: bool, overwrite: bool, held: contextlib.ExitStack) -> Path | None:
    """Rank 0: lock, check and clear the run directory, write the config; the checkpoint to resume from."""
    held.enter_context(run_dir_lock(run_dir, resume=resume))  # before anything reads or clears the directory
    resume_from = prepare_run_dir(run_dir, resume=resume, overwrite=overwrite)
    if resume:
        check_resume_compatible(run_dir, cfg)
    write_config(run_dir, cfg)
    return resume_from


def _fit(run: Run, run_dir: Path, resume_from: Path | None, parent: dict | None) -> Path:
    if resume_from is not None and trains_on_features(run.plan, run.model):
        # The probe's features come from the frozen encoder it resumes, before the parts are built.
        run.model.load_state_dict(ckpt.unpack_weights(ckpt.load_weights(resume_from))[0])
    parts, settings = build_train_parts(run)
    tracker = build_tracker(run.cfg)
    meta_base, resumed = run_meta(run.cfg, run.stage, run.data, parent), None
    if resume_from is not None:
        step, meta_base = _resume(parts, tracker, resume_from, meta_base)
        resumed = ResumePoint(step, resume_from)
        note(f"resuming {run_dir} from step {step} ({resume_from.name})")
    result = fit(parts, settings, run_dir, tracker=tracker, meta_base=meta_base, resumed=resumed)
    handoff = result.best or result.last
    note(f"{run.stage} done at step {result.step}" + (" (early stop)" if result.stopped_early else "")
         + f"; best {tracker.monitor} {tracker.best} at step {tracker.best_step}; next stage starts from {handoff}")
    return handoff


def _resume(parts: TrainParts, tracker: BestTracker, checkpoint: Path,
            meta_base: CheckpointMeta) -> tuple[int, CheckpointMeta]:
    model_state, objective_state = ckpt.unpack_weights(ckpt.load_weights(checkpoint))
    state = ckpt.load_state(checkpoint)
    if parts.ema is None:
        parts.model.load_state_dict(model_state)
        parts.objective.load_state_dict(objective_state)
    else:  # model.safetensors holds the average; the trained weights are in state.pt
        parts.ema.restore(model_state, objective_state, state.get(EMA_STATE_KEY))
    step = restore_training_state(parts, tracker, state)
    if dist.is_writer():  # a kill between a save's pointer moves may have left `best` elsewhere
        ckpt.point_best_at(checkpoint.parent, tracker.best_step)
    return step, meta_base.with_lineage_of(ckpt.load_meta(checkpoint))


def _print_dry_run(run: Run) -> None:
    data = run.data
    write_stdout(config_to_yaml(run.cfg))
    rows = summarize(run.model) + [("objective", sum(p.numel() for p in run.objective.parameters()))]
    note(f"data: {run.cfg.data.name} input {tuple(data.input_shape)}, {data.num_classes} classes; "
         f"train {len(run.train_split.x)}, val {len(data.val.x)}, test {len(data.test.x)}")
    for name, count in rows:
        note(f"  {name:<12} {count:>10,} parameters")
    note(f"  {'total':<12} {sum(c for _, c in rows):>10,} parameters (dry run: nothing trained)")
