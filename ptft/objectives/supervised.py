"""Softmax cross-entropy on labels: supervised pretraining and every finetuning run."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ptft.errors import UserError
from ptft.objectives import EVAL_CHUNK_SIZE
from ptft.objectives.augment import Augment

BALANCED = "balanced"


class Supervised(nn.Module):
    """Cross-entropy of the classifier's logits against the labels; logs accuracy as `acc`.

    Args:
        label_smoothing: weight moved from the true class to a uniform target, in [0, 1).
        augment: draws a random view of each training batch; None trains on the images as they are.
        class_weights: None (every example counts alike), "balanced" (n / (C * n_c) from the labels
            passed to `fit_to_labels`) or one positive weight per class. Accuracy stays unweighted.
        num_classes: C, the classifier's number of outputs (checks a weight list against it).
    Raises:
        UserError: a weight list of the wrong length or with a weight that is not positive.
    """

    needs_labels = True

    def __init__(self, label_smoothing: float, augment: Augment | None = None,
                 class_weights: str | list[float] | None = None, num_classes: int | None = None):
        super().__init__()
        self.label_smoothing = label_smoothing
        self.augment = augment
        self.num_classes = num_classes
        self.balanced = class_weights == BALANCED
        weights = None if class_weights is None or self.balanced else _checked_weights(class_weights, num_classes)
        # Not saved: the weights follow from the config and the labelled subset the run records, and a
        # checkpoint keeps the same keys whatever the weighting (finetuning drops `objective.` anyway).
        self.register_buffer("class_weight", weights, persistent=False)
        # Validation averages per-batch means; a weighted mean per batch depends on where batches
        # start, so weighted runs validate in fixed chunks (data.eval_batch_size may change on resume).
        # Unweighted: per-example means, any batching agrees; validation draws nothing.
        self.eval_chunk_size = None if class_weights is None else EVAL_CHUNK_SIZE

    def fit_to_labels(self, labels: torch.Tensor) -> None:
        """With "balanced" weights, set them from the training labels (N,); otherwise do nothing.

        Raises:
            UserError: a class has no example among `labels` (its weight would be infinite).
        """
        if self.balanced:
            self.class_weight = balanced_class_weights(labels, self.num_classes)

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.balanced and self.class_weight is None:
            raise RuntimeError("Supervised(class_weights='balanced'): call fit_to_labels(labels) with the "
                               "labelled subset before the first forward")
        # Only while training: validation loss picks the best checkpoint and must see real images.
        if self.augment is not None and self.training:
            x = self.augment(x, generator)
        logits = model(x).float()  # (N, num_classes)
        loss = F.cross_entropy(logits, y, weight=self.class_weight, label_smoothing=self.label_smoothing)
        accuracy = (logits.argmax(1) == y).float().mean()
        return loss, {"acc": accuracy}


def balanced_class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """n / (C * n_c) per class c, on the labels' device: each class then carries the same total weight.

    Raises:
        UserError: a class has no example among `labels`.
    """
    counts = torch.bincount(labels.flatten(), minlength=num_classes)  # (C,)
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        raise UserError(
            f"objective.class_weights: 'balanced' needs a labelled example of every class, but class(es) "
            f"{', '.join(map(str, empty))} have none in the labelled subset; raise data.labels_per_class or "
            f"data.label_fraction, or give one weight per class")
    return len(labels) / (num_classes * counts.float())


def _checked_weights(weights: list[float], num_classes: int | None) -> torch.Tensor:
    if (num_classes is not None and len(weights) != num_classes) or not all(
            math.isfinite(w) and w > 0 for w in weights):
        expected = f"{num_classes} positive weights (one per class, in class order)" if num_classes else \
            "positive weights, one per class"
        raise UserError(f"objective.class_weights: expected '{BALANCED}' or {expected}, got {weights!r}")
    return torch.tensor(weights, dtype=torch.float32)
