"""data.decode_size: images kept larger than the model's input, and the one rule that fits a batch to it.

An image folder decoded at data.decode_size (> data.image_size) gives training crops more pixels
to come from: a crop of a third of a 256 px image holds 148 px of detail where one of a 224 px
image holds 129. Training views are resampled once from the stored images straight to the input
size (`ptft.objectives.augment.Augment.output_size`); every other batch the model sees
(validation, k-NN, evaluate, predict, embed, a view without geometric change) is the whole stored
image fitted by `fit_batch`. The model applies that itself (`attach_input_size`, a hook on its
encoder, like data.normalize's), so no code path can feed it the stored size by mistake.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def fit_batch(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, C, H, W) float images resized to `size` (H, W), antialiased bilinear; already that size: `x` itself."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", antialias=True, align_corners=False)


def attach_input_size(model: nn.Module, size: tuple[int, int] | None) -> nn.Module:
    """Fit every input of `model.encoder` to `size` (H, W) first; None does nothing. Returns `model`."""
    if size is None:
        return model
    encoder = model.encoder
    encoder.input_size = tuple(size)
    # Prepended: the size is fitted before data.normalize's hook (per-channel, so the order gives the
    # same numbers; first, it works on the smaller batch).
    encoder.register_forward_pre_hook(_fit_input, prepend=True)
    return model


def _fit_input(encoder: nn.Module, args: tuple) -> tuple:
    x, *rest = args
    return (fit_batch(x, encoder.input_size), *rest)
