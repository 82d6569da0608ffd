"""Evaluate: a run or checkpoint -> metrics JSON and pictures.

A checkpoint carries its resolved config in meta.json, so evaluating needs nothing but the
checkpoint (plus optional overrides such as `data.root=...`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
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
from ptft.data.tensors import TensorSplit
from ptft.errors import DataError, UserError
from ptft.meta import CheckpointMeta
from ptft.models import model_kind
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
# Under torchrun each rank evaluates its slice of whole batches (`dist.shard_rows`): the tallies
# are summed over ranks and the probes' features gathered on rank 0, which alone runs the probes,
# draws the pictures (rank 0's slice starts the split: the same images) and writes metrics.json.
# Each `_*_results` runs on every rank and returns what rank 0 then runs to finish, given eval/<split>/.

def _my_slice(split: TensorSplit, batch_size: int) -> TensorSplit:
    rows = dist.shard_rows(len(split.y), batch_size)
    return TensorSplit(split.x[rows], split.y[rows])


@torch.inference_mode()
def _classifier_results(model, split, data, batch_size: int) -> Callable[[Path], dict]:
    tally = report.ClassificationTally(data.class_names)
    mine = _my_slice(split, batch_size)
    for xb, yb in iterate_eval(mine.x, mine.y, batch_size):
        tally.add(model(xb), yb)
    tally.all_reduce()
    return functools.partial(_finish_classifier, tally, data.class_names)


def _finish_classifier(tally: report.ClassificationTally, class_names: list[str], out_dir: Path) -> dict:
    metrics = tally.metrics()
    picture = out_dir / "confusion_matrix.png"
    report.save_confusion_matrix_png(metrics["confusion_matrix"], class_names, picture,
                                     title=f"confusion matrix (accuracy {metrics['accuracy']:.3f})")
    metrics["files"] = {"confusion_matrix": str(picture)}
    return metrics


@torch.inference_mode()
def _reconstruction_tally(model, split, batch_size: int) -> report.ReconstructionTally:
    tally = report.ReconstructionTally()
    mine = _my_slice(split, batch_size)
    for xb, _ in iterate_eval(mine.x, mine.y, batch_size):
        tally.add(xb, model(xb))
    tally.all_reduce()
    return tally


def _encoder_results(model, split, data, batch_size: int, seed: int) -> Callable[[Path], dict]:
    """Reconstruction figures (autoencoders) and the encoder's k-NN / linear-probe accuracy."""
    reconstruction = _reconstruction_tally(model, split, batch_size) if hasattr(model, "decoder") else None
    train_feats = _gathered_features(model.encoder, data.labelled, batch_size)  # (N, D) float16, CPU, rank 0
    test_feats = _gathered_features(model.encoder, split, batch_size)
    return functools.partial(_finish_encoder, reconstruction, (train_feats, data.labelled.y), (test_feats, split.y),
                             seed)


def _gathered_features(encoder, split: TensorSplit, batch_size: int):
    mine = _my_slice(split, batch_size)
    features = probes.encode(encoder, mine.x, batch_size) if len(mine.y) else None
    return dist.gather_rows(features, everywhere=False)


def _finish_encoder(reconstruction, train: tuple, test: tuple, seed: int, out_dir: Path) -> dict:
    (train_feats, train_labels), (test_feats, test_labels) = train, test
    metrics: dict = {"num_examples": len(test_labels), "files": {}}
    if reconstruction is not None:
        picture = out_dir / "reconstructions.png"
        reconstruction.save_grid_png(picture)
        metrics.update({**reconstruction.metrics(), "files": {"reconstructions": str(picture)}})
    metrics["knn_accuracy"] = report.knn_accuracy(train_feats, train_labels, test_feats, test_labels)
    metrics["linear_probe_accuracy"] = report.linear_probe_accuracy(train_feats, train_labels, test_feats,
                                                                    test_labels, seed=seed)
    metrics["probe_train_examples"] = len(train_labels)
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
    # Under torchrun every rank evaluates its slice, rank 0 writes; every rank returns rank 0's figures.
    with dist.session(cfg.train.device, timeout_s=cfg.train.dist_timeout_s) as device_spec:
        return _evaluate_checkpoint(checkpoint, cfg, run_dir, device_spec, split, out)


def _evaluate_checkpoint(checkpoint: Path, cfg: Config, run_dir: Path, device_spec: str, split: str,
                         out: Path | None) -> dict:
    meta = ckpt.load_meta(checkpoint)
    device = resolve_device(device_spec)
    configure_backend(device, cfg.train)
    # Nothing placed: the split (and a probe's labelled examples) are read onto the device batch by batch.
    data = dist.load_on_every_rank(build_data, cfg.data, device, reads=())
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
    chosen = data.test if split == "test" else data.val
    if len(chosen.x) == 0:
        raise DataError(f"evaluate: the {split} split of {cfg.data.name} (data.root '{cfg.data.root}') holds no "
                        f"images; add a test/ folder (or more images per class) or evaluate --split "
                        f"{'val' if split == 'test' else 'test'}")
    kind = model_kind(cfg.model.name, cfg.objective.name)  # a backbone with ptft's decoder is an autoencoder
    batch_size = cfg.data.eval_batch_size
    if kind == "classifier":
        finish = _classifier_results(model, chosen, data, batch_size)
    else:
        finish = _encoder_results(model, chosen, data, batch_size, cfg.run.seed)
    facts = dict(split=split, checkpoint=str(checkpoint), step=meta.step, stage=meta.stage, model=cfg.model.name,
                 dataset=cfg.data.name, config_hash=meta.config_hash, lineage=meta.lineage)
    return dist.on_writer(_write_results, finish, facts, out_file)


def _write_results(finish: Callable[[Path], dict], facts: dict, out_file: Path) -> dict:
    """Rank 0: the metrics (probes, pictures) with the checkpoint's facts, written to `out_file`."""
    out_file.parent.mkdir(parents=True, exist_ok=True)
    metrics = {**finish(out_file.parent), **facts}
    report.write_metrics_json(metrics, out_file)
    note(f"evaluated {facts['checkpoint']} on {facts['dataset']}/{facts['split']}: metrics in {out_file}")
    return metrics
