"""A linear probe on features computed once: the frozen encoder sees each example once, not every step.

`finetune.mode: linear_probe` with the encoder frozen for the whole run (no `unfreeze_at_step`,
no semi-supervised `unlabelled`, `finetune.precompute_features` left on; see
`FinetunePlan.probe_on_features`) makes the encoder a fixed function of the image. Its features
of the labelled subset and of the validation split are then computed once, in eval mode, in
chunks without autograd, and only the head trains, on them: a probe of a ViT-B on the CPU costs
one encoder pass over the data instead of one per step.

Augmentation is off in this mode. A random view of an image is a new input the encoder would
have to run on at every step, the very cost this mode removes; `finetune.precompute_features:
false` keeps the per-step path, views included. The encoder runs in eval mode (dropout and
stochastic depth off; batch norm on its running statistics, as frozen batch norm is anyway).

Nothing else changes: the training batches are built as for images (ptft.assembly.training_batches),
over the features, so step s trains on the examples the image path would; the optimizer keeps
the whole model's parameter groups (the encoder's get no gradient); checkpoints hold the whole
classifier, so evaluate, predict, export and --resume see a classifier as ever. Features are a
pure function of the frozen encoder and the data: a resumed run recomputes them from the weights
it resumed, which ptft/stages.py loads before the parts are built. Under torchrun every rank
computes all of them (the same on each) and keeps its slice of each batch, as for images.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from ptft.data.batches import to_float
from ptft.data.tensors import TensorSplit
from ptft.models.compose import Classifier
from ptft.runtime import autocast

# Options of the supervised objective that do not make views of the images (every other one does).
NOT_VIEW_OPTIONS = ("label_smoothing", "class_weights")


@dataclass
class ProbeFeatures:
    """What a linear probe on precomputed features trains and validates on."""

    head: nn.Module  # Classifier(Identity, the model's head): features (N, D) -> logits (N, num_classes)
    train: TensorSplit  # x: (N, D) float32 features of the labelled subset, y its labels
    val: TensorSplit  # x: (V, D) features of the validation split


def trains_on_features(plan, model: nn.Module) -> bool:
    """Whether this run's linear probe trains its head on precomputed features.

    Only a `Classifier`, whose forward is head(encoder(x)): a user's classifier with another
    forward keeps the per-step path.
    """
    return plan is not None and plan.probe_on_features and isinstance(model, Classifier)


def probe_features(model: Classifier, train: TensorSplit, val: TensorSplit, *, batch_size: int,
                   precision: str) -> ProbeFeatures:
    """The head of `model` (sharing its parameters) and its encoder's features of `train` and `val`.

    Args:
        model: the classifier, on the training device, with the weights the probe starts from.
        train, val: images (N, C, H, W) and labels on the same device.
        batch_size: examples per encoder forward (data.eval_batch_size).
        precision: the run's train.precision; features are computed under its autocast and kept as float32.
    """
    head = Classifier(nn.Identity(), model.head, model.head_dropout)
    width = model.head.in_features

    def features(split: TensorSplit) -> TensorSplit:
        return TensorSplit(frozen_features(model.encoder, split.x, batch_size, precision, width), split.y)

    return ProbeFeatures(head, features(train), features(val))


@torch.no_grad()  # not inference_mode: the head's backward saves these features as its input
def frozen_features(encoder: nn.Module, x: torch.Tensor, batch_size: int, precision: str,
                    width: int) -> torch.Tensor:
    """(N, width) float32 features of images x (N, C, H, W), by eval-mode chunks; the encoder's modes are restored."""
    modes = [(module, module.training) for module in encoder.modules()]
    encoder.eval()
    try:
        chunks = [torch.zeros((0, width), device=x.device)]  # an empty split has no chunk of its own
        for start in range(0, len(x), batch_size):
            with autocast(precision, x.device):
                chunks.append(encoder(to_float(x[start:start + batch_size])).float())
        return torch.cat(chunks)
    finally:
        for module, training in modes:
            module.training = training


def switch_off_views(objective: nn.Module) -> None:
    """The supervised objective trains on the features as they are: it has no images to draw views of."""
    if getattr(objective, "augment", None) is not None:
        objective.augment = None


def unused_views_warning(plan, model: nn.Module, objective_cfg, builder) -> str | None:
    """A warning naming the objective's view options (augmentation) that a probe on features ignores.

    Args:
        plan: the run's FinetunePlan (None: pretraining, no warning).
        model: the run's model (see `trains_on_features`).
        objective_cfg: the config's `objective` section (its options, defaults filled in).
        builder: the objective's registry builder, whose keyword defaults tell which options were set.
    """
    if not trains_on_features(plan, model):
        return None
    defaults = {name: param.default for name, param in inspect.signature(builder).parameters.items()
                if param.kind is inspect.Parameter.KEYWORD_ONLY}
    changed = [f"objective.{name}={value}" for name, value in objective_cfg.options.items()
               if name in defaults and name not in NOT_VIEW_OPTIONS and _plain(value) != _plain(defaults[name])]
    if not changed:
        return None
    return (f"warning: finetune.mode=linear_probe computes the frozen encoder's features once, without "
            f"augmentation, so {', '.join(changed)} {'is' if len(changed) == 1 else 'are'} not used; set "
            f"finetune.precompute_features=false to draw augmented views every step (the encoder then runs every step)")


def _plain(value):
    # A tuple default and a list from YAML say the same thing.
    return list(value) if isinstance(value, (tuple, list)) else value
