"""Evaluate: a run or checkpoint -> metrics JSON and pictures.

A checkpoint carries its resolved config in meta.json, so evaluating needs nothing but the
checkpoint (plus optional overrides such as `data.root=...`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ptft import checkpoint as ckpt
from ptft import distributed as dist
from ptft import probes, report
from ptft.assembly import build_model_for
from ptft.config import Config, config_from_dict, load_config
from ptft.console import note
from ptft.data import build_data
from ptft.data.batches import iterate_eval
from ptft.data.fingerprint import val_overlap_problem
from ptft.data.normalize import recorded_normalization
from ptft.errors import DataError, UserError
from ptft.meta import CheckpointMeta
from ptft.models import MODELS
from ptft.rundir import RunDir
from ptft.runtime import configure_backend, resolve_device


def resolve_target(target: str, overrides: list[str]) -> tuple[Path, Config, Path]:
    """(checkpoint dir, config, run dir) for a config file, a run directory or a checkpoint.

    Raises:
        UserError: the target is none of these, or holds no checkpoint.
    """
    path = Path(target)
    if not path.exists():
        raise UserError(f"evaluate: '{target}' does not exist (expected a config file, a run directory or a checkpoint)")
    trusted: tuple[str, ...] = ()  # import paths the user's own config file names; meta.json's are refused
    if path.is_file():
        own = load_config(path, overrides)
        run_dir, trusted = Path(own.run.dir), (own.model.name, own.objective.name)
        if not ckpt.run_has_checkpoints(run_dir):
            raise UserError(f"evaluate: the run of config '{target}' ({run_dir}) has no checkpoint yet; train it first")
        path = run_dir
    try:
        checkpoint = ckpt.resolve_checkpoint(path)
    except UserError:
        raise UserError(
            f"evaluate: '{target}' is neither a config file, a run directory with checkpoints, nor a checkpoint directory"
        ) from None
    meta = ckpt.load_meta(checkpoint)
    cfg = config_from_dict(as_trained(meta.config), f"{checkpoint / ckpt.META_FILE}", overrides,
                           trusted_imports=trusted)
    return checkpoint, cfg, RunDir.of_target(path).root


# Keys added after older checkpoints were written, with the value those checkpoints were trained
# with where it differs from today's default (imagefolder stretched images before data.resize).
TRAINED_BEFORE_THE_KEY = {("data", "resize"): "stretch"}


def as_trained(config: dict) -> dict:
    """A checkpoint's saved config with keys it predates set as it was trained, not to today's defaults."""
    config = {section: dict(values) if isinstance(values, dict) else values for section, values in config.items()}
    for (section, key), value in TRAINED_BEFORE_THE_KEY.items():
        if isinstance(config.get(section), dict) and key not in config[section]:
            config[section][key] = value
    return config


# Evaluate streams: per batch it adds to metric tallies and drops the batch, so what it holds
# does not grow with the split (a 200k-image folder fits as well as digits). Only the images a
# picture shows and the encoder's features (float16, on the CPU) are kept.

@torch.inference_mode()
def _classifier_metrics(model, split, data, batch_size: int, out_dir: Path) -> dict:
    tally = report.ClassificationTally(data.class_names)
    for xb, yb in iterate_eval(split.x, split.y, batch_size):
        tally.add(model(xb), yb)
    metrics = tally.metrics()
    picture = out_dir / "confusion_matrix.png"
    report.save_confusion_matrix_png(metrics["confusion_matrix"], data.class_names, picture,
                                     title=f"confusion matrix (accuracy {metrics['accuracy']:.3f})")
    metrics["files"] = {"confusion_matrix": str(picture)}
    return metrics


@torch.inference_mode()
def _reconstruction_metrics(model, split, batch_size: int, out_dir: Path) -> dict:
    tally = report.ReconstructionTally()
    for xb, _ in iterate_eval(split.x, split.y, batch_size):
        tally.add(xb, model(xb))
    picture = out_dir / "reconstructions.png"
    tally.save_grid_png(picture)
    return {**tally.metrics(), "files": {"reconstructions": str(picture)}}


def _encoder_metrics(model, split, data, batch_size: int, seed: int, out_dir: Path) -> dict:
    """Reconstruction figures (autoencoders) and the encoder's k-NN / linear-probe accuracy."""
    metrics: dict = {"num_examples": len(split.x), "files": {}}
    if hasattr(model, "decoder"):
        metrics.update(_reconstruction_metrics(model, split, batch_size, out_dir))
    train_feats = probes.encode(model.encoder, data.labelled.x, batch_size)  # (N, D) float16, CPU
    test_feats = probes.encode(model.encoder, split.x, batch_size)
    metrics["knn_accuracy"] = report.knn_accuracy(train_feats, data.labelled.y, test_feats, split.y)
    metrics["linear_probe_accuracy"] = report.linear_probe_accuracy(train_feats, data.labelled.y, test_feats,
                                                                    split.y, seed=seed)
    metrics["probe_train_examples"] = len(data.labelled.x)
    return metrics


