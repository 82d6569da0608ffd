"""Autoencoder objectives: reconstruct the input, a corrupted input, or hidden patches.

Each takes an autoencoder (`model(x)` is a reconstruction in [0, 1] of x's shape) and
returns the mean squared error against the clean images. All noise and masks come from the
step's generator.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ptft.objectives import EVAL_CHUNK_SIZE
from ptft.objectives.augment import gaussian_noise


class Reconstruction(nn.Module):
    """MSE between `model(x)` and x."""

    needs_labels = False
    reconstructs_inputs = True  # its loss compares outputs with inputs (data.decode_size refuses it)
    eval_chunk_size = None  # no randomness, a per-example mean: any batching gives the same figure

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return F.mse_loss(model(x).float(), x), {}


def drop_pixels(x: torch.Tensor, prob: float, generator: torch.Generator) -> torch.Tensor:
    """Zero each pixel (all its channels) of (N, C, H, W) with probability `prob`."""
    n, _, height, width = x.shape
    dropped = torch.rand((n, 1, height, width), generator=generator, device=x.device) < prob
    return x.masked_fill(dropped, 0.0)


class Denoising(nn.Module):
    """MSE between the reconstruction of a corrupted x and the clean x.

    Args:
        noise: "gaussian" (add N(0, std^2), clamp to [0, 1]) or "mask" (zero pixels).
        std: Gaussian noise standard deviation.
        mask_prob: probability that masking noise zeroes a pixel.
    """

    needs_labels = False
    reconstructs_inputs = True  # its loss compares outputs with inputs (data.decode_size refuses it)
    # The noise an example gets depends on where its batch starts in the generator's stream.
    eval_chunk_size = EVAL_CHUNK_SIZE

    def __init__(self, noise: str, std: float, mask_prob: float):
        super().__init__()
        self.noise, self.std, self.mask_prob = noise, std, mask_prob

    def corrupt(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.noise == "gaussian":
            return gaussian_noise(x, self.std, generator)
        return drop_pixels(x, self.mask_prob, generator)

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return F.mse_loss(model(self.corrupt(x, generator)).float(), x), {}


def patch_mask(x: torch.Tensor, patch_size: int, mask_ratio: float, generator: torch.Generator) -> torch.Tensor:
    """(N, 1, H, W) bool: True on the pixels of randomly hidden square patches.

    Each image hides the same number of patches, round(mask_ratio * patches) but at least
    one, from a grid of `patch_size` squares (edge patches are cut by the image border).
    """
    n, _, height, width = x.shape
    rows, cols = -(-height // patch_size), -(-width // patch_size)
    num_patches = rows * cols
    num_hidden = max(1, round(mask_ratio * num_patches))
    # Ranking uniform noise gives each image a uniformly random subset of exactly num_hidden.
    scores = torch.rand((n, num_patches), generator=generator, device=x.device)
    hidden = scores.argsort(1).argsort(1) < num_hidden  # (N, rows * cols)
    hidden = hidden.view(n, 1, rows, cols)
    hidden = hidden.repeat_interleave(patch_size, 2).repeat_interleave(patch_size, 3)
    return hidden[:, :, :height, :width]


class Masked(nn.Module):
    """Hide random patches (filled with 0); MSE on the hidden pixels only.

    Args:
        patch_size: side of the square patches in pixels.
        mask_ratio: fraction of patches hidden per image.
    """

    needs_labels = False
    reconstructs_inputs = True  # its loss compares outputs with inputs (data.decode_size refuses it)
    # Masks depend on where a batch starts in the generator's stream, and images cut at the
    # border hide unequal pixel counts, so the batch's mean over hidden values is no per-example mean.
    eval_chunk_size = EVAL_CHUNK_SIZE

    def __init__(self, patch_size: int, mask_ratio: float):
        super().__init__()
        self.patch_size, self.mask_ratio = patch_size, mask_ratio

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        hidden = patch_mask(x, self.patch_size, self.mask_ratio, generator)  # (N, 1, H, W)
        reconstruction = model(x.masked_fill(hidden, 0.0)).float()
        squared_error = (reconstruction - x).square().masked_fill(~hidden, 0.0)
        # Mean over hidden values: hidden pixels times channels.
        return squared_error.sum() / (hidden.sum() * x.shape[1]), {}
