"""Evaluate: a run or checkpoint -> metrics JSON and pictures.

A checkpoint carries its resolved config in meta.json, so evaluating needs nothing but the
checkpoint (plus optional overrides such as `data.root=...`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ptft import checkpoint as ckpt
from ptft import distributed as dist
from ptft import report
from ptft.assembly import build_model_for
from ptft.config import Config, config_from_dict, load_config
from ptft.console import note
from ptft.data import build_data
from ptft.data.batches import iterate_eval
from ptft.data.fingerprint import val_overlap_problem
from ptft.data.normalize import recorded_normalization
from ptft.errors import UserError
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
    cfg = config_from_dict(meta.config, f"{checkpoint / ckpt.META_FILE}", overrides, trusted_imports=trusted)
    return checkpoint, cfg, RunDir.of_target(path).root


@torch.inference_mode()
def _outputs(module: torch.nn.Module, x: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs as float, outputs) over a split in large batches."""
    inputs, outputs = [], []
    for xb, _ in iterate_eval(x, torch.zeros(len(x), dtype=torch.long, device=x.device), batch_size):
        inputs.append(xb)
        outputs.append(module(xb).float())
    return torch.cat(inputs), torch.cat(outputs)


def _classifier_metrics(model, split, data, batch_size: int, out_dir: Path) -> dict:
    _, logits = _outputs(model, split.x, batch_size)
    metrics = report.classification_metrics(logits, split.y, data.class_names)
    picture = out_dir / "confusion_matrix.png"
    report.save_confusion_matrix_png(metrics["confusion_matrix"], data.class_names, picture,
                                     title=f"confusion matrix (accuracy {metrics['accuracy']:.3f})")
    metrics["files"] = {"confusion_matrix": str(picture)}
    return metrics


def _encoder_metrics(model, split, data, batch_size: int, seed: int, out_dir: Path) -> dict:
    """Reconstruction figures (autoencoders) and the encoder's k-NN / linear-probe accuracy."""
    metrics: dict = {"num_examples": len(split.x), "files": {}}
    if hasattr(model, "decoder"):
        inputs, recon = _outputs(model, split.x, batch_size)
        metrics.update(report.reconstruction_metrics(inputs, recon))
        picture = out_dir / "reconstructions.png"
        report.save_reconstruction_grid_png(inputs, recon, picture)
        metrics["files"]["reconstructions"] = str(picture)
    _, train_feats = _outputs(model.encoder, data.labelled.x, batch_size)
    _, test_feats = _outputs(model.encoder, split.x, batch_size)
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
    with dist.session(cfg.train.device) as device_spec:
        return dist.on_writer(_evaluate_checkpoint, checkpoint, cfg, run_dir, device_spec, split, out)


def _evaluate_checkpoint(checkpoint: Path, cfg: Config, run_dir: Path, device_spec: str, split: str,
                         out: Path | None) -> dict:
    meta = ckpt.load_meta(checkpoint)
    device = resolve_device(device_spec)
    configure_backend(device)
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
