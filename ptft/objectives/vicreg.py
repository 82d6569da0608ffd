"""VICReg (Bardes, Ponce & LeCun 2022): variance-invariance-covariance regularisation of two views.

No negatives and no temperature: the two views' projections are pulled together (invariance),
each dimension is kept spread over the batch (variance) and the dimensions are decorrelated
(covariance), which is what keeps the features from collapsing. The views and the projector are
the contrastive objective's; the projector is saved under `objective.` and left behind by finetuning.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ptft.objectives import EVAL_CHUNK_SIZE
from ptft.objectives.augment import Augment
from ptft.objectives.contrastive import projection_head

# Keeps the standard deviation's gradient finite when a dimension has collapsed to a constant.
VARIANCE_EPS = 1e-4


def variance_loss(z: torch.Tensor) -> torch.Tensor:
    """Mean over the P dimensions of relu(1 - std), std over the batch of (N, P) projections."""
    std = torch.sqrt(z.var(dim=0) + VARIANCE_EPS)  # (P,)
    return F.relu(1 - std).mean()


def covariance_loss(z: torch.Tensor) -> torch.Tensor:
    """Sum of the squared off-diagonal covariances of (N, P) projections, divided by P."""
    n, p = z.shape
    z = z - z.mean(dim=0)
    cov = z.T @ z / (n - 1)  # (P, P)
    off_diagonal = cov - torch.diag(torch.diagonal(cov))
    return off_diagonal.pow(2).sum() / p


def vicreg_terms(z1: torch.Tensor, z2: torch.Tensor) -> dict[str, torch.Tensor]:
    """The three unweighted terms for (N, P) projections of two views (row i of each from image i).

    invariance: mean squared difference; variance and covariance: the mean of the two views' terms.
    """
    with torch.autocast(z1.device.type, enabled=False):  # variances of bf16 values lose the small ones
        z1, z2 = z1.float(), z2.float()
        return {"invariance": F.mse_loss(z1, z2),
                "variance": (variance_loss(z1) + variance_loss(z2)) / 2,
                "covariance": (covariance_loss(z1) + covariance_loss(z2)) / 2}


class VICReg(nn.Module):
    """Weighted invariance + variance + covariance terms on projected encoder features of two views.

    Args:
        in_features: the encoder's feature width D.
        augment: draws one random view of a batch.
        hidden_dim, projector_dim: widths of the projector.
        invariance_weight, variance_weight, covariance_weight: the terms' weights (paper: 25, 25, 1).
    """

    needs_labels = False
    uses_only_encoder = True  # a decoder or head gets no gradient (DDP must know)
    eval_chunk_size = EVAL_CHUNK_SIZE  # variance and covariance are statistics of the batch

    def __init__(self, in_features: int, augment: Augment, hidden_dim: int, projector_dim: int,
                 invariance_weight: float, variance_weight: float, covariance_weight: float):
        super().__init__()
        self.augment = augment
        self.projector = projection_head(in_features, hidden_dim, projector_dim)
        self.weights = {"invariance": invariance_weight, "variance": variance_weight,
                        "covariance": covariance_weight}

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        views = torch.cat([self.augment(x, generator), self.augment(x, generator)])  # (2N, C, H, W)
        # One encoder pass over both views, as contrastive does, so batch norm sees one batch.
        z1, z2 = self.projector(model.encoder(views)).chunk(2)  # (N, P) each
        terms = vicreg_terms(z1, z2)
        loss = sum(self.weights[name] * value for name, value in terms.items())
        return loss, {name: value.detach() for name, value in terms.items()}
