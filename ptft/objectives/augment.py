"""Batched image augmentations on the training device.

Every function maps a (N, C, H, W) float batch to a new batch of the same shape, dtype and
device, drawing all its randomness from the `generator` it is given (a `torch.Generator` on
the batch's device), so a step's augmentations are a function of the engine's step seed.
Geometric transforms are per-sample affine matrices: `Augment` multiplies crop, rotation and
translation into one (N, 2, 3) matrix and resamples each batch once.

Matrices map output coordinates to input coordinates in `affine_grid`'s normalised frame
([-1, 1] across each axis, align_corners=False, so the identity reproduces the input exactly).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def _uniform(n: int, low: float, high: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """(n,) float32 uniform in [low, high)."""
    return low + (high - low) * torch.rand(n, generator=generator, device=device)


def _homogeneous(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor,
                 tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    """(N, 3, 3) matrices [[a, b, tx], [c, d, ty], [0, 0, 1]] from (N,) entries."""
    zeros, ones = torch.zeros_like(a), torch.ones_like(a)
    rows = [torch.stack([a, b, tx], 1), torch.stack([c, d, ty], 1), torch.stack([zeros, zeros, ones], 1)]
    return torch.stack(rows, 1)


def crop_matrices(x: torch.Tensor, scale: tuple[float, float], ratio: tuple[float, float],
                  generator: torch.Generator) -> torch.Tensor:
    """(N, 3, 3) random resized crops: area fraction in `scale`, aspect (w/h) log-uniform in `ratio`.

    The crop is clipped to the image and placed uniformly inside it.
    """
    n, device, (rows, cols) = len(x), x.device, x.shape[-2:]
    area = _uniform(n, scale[0], scale[1], generator, device)
    aspect = torch.exp(_uniform(n, math.log(ratio[0]), math.log(ratio[1]), generator, device))
    # Width and height as fractions of the image's; a normalised half-extent is the same fraction.
    width = torch.sqrt(area * aspect).clamp(max=1.0)
    height = torch.sqrt(area / aspect).clamp(max=1.0)
    # Output pixel centres sit at +-(1 - 1/size) and map to centre +- extent * (1 - 1/size); keeping
    # those inside the input's outermost pixel centres means a crop never blends in the zero padding.
    centre_x = (1 - width) * (1 - 1 / cols) * _uniform(n, -1.0, 1.0, generator, device)
    centre_y = (1 - height) * (1 - 1 / rows) * _uniform(n, -1.0, 1.0, generator, device)
    zeros = torch.zeros_like(width)
    return _homogeneous(width, zeros, zeros, height, centre_x, centre_y)


def rotation_matrices(x: torch.Tensor, max_degrees: float, generator: torch.Generator) -> torch.Tensor:
    """(N, 3, 3) rotations about the centre by an angle uniform in [-max_degrees, max_degrees]."""
    n, (height, width) = len(x), x.shape[-2:]
    angle = torch.deg2rad(_uniform(n, -max_degrees, max_degrees, generator, x.device))
    cos, sin = torch.cos(angle), torch.sin(angle)
    # Rotate in pixel space, not in the normalised frame, so non-square images do not shear.
    aspect = width / height
    zeros = torch.zeros_like(angle)
    return _homogeneous(cos, -sin / aspect, sin * aspect, cos, zeros, zeros)


def translation_matrices(x: torch.Tensor, max_shift_fraction: float, generator: torch.Generator) -> torch.Tensor:
    """(N, 3, 3) shifts of up to `max_shift_fraction` of the width and of the height, each way."""
    n, device = len(x), x.device
    # The normalised frame spans 2 units, so a fraction f of the image is 2f units.
    shift_x = 2 * _uniform(n, -max_shift_fraction, max_shift_fraction, generator, device)
    shift_y = 2 * _uniform(n, -max_shift_fraction, max_shift_fraction, generator, device)
    ones, zeros = torch.ones_like(shift_x), torch.zeros_like(shift_x)
    return _homogeneous(ones, zeros, zeros, ones, shift_x, shift_y)


def apply_affine(x: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """Resample (N, C, H, W) through (N, 3, 3) output->input matrices; outside pixels are 0."""
    theta = matrices[:, :2].to(x.dtype)  # (N, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # (N, H, W, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_resized_crop(x: torch.Tensor, scale: tuple[float, float], ratio: tuple[float, float],
                        generator: torch.Generator) -> torch.Tensor:
    """Crop a random region of area fraction in `scale` and aspect in `ratio`, resized to (H, W)."""
    return apply_affine(x, crop_matrices(x, scale, ratio, generator))


def random_translate(x: torch.Tensor, max_shift_fraction: float, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to `max_shift_fraction` of its size along each axis, filling with 0."""
    return apply_affine(x, translation_matrices(x, max_shift_fraction, generator))


