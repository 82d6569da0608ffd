"""Small convolutional encoder and decoder: one stride-2 3x3 conv per stage.

A stage maps (N, C_in, H, W) -> (N, C_out, ceil(H/2), ceil(W/2)), so any input size works
(8x8 digits: 8 -> 4 -> 2; 28x28 MNIST: 28 -> 14 -> 7; 32x32: 32 -> 16 -> 8). The decoder walks
the same sizes back with transposed convolutions and lands exactly on the input's shape.
"""

from __future__ import annotations

import torch
from torch import nn

from ptft.models.compose import activation_layer, block_layer_of


def stage_sizes(height: int, width: int, num_stages: int) -> list[tuple[int, int]]:
    """Spatial size before the first stage and after each one: [(H, W), (ceil(H/2), ceil(W/2)), ...]."""
    sizes = [(height, width)]
    for _ in range(num_stages):
        h, w = sizes[-1]
        sizes.append(((h + 1) // 2, (w + 1) // 2))
    return sizes


class ConvBlock(nn.Module):
    """3x3 conv (stride 2) or its transpose -> (BatchNorm2d) -> activation."""

    def __init__(self, conv: nn.Module, channels: int, activation: str, batch_norm: bool):
        super().__init__()
        self.conv = conv
        self.norm = nn.BatchNorm2d(channels) if batch_norm else nn.Identity()
        self.act = activation_layer(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


def _up_conv(c_in: int, c_out: int, size_in: tuple[int, int], size_out: tuple[int, int], bias: bool) -> nn.Module:
    # A stride-2 transposed conv gives 2*in - 1 + output_padding: pad by one where the
    # encoder rounded an odd size up, so the output is exactly `size_out`.
    padding = tuple(out - (2 * inp - 1) for inp, out in zip(size_in, size_out))
    return nn.ConvTranspose2d(c_in, c_out, 3, stride=2, padding=1, output_padding=padding, bias=bias)


class ConvEncoder(nn.Module):
    """(N, C, H, W) -> stride-2 conv blocks -> flatten -> linear latent (N, latent).

    Parameters are `blocks.<i>.*` (stage i) then `to_latent.*` (the deepest layer).
    """

    def __init__(self, in_channels: int, channels: list[int], latent: int, input_hw: tuple[int, int],
                 activation: str = "relu", batch_norm: bool = True):
        super().__init__()
        widths = [in_channels, *channels]
        self.blocks = nn.ModuleList(
            ConvBlock(nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=not batch_norm), c_out, activation,
                      batch_norm)
            for c_in, c_out in zip(widths, widths[1:])
        )
        last_h, last_w = stage_sizes(*input_hw, len(channels))[-1]
        self.to_latent = nn.Linear(channels[-1] * last_h * last_w, latent)
        self.out_features = latent
        self.num_layers = len(self.blocks) + 1

    def layer_of(self, param_name: str) -> int:
        """Depth of a parameter: 0 for the first conv stage, num_layers - 1 for the latent."""
        return block_layer_of(param_name, len(self.blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.to_latent(x.flatten(1))  # (N, C_last * h * w) -> (N, latent)


class ConvDecoder(nn.Module):
    """(N, latent) -> linear -> (N, C_last, h, w) -> transposed conv stages -> logits (N, *out_shape).

    Args:
        channels: stage widths from the latent outward (the encoder's, reversed); the last
            stage maps to `out_shape[0]` channels with no norm or activation.
    """

    def __init__(self, latent: int, channels: list[int], out_shape: tuple[int, int, int], activation: str = "relu",
                 batch_norm: bool = True):
        super().__init__()
        out_channels, height, width = out_shape
        sizes = list(reversed(stage_sizes(height, width, len(channels))))  # deepest first
        self.start_shape = (channels[0], *sizes[0])
        self.from_latent = nn.Sequential(nn.Linear(latent, channels[0] * sizes[0][0] * sizes[0][1]),
                                         activation_layer(activation))
        widths = [*channels, out_channels]
        stages = []
        for i, (c_in, c_out) in enumerate(zip(widths, widths[1:])):
            is_last = i == len(channels) - 1
            conv = _up_conv(c_in, c_out, sizes[i], sizes[i + 1], bias=is_last or not batch_norm)
            stages.append(conv if is_last else ConvBlock(conv, c_out, activation, batch_norm))
        self.blocks = nn.Sequential(*stages)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.from_latent(z).unflatten(1, self.start_shape)  # (N, C_last, h, w)
        return self.blocks(h)  # (N, C, H, W)


def conv_encoder(input_shape: tuple[int, int, int], channels: list[int], latent: int, activation: str,
                 batch_norm: bool) -> ConvEncoder:
    """The encoder every conv model shares, so autoencoder and classifier weights line up."""
    in_channels, height, width = input_shape
    return ConvEncoder(in_channels, channels, latent, (height, width), activation, batch_norm)


def conv_decoder(input_shape: tuple[int, int, int], channels: list[int], latent: int, activation: str,
                 batch_norm: bool) -> ConvDecoder:
    """The mirror image of `conv_encoder` with the same options."""
    return ConvDecoder(latent, list(reversed(channels)), input_shape, activation, batch_norm)
