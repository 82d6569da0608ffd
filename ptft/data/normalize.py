"""data.normalize: per-channel (x - mean) / std on the device, in front of the encoder.

Batches stay float in [0, 1] (`batches.to_float`) and augmentations work in that range; the
numbers are applied last, by a forward pre-hook on `model.encoder`, the one input every
objective, probe and head goes through. So every batch the model sees (training, validation,
evaluation, predict) is normalised after augmentation, the model's state-dict keys do not change
(the statistics are non-persistent buffers), and the numbers themselves are recorded in
meta.json (`inputs.normalize`) for later stages to reuse exactly.

    none        no normalisation (the default)
    dataset     the mean and std of each channel over the train split (computed once, exactly)
    imagenet    ImageNet's RGB statistics, for backbones pretrained on it
    {mean, std} your own, one value per channel, for pixels in [0, 1]
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ptft.errors import UserError

IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
VALUES_PER_CHUNK = 1 << 24  # pixel values summed at a time: bounded memory for any dataset size
ROWS_PER_SUM = 1 << 16  # row sums added in int64 at a time: 65,536 x 4096^2 px x 255^2 stays under 2^63


class Normalize(nn.Module):
    """(N, C, H, W) -> (x - mean) / std per channel. Buffers, not parameters: nothing trains, nothing is saved."""

    def __init__(self, mean: list[float], std: list[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def attach_normalization(model: nn.Module, stats: dict | None) -> nn.Module:
    """Normalise every input of `model.encoder` with `stats` ({"mean": [...], "std": [...]}); None does nothing.

    Returns `model` itself, its state-dict keys unchanged; `model.to(device)` moves the statistics.
    """
    if stats is None:
        return model
    encoder = model.encoder
    encoder.input_normalize = Normalize(stats["mean"], stats["std"])
    encoder.register_forward_pre_hook(_normalize_input)
    return model


def _normalize_input(encoder: nn.Module, args: tuple) -> tuple:
    x, *rest = args
    return (encoder.input_normalize(x), *rest)


def recorded_normalization(meta) -> dict | None:
    """The numbers a checkpoint's model was trained with (meta.json inputs.normalize); None when it
    had none, or predates them."""
    return (meta.inputs or {}).get("normalize")


def normalization_stats(setting, images: torch.Tensor, row_sums: torch.Tensor | None = None) -> dict | None:
    """The numbers `setting` (data.normalize) stands for, for `images` (N, C, H, W): the train split.

    `row_sums` ((N, C, 2) int64: each uint8 image's per-channel sum and sum of squares, the decode
    cache's) gives `dataset` the very same integers without reading the images.

    Returns:
        None for "none", else {"mean": [C floats], "std": [C floats]} for pixels in [0, 1].

    Raises:
        UserError: imagenet for images that are not RGB, values of another channel count, or a
            dataset channel with one value everywhere (its std is 0).
    """
    channels = images.shape[1]
    if setting in (None, "none"):
        return None
    if setting == "dataset":
        return _dataset_stats(images, row_sums)
    if setting == "imagenet":
        if channels != 3:
            raise UserError(f"data.normalize: imagenet's statistics are for RGB images; these have {channels} "
                            "channel(s): use dataset, or give mean and std")
        return {key: list(values) for key, values in IMAGENET.items()}
    values = setting
    if len(values["mean"]) != channels:
        raise UserError(f"data.normalize: {len(values['mean'])} values for mean and std, but the images have "
                        f"{channels} channels")
    return {"mean": [float(v) for v in values["mean"]], "std": [float(v) for v in values["std"]]}


def _dataset_stats(images: torch.Tensor, row_sums: torch.Tensor | None) -> dict:
    """Per-channel mean and (population) std of the pixels in [0, 1].

    uint8 pixels are summed as integers: exact, so every stage and device computes the same
    numbers bit for bit, from the pixels or from `row_sums`. Float images are summed in float64.
    """
    n = len(images)
    exact = images.dtype == torch.uint8
    sums, squares = _from_row_sums(row_sums) if exact and row_sums is not None else _from_pixels(images)
    count = n * images.shape[2] * images.shape[3]
    scale = 255 if exact else 1
    mean = [s / count / scale for s in sums]
    # n * sum(x^2) - sum(x)^2 is exact for integers; clamped at 0 against float rounding otherwise.
    std = [math.sqrt(max(count * q - s * s, 0) / count ** 2) / scale for s, q in zip(sums, squares)]
    for channel, value in enumerate(std):
        if value == 0:
            raise UserError(f"data.normalize: dataset: channel {channel} has the same value in every pixel of the "
                            "train split (std 0); use none, or give mean and std")
    return {"mean": mean, "std": std}


def _from_row_sums(row_sums: torch.Tensor) -> tuple[list[int], list[int]]:
    """Per-channel (sum, sum of squares) as Python integers from (N, C, 2) int64 row sums."""
    channels = row_sums.shape[1]
    sums, squares = [0] * channels, [0] * channels
    for chunk in row_sums.split(ROWS_PER_SUM):  # each chunk's int64 total is far from overflow
        total = chunk.sum(0).tolist()  # (C, 2)
        sums = [a + t[0] for a, t in zip(sums, total)]
        squares = [a + t[1] for a, t in zip(squares, total)]
    return sums, squares


def _from_pixels(images: torch.Tensor) -> tuple[list, list]:
    """Per-channel (sum, sum of squares): Python integers for uint8 images, floats (float64 sums) otherwise."""
    channels, per_image = images.shape[1], max(1, math.prod(images.shape[1:]))
    exact = images.dtype == torch.uint8
    sums, squares = [0] * channels, [0] * channels
    for chunk in images.split(max(1, VALUES_PER_CHUNK // per_image)):
        # int32 holds 255 ** 2; float64 for float images.
        values = chunk.to(torch.int32 if exact else torch.float64)
        total = values.sum(dim=(0, 2, 3), dtype=torch.int64 if exact else torch.float64).tolist()
        total_sq = (values * values).sum(dim=(0, 2, 3), dtype=torch.int64 if exact else torch.float64).tolist()
        sums = [a + b for a, b in zip(sums, total)]
        squares = [a + b for a, b in zip(squares, total_sq)]
    return sums, squares
