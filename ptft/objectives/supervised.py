"""Softmax cross-entropy on labels: supervised pretraining and every finetuning run."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ptft.objectives.augment import Augment


class Supervised(nn.Module):
    """Cross-entropy of the classifier's logits against the labels; logs accuracy as `acc`.

    Args:
        label_smoothing: weight moved from the true class to a uniform target, in [0, 1).
        augment: draws a random view of each training batch; None trains on the images as they are.
    """

    needs_labels = True
    eval_chunk_size = None  # validation draws nothing: per-example means, any batching agrees

    def __init__(self, label_smoothing: float, augment: Augment | None = None):
        super().__init__()
        self.label_smoothing = label_smoothing
        self.augment = augment

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # Only while training: validation loss picks the best checkpoint and must see real images.
        if self.augment is not None and self.training:
            x = self.augment(x, generator)
        logits = model(x).float()  # (N, num_classes)
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        accuracy = (logits.argmax(1) == y).float().mean()
        return loss, {"acc": accuracy}