def _say_if_split_changed(meta: CheckpointMeta, fingerprint: dict) -> None:
    problem = val_overlap_problem(meta.data, fingerprint)
    if problem is not None:  # the checkpoint evaluated is the "parent" here
        note(f"note: the data overrides change the validation split the checkpoint was trained with; {problem}")


def evaluate(target: str, overrides: list[str], *, split: str = "test", out: Path | None = None) -> dict:
    """Evaluate the best (else last) checkpoint of `target` on a split.

    Returns:
        The metrics, also written to RUN_DIR/eval/<split>/metrics.json (or `out`).
    Raises:
        UserError: bad target, overrides, data or checkpoint.
    """
    checkpoint, cfg, run_dir = resolve_target(target, overrides)
    # Under torchrun rank 0 evaluates and writes; every rank returns its figures.
    with dist.session(cfg.train.device, timeout_s=cfg.train.dist_timeout_s) as device_spec:
        return dist.on_writer(_evaluate_checkpoint, checkpoint, cfg, run_dir, device_spec, split, out)


def _evaluate_checkpoint(checkpoint: Path, cfg: Config, run_dir: Path, device_spec: str, split: str,
                         out: Path | None) -> dict:
    meta = ckpt.load_meta(checkpoint)
    device = resolve_device(device_spec)
    configure_backend(device, cfg.train)
    data = build_data(cfg.data, device)
    _say_if_split_changed(meta, data.fingerprint)
    data.normalization = recorded_normalization(meta)  # the numbers the model was trained with, whatever the config says now
    model = build_model_for(cfg, data)
    weights, _ = ckpt.unpack_weights(ckpt.load_weights(checkpoint))  # the objective's are training-only
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise UserError(f"evaluate: checkpoint {checkpoint} does not fit model {cfg.model.name!r}: {exc}") from None
    model.to(device).eval()
    out_file = Path(out) if out else RunDir(run_dir).eval_metrics(split)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    chosen = data.test if split == "test" else data.val
    if len(chosen.x) == 0:
        raise DataError(f"evaluate: the {split} split of {cfg.data.name} (data.root '{cfg.data.root}') holds no "
                        f"images; add a test/ folder (or more images per class) or evaluate --split "
                        f"{'val' if split == 'test' else 'test'}")
    kind = MODELS.meta(cfg.model.name).get("kind")
    batch_size = cfg.data.eval_batch_size
    if kind == "classifier":
        metrics = _classifier_metrics(model, chosen, data, batch_size, out_file.parent)
    else:
        metrics = _encoder_metrics(model, chosen, data, batch_size, cfg.run.seed, out_file.parent)
    metrics.update(split=split, checkpoint=str(checkpoint), step=meta.step, stage=meta.stage,
                   model=cfg.model.name, dataset=cfg.data.name, config_hash=meta.config_hash, lineage=meta.lineage)
    report.write_metrics_json(metrics, out_file)
    note(f"evaluated {checkpoint} on {cfg.data.name}/{split}: metrics in {out_file}")
    return metrics
