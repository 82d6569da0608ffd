"""Batched image augmentations on the training device: geometry, colour and photometric ops.

Every function maps a (N, C, H, W) float batch to a new batch of the same shape, dtype and
device, drawing all its randomness from the `generator` it is given (a `torch.Generator` on
the batch's device), so a step's augmentations are a function of the engine's step seed.
Geometric transforms are per-sample affine matrices: `Augment` multiplies crop, rotation and
translation into one (N, 2, 3) matrix and resamples each batch once, straight to the model's
input size (images decoded larger, data.decode_size, are cropped from all their pixels).

Matrices map output coordinates to input coordinates in `affine_grid`'s normalised frame
([-1, 1] across each axis, align_corners=False, so the identity reproduces the input exactly).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ptft.data.resize import fit_batch


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


def apply_affine(x: torch.Tensor, matrices: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Resample (N, C, H, W) through (N, 3, 3) output->input matrices into (N, C, *size) (default: H, W);
    outside pixels are 0."""
    theta = matrices[:, :2].to(x.dtype)  # (N, 2, 3)
    shape = list(x.shape[:2]) + list(size or x.shape[-2:])
    grid = F.affine_grid(theta, shape, align_corners=False)  # (N, *size, 2)
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


# ---- colour and photometric ops ------------------------------------------------------------------
# Each takes per-image parameters (N,) and equals torchvision.transforms.v2.functional's op applied
# image by image (tests/test_augment.py holds them to it). Grey (C = 1) batches have no hue or
# saturation: those ops, and grayscale, leave them as they are, as torchvision's do.

LUMA = (0.2989, 0.587, 0.114)  # ITU-R 601-2, torchvision's rgb_to_grayscale weights