def random_rotation(x: torch.Tensor, max_degrees: float, generator: torch.Generator) -> torch.Tensor:
    """Rotate each image about its centre by up to `max_degrees` either way, filling with 0."""
    return apply_affine(x, rotation_matrices(x, max_degrees, generator))


def horizontal_flip(x: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image left-right with probability `p`."""
    flip = torch.rand(len(x), generator=generator, device=x.device) < p  # (N,)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def gaussian_noise(x: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    """Add N(0, std^2) noise to every value and clamp back to [0, 1]."""
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return (x + std * noise).clamp(0.0, 1.0)


def cutout(x: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Zero one `size` x `size` square per image (all channels), placed fully inside the image.

    Raises:
        ValueError: `size` is larger than the image.
    """
    n, (height, width) = len(x), x.shape[-2:]
    if size > min(height, width):
        raise ValueError(f"cutout size {size} does not fit in {height}x{width} images")
    top = torch.randint(0, height - size + 1, (n, 1), generator=generator, device=x.device)
    left = torch.randint(0, width - size + 1, (n, 1), generator=generator, device=x.device)
    rows = torch.arange(height, device=x.device)
    cols = torch.arange(width, device=x.device)
    in_rows = (rows >= top) & (rows < top + size)  # (N, H)
    in_cols = (cols >= left) & (cols < left + size)  # (N, W)
    hidden = in_rows[:, :, None] & in_cols[:, None, :]  # (N, H, W)
    return x.masked_fill(hidden[:, None], 0.0)


@dataclass(frozen=True)
class Augment:
    """Random views of a batch from augmentation strengths.

    Crop, rotation and translation share one resampling; flip, cutout and noise follow. Zero
    strengths (scale (1, 1), ratio (1, 1), 0 degrees, 0 shift, p 0, size 0, std 0) leave the
    batch unchanged.

    Args:
        crop_scale: area fraction range of random resized crops.
        crop_ratio: aspect ratio (width / height) range of the crops.
        max_rotation: degrees either way.
        max_shift: fraction of the image size either way.
        flip_p: probability of a left-right mirror.
        cutout: side of the zeroed square in pixels (0: none).
        noise_std: standard deviation of additive Gaussian noise (0: none).
    """

    crop_scale: tuple[float, float] = (1.0, 1.0)
    crop_ratio: tuple[float, float] = (1.0, 1.0)
    max_rotation: float = 0.0
    max_shift: float = 0.0
    flip_p: float = 0.0
    cutout: int = 0
    noise_std: float = 0.0

    @property
    def changes_images(self) -> bool:
        """False when every strength is zero and a view is the batch itself."""
        return self != Augment()

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """(N, C, H, W) -> an augmented (N, C, H, W) batch."""
        matrices = (crop_matrices(x, self.crop_scale, self.crop_ratio, generator)
                    @ rotation_matrices(x, self.max_rotation, generator)
                    @ translation_matrices(x, self.max_shift, generator))
        x = apply_affine(x, matrices)
        if self.flip_p > 0:
            x = horizontal_flip(x, self.flip_p, generator)
        if self.cutout > 0:
            x = cutout(x, self.cutout, generator)
        if self.noise_std > 0:
            x = gaussian_noise(x, self.noise_std, generator)
        return x
