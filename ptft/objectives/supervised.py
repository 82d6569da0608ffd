"""Softmax cross-entropy on labels: supervised pretraining and every finetuning run."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Supervised(nn.Module):
    """Cross-entropy of the classifier's logits against the labels; logs accuracy as `acc`.

    Args:
        label_smoothing: weight moved from the true class to a uniform target, in [0, 1).
    """

    needs_labels = True

    def __init__(self, label_smoothing: float):
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = model(x).float()  # (N, num_classes)
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        accuracy = (logits.argmax(1) == y).float().mean()
        return loss, {"acc": accuracy}