def _per_image(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return values.to(x.dtype).view(-1, 1, 1, 1)  # (N,) -> (N, 1, 1, 1), broadcast over C, H, W


def _blend(x: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    ratio = _per_image(ratio, x)
    return (ratio * x + (1.0 - ratio) * other).clamp(0.0, 1.0)


def _luma(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 1, H, W) grey."""
    r, g, b = x.unbind(dim=1)
    return (r * LUMA[0] + g * LUMA[1] + b * LUMA[2]).unsqueeze(1)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Multiply image i by factor[i] (0: black, 1: unchanged)."""
    return (x * _per_image(factor, x)).clamp(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend image i with its mean grey level by factor[i] (0: flat grey, 1: unchanged)."""
    grey = _luma(x) if x.shape[1] == 3 else x
    return _blend(x, grey.mean(dim=(1, 2, 3), keepdim=True), factor)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend image i with its own grey version by factor[i] (0: grey, 1: unchanged)."""
    return x if x.shape[1] == 1 else _blend(x, _luma(x), factor)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate image i's hue by shift[i] turns, in [-0.5, 0.5] (through HSV, as PIL and torchvision)."""
    if x.shape[1] == 1:
        return x
    hue, saturation, value = _rgb_to_hsv(x)
    hue = (hue + shift.to(x.dtype).view(-1, 1, 1)).remainder(1.0)
    return _hsv_to_rgb(hue, saturation, value)


def _rgb_to_hsv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, 3, H, W) -> hue in [0, 1), saturation, value: each (N, H, W). PIL's algorithm."""
    r, g, b = x.unbind(dim=1)
    low, high = torch.aminmax(x, dim=1)
    grey = high == low  # hue and saturation are 0 there; ones in the denominators avoid 0 / 0
    spread = high - low
    saturation = spread / torch.where(grey, torch.ones_like(high), high)
    spread = torch.where(grey, torch.ones_like(spread), spread)
    rc, gc, bc = (high - r) / spread, (high - g) / spread, (high - b) / spread
    hue = torch.where(high == r, bc - gc, torch.where(high == g, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = torch.where(grey, torch.zeros_like(hue), hue)
    return (hue / 6.0 + 1.0).fmod(1.0), saturation, high


def _hsv_to_rgb(hue: torch.Tensor, saturation: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Inverse of `_rgb_to_hsv`: three (N, H, W) -> (N, 3, H, W)."""
    sector = torch.floor(hue * 6.0)
    within = hue * 6.0 - sector
    sector = sector.long().remainder(6)  # (N, H, W): which sixth of the colour wheel
    p = (value * (1.0 - saturation)).clamp(0.0, 1.0)
    q = (value * (1.0 - saturation * within)).clamp(0.0, 1.0)
    t = (value * (1.0 - saturation * (1.0 - within))).clamp(0.0, 1.0)
    candidates = torch.stack([value, p, q, t], dim=1)  # (N, 4, H, W)
    # Per sector, which candidate each of R, G, B takes: (3, 6) rows R, G, B.
    table = torch.tensor([[0, 2, 1, 1, 3, 0], [3, 0, 0, 2, 1, 1], [1, 1, 3, 0, 0, 2]], device=hue.device)
    pick = table[:, sector].movedim(0, 1)  # (N, 3, H, W)
    return candidates.gather(1, pick)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """RGB images as grey ones replicated in R, G and B (C stays 3); grey images unchanged."""
    return x if x.shape[1] == 1 else _luma(x).expand_as(x).contiguous()


def gaussian_blur(x: torch.Tensor, kernel_size: int, sigma: torch.Tensor) -> torch.Tensor:
    """Blur image i with a `kernel_size` (odd) Gaussian of std sigma[i] pixels, reflecting at the borders."""
    n, c, height, width = x.shape
    reach = (kernel_size - 1) / (2.0 * math.sqrt(2.0))
    offsets = torch.linspace(-reach, reach, kernel_size, dtype=x.dtype, device=x.device)  # (K,)
    kernels = torch.softmax(-(offsets / sigma.to(x.dtype).view(-1, 1)).square(), dim=1)  # (N, K), rows sum to 1
    kernels = kernels.repeat_interleave(c, dim=0)  # (N * C, K): one per image and channel
    half = kernel_size // 2
    # Separable: rows then columns, each image-channel its own group.
    out = F.pad(x.reshape(1, n * c, height, width), (half, half, half, half), mode="reflect")
    out = F.conv2d(out, kernels.view(n * c, 1, 1, kernel_size), groups=n * c)
    out = F.conv2d(out, kernels.view(n * c, 1, kernel_size, 1), groups=n * c)
    return out.view(n, c, height, width)


def solarize(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Invert every value at or above `threshold`."""
    return torch.where(x >= threshold, 1.0 - x, x)


def _chosen(p: float, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(N, 1, 1, 1) bool: which images an op with probability `p` applies to."""
    return (torch.rand(len(x), generator=generator, device=x.device) < p).view(-1, 1, 1, 1)


def color_jitter(x: torch.Tensor, strengths: tuple[float, float, float, float], p: float,
                 generator: torch.Generator) -> torch.Tensor:
    """With probability `p` per image, brightness, contrast, saturation then hue, each by its own
    random factor: 1 +- strength (hue: +- strength turns) per image, as torchvision's ColorJitter
    draws them (which applies them in a random order; here the order is fixed)."""
    brightness, contrast, saturation, hue = strengths
    apply = _chosen(p, x, generator)
    factors = [_uniform(len(x), max(0.0, 1 - strength), 1 + strength, generator, x.device)
               for strength in (brightness, contrast, saturation)]
    shift = _uniform(len(x), -hue, hue, generator, x.device)
    out = adjust_hue(adjust_saturation(adjust_contrast(adjust_brightness(x, factors[0]), factors[1]), factors[2]),
                     shift)
    return torch.where(apply, out, x)


def random_grayscale(x: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Make each image grey with probability `p`."""
    return torch.where(_chosen(p, x, generator), grayscale(x), x)


def random_gaussian_blur(x: torch.Tensor, kernel_size: int, sigma: tuple[float, float], p: float,
                         generator: torch.Generator) -> torch.Tensor:
    """Blur each image with probability `p`, its sigma uniform in `sigma`."""
    apply = _chosen(p, x, generator)
    sigmas = _uniform(len(x), sigma[0], sigma[1], generator, x.device)
    return torch.where(apply, gaussian_blur(x, kernel_size, sigmas), x)


def random_solarize(x: torch.Tensor, threshold: float, p: float, generator: torch.Generator) -> torch.Tensor:
    """Solarize each image with probability `p`."""
    return torch.where(_chosen(p, x, generator), solarize(x, threshold), x)


def blur_kernel_for(side: int) -> int:
    """SimCLR's blur kernel: 10% of the image side, odd, at least 3 (23 for 224 px)."""
    size = int(0.1 * side)
    return max(3, size + 1 - size % 2)


@dataclass(frozen=True)
class Augment:
    """Random views of a batch from augmentation strengths.

    Crop, rotation and translation share one resampling; flip, colour jitter, grayscale, blur,
    solarize, cutout and noise follow, in that order (SimCLR's). Zero strengths (scale (1, 1),
    ratio (1, 1), 0 degrees, 0 shift, p 0, size 0, std 0, jitter 0) leave the batch unchanged.

    Args:
        crop_scale: area fraction range of random resized crops.
        crop_ratio: aspect ratio (width / height) range of the crops.
        max_rotation: degrees either way.
        max_shift: fraction of the image size either way.
        flip_p: probability of a left-right mirror.
        cutout: side of the zeroed square in pixels (0: none).
        noise_std: standard deviation of additive Gaussian noise (0: none).
        brightness, contrast, saturation: colour jitter factors drawn in 1 +- each (0: none).
        hue: colour jitter hue shift drawn in +- this many turns, at most 0.5 (0: none).
        jitter_p: probability of colour jitter per image.
        grayscale_p: probability of turning an RGB image grey.
        blur_p: probability of a Gaussian blur, of `blur_kernel` pixels and std in `blur_sigma`.
        solarize_p: probability of inverting the values at or above `solarize_threshold`.
        output_size: (H, W) of the views, the model's input size; None: the batch's own. A larger
            batch (data.decode_size) is cropped from all its pixels in the one resampling, and
            fitted by `ptft.data.resize.fit_batch` when no geometric op is on.
    """

    crop_scale: tuple[float, float] = (1.0, 1.0)
    crop_ratio: tuple[float, float] = (1.0, 1.0)
    max_rotation: float = 0.0
    max_shift: float = 0.0
    flip_p: float = 0.0
    cutout: int = 0
    noise_std: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    jitter_p: float = 1.0
    grayscale_p: float = 0.0
    blur_p: float = 0.0
    blur_kernel: int = 3
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    solarize_threshold: float = 0.5
    output_size: tuple[int, int] | None = None

    @property
    def changes_images(self) -> bool:
        """False when every strength is zero and a view is the batch itself (fitted to the output size)."""
        return dataclasses.replace(self, output_size=None) != Augment()

    @property
    def moves_pixels(self) -> bool:
        """True when a crop, rotation or shift is on."""
        return (self.crop_scale, self.crop_ratio, self.max_rotation, self.max_shift) != ((1.0, 1.0), (1.0, 1.0), 0, 0)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """(N, C, H, W) -> an augmented (N, C, H, W) batch, computed in float32 even under autocast.

        The objective calls it inside the training step's autocast; views are data, not model
        arithmetic, so bf16/fp16 runs see the very views an fp32 run sees for the same seed.
        """
        with torch.autocast(x.device.type, enabled=False):
            return self._views(x, generator)

    def _views(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        matrices = (crop_matrices(x, self.crop_scale, self.crop_ratio, generator)
                    @ rotation_matrices(x, self.max_rotation, generator)
                    @ translation_matrices(x, self.max_shift, generator))
        if self.moves_pixels or self.output_size is None:
            x = apply_affine(x, matrices, self.output_size)
        else:  # identity matrices: the views are the images, fitted as every other batch is
            x = fit_batch(x, self.output_size)
        if self.flip_p > 0:
            x = horizontal_flip(x, self.flip_p, generator)
        x = self._photometric(x, generator)
        if self.cutout > 0:
            x = cutout(x, self.cutout, generator)
        if self.noise_std > 0:
            x = gaussian_noise(x, self.noise_std, generator)
        return x

    def _photometric(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        jitter = (self.brightness, self.contrast, self.saturation, self.hue)
        if any(jitter) and self.jitter_p > 0:
            x = color_jitter(x, jitter, self.jitter_p, generator)
        if self.grayscale_p > 0:
            x = random_grayscale(x, self.grayscale_p, generator)
        if self.blur_p > 0:
            x = random_gaussian_blur(x, self.blur_kernel, self.blur_sigma, self.blur_p, generator)
        if self.solarize_p > 0:
            x = random_solarize(x, self.solarize_threshold, self.solarize_p, generator)
        return x
