"""SimCLR: two augmented views per image, a projection head, and the NT-Xent loss.

The projection head belongs to the objective, not the model: it is saved under `objective.`
and finetuning, which keeps only the encoder, leaves it behind.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from ptft.errors import UserError
from ptft.objectives import EVAL_CHUNK_SIZE
from ptft.objectives.augment import Augment, blur_kernel_for

# objective.preset simclr_rgb: SimCLR's ImageNet views (Chen et al. 2020, appendix A). Its geometry
# (crops of 8-100% of the area, mirrored half the time) is PRESETS["simclr_rgb"] in
# ptft/objectives/__init__.py; the colour part is this: jitter of strength 1 with p 0.8, grey with
# p 0.2, a blur of 10% of the image side with p 0.5.
SIMCLR_RGB_COLOUR = {"brightness": 0.8, "contrast": 0.8, "saturation": 0.8, "hue": 0.2, "jitter_p": 0.8,
                     "grayscale_p": 0.2, "blur_p": 0.5, "blur_sigma": (0.1, 2.0)}


def with_simclr_colour(augment: Augment, input_shape: tuple[int, int, int]) -> Augment:
    """`augment` plus SimCLR's colour and blur ops.

    Raises:
        UserError: images that are not RGB (they have no colour to jitter).
    """
    channels, height, width = input_shape
    if channels != 3:
        raise UserError(f"objective.preset: simclr_rgb is for RGB images; these have {channels} channel(s): "
                        "use preset grey or grey_objects")
    return dataclasses.replace(augment, **SIMCLR_RGB_COLOUR, blur_kernel=blur_kernel_for(min(height, width)))


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised-temperature cross-entropy over two views.

    Each of the 2N projections must pick its partner view among the 2N - 1 others, with
    cosine similarity / temperature as logits.

    Args:
        z1, z2: (N, P) projections of the two views; row i of each comes from image i.
        temperature: softmax temperature (> 0).
    Returns:
        (loss, accuracy): the mean cross-entropy, and the fraction of the 2N projections
        whose partner has the highest similarity; both 0-dim float32 tensors.
    """
    n = len(z1)
    # Similarities in float32 even under autocast: a bf16 cosine / 0.2 loses the ranking.
    with torch.autocast(z1.device.type, enabled=False):
        z = F.normalize(torch.cat([z1, z2]).float(), dim=1)  # (2N, P)
        logits = z @ z.T / temperature  # (2N, 2N)
    self_pairs = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_pairs, float("-inf"))
    partner = (torch.arange(2 * n, device=z.device) + n) % (2 * n)  # (2N,): i <-> i + N
    loss = F.cross_entropy(logits, partner)
    accuracy = (logits.argmax(1) == partner).float().mean()
    return loss, accuracy


def projection_head(in_features: int, hidden_dim: int, projector_dim: int) -> nn.Sequential:
    """Linear -> ReLU -> Linear: (N, in_features) -> (N, projector_dim)."""
    return nn.Sequential(nn.Linear(in_features, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, projector_dim))


class Contrastive(nn.Module):
    """NT-Xent between the projected encoder features of two augmented views of the batch.

    Args:
        in_features: the encoder's feature width D.
        augment: draws one random view of a batch.
        temperature: NT-Xent temperature.
        hidden_dim, projector_dim: widths of the projection head.
    """

    needs_labels = False
    # Only model.encoder takes part: a decoder or head gets no gradient (DDP must know).
    uses_only_encoder = True
    # Each validation chunk is its own NT-Xent problem with its own negatives.
    eval_chunk_size = EVAL_CHUNK_SIZE

    def __init__(self, in_features: int, augment: Augment, temperature: float, hidden_dim: int, projector_dim: int):
        super().__init__()
        self.augment = augment
        self.temperature = temperature
        self.projector = projection_head(in_features, hidden_dim, projector_dim)

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        views = torch.cat([self.augment(x, generator), self.augment(x, generator)])  # (2N, C, H, W)
        # One encoder pass over both views, so batch norm sees them as one batch.
        z1, z2 = self.projector(model.encoder(views)).chunk(2)  # (N, P) each
        loss, accuracy = nt_xent(z1, z2, self.temperature)
        return loss, {"acc": accuracy}
