"""A run or checkpoint -> its model with the checkpoint's weights, ready for inference."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ptft import checkpoint as ckpt
from ptft.config import Config
from ptft.data.normalize import attach_normalization
from ptft.data.resize import attach_input_size
from ptft.errors import CheckpointError, UserError
from ptft.evaluation import resolve_target
from ptft.inference.preprocess import Preprocessing, preprocessing_of
from ptft.meta import CheckpointMeta
from ptft.models import build_model
from ptft.runtime import resolve_device

KINDS = ("classifier", "autoencoder", "encoder")


@dataclass
class Target:
    """A loaded model (eval mode, on `device`) and the facts about it that inference needs."""

    model: torch.nn.Module
    kind: str  # one of KINDS
    checkpoint: Path
    cfg: Config
    meta: CheckpointMeta
    prep: Preprocessing
    device: torch.device


def load_target(target: str, command: str, device: str | None = None) -> Target:
    """The best (else last) checkpoint of `target` (as `evaluate` accepts it) as a ready model.

    Args:
        target: a config file, a run directory or a checkpoint directory.
        command: the command's name, for messages.
        device: where to run; None follows the run's train.device.
    Raises:
        UserError: the target holds no checkpoint, or its weights do not fit its model.
    """
    try:
        checkpoint, cfg, _ = resolve_target(target, [])
    except UserError as exc:
        # resolve_target speaks for evaluate; the same target rules hold here.
        if not str(exc).startswith("evaluate: "):
            raise
        raise UserError(f"{command}: {str(exc).removeprefix('evaluate: ')}") from None
    meta = ckpt.load_meta(checkpoint)
    prep = preprocessing_of(cfg, meta)
    model = build_model(cfg.model, prep.input_shape, len(prep.class_names), cfg.objective.name)
    # Fitted and normalised as the model was trained (meta.json), whatever the config says now.
    model = attach_normalization(attach_input_size(model, prep.input_shape[1:] if prep.decoded_size else None),
                                 prep.normalization)
    weights, _ = ckpt.unpack_weights(ckpt.load_weights(checkpoint))  # the objective's (a projector) not needed
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise CheckpointError(f"{command}: checkpoint {checkpoint} does not fit model {cfg.model.name!r}: "
                              f"{str(exc).splitlines()[0]}") from None
    run_on = resolve_device(device or cfg.train.device)
    return Target(model.to(run_on).eval(), _kind(model, meta), checkpoint, cfg, meta, prep, run_on)


def _kind(model: torch.nn.Module, meta: CheckpointMeta) -> str:
    """The registry's kind; for a user's import-path model, what its parts say."""
    kind = (meta.model or {}).get("kind")
    if kind in KINDS:
        return kind
    if hasattr(model, "head"):
        return "classifier"
    return "autoencoder" if hasattr(model, "decoder") else "encoder"
