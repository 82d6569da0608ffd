"""Fully connected encoder and decoder over flattened images."""

from __future__ import annotations

import math

import torch
from torch import nn

from ptft.models.compose import activation_layer, block_layer_of


class DenseBlock(nn.Module):
    """Linear -> (BatchNorm1d) -> activation -> (Dropout): (N, in) -> (N, out)."""

    def __init__(self, in_features: int, out_features: int, activation: str, dropout: float, batch_norm: bool):
        super().__init__()
        # With batch norm following, the linear bias would be cancelled by the mean subtraction.
        self.linear = nn.Linear(in_features, out_features, bias=not batch_norm)
        self.norm = nn.BatchNorm1d(out_features) if batch_norm else nn.Identity()
        self.act = activation_layer(activation)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.act(self.norm(self.linear(x))))


class MLPEncoder(nn.Module):
    """(N, C, H, W) -> flatten -> hidden blocks -> linear latent (N, latent).

    Parameters are `blocks.<i>.*` (layer i) then `to_latent.*` (the deepest layer); the latent
    has no activation, so the decoder or a linear head sees the full range.
    """

    def __init__(self, in_features: int, hidden: list[int], latent: int, activation: str = "relu",
                 dropout: float = 0.0, batch_norm: bool = False):
        super().__init__()
        widths = [in_features, *hidden]
        self.blocks = nn.ModuleList(
            DenseBlock(w_in, w_out, activation, dropout, batch_norm) for w_in, w_out in zip(widths, widths[1:])
        )
        self.to_latent = nn.Linear(widths[-1], latent)
        self.out_features = latent
        self.num_layers = len(self.blocks) + 1

    def layer_of(self, param_name: str) -> int:
        """Depth of a parameter: 0 for the first hidden block, num_layers - 1 for the latent."""
        return block_layer_of(param_name, len(self.blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.flatten(1)  # (N, C*H*W)
        for block in self.blocks:
            h = block(h)
        return self.to_latent(h)


class MLPDecoder(nn.Module):
    """(N, latent) -> hidden blocks -> linear -> logits reshaped to (N, *out_shape).

    Args:
        hidden: widths from the latent outward (the encoder's, reversed).
    """

    def __init__(self, latent: int, hidden: list[int], out_shape: tuple[int, int, int], activation: str = "relu",
                 batch_norm: bool = False):
        super().__init__()
        widths = [latent, *hidden]
        self.blocks = nn.ModuleList(
            DenseBlock(w_in, w_out, activation, 0.0, batch_norm) for w_in, w_out in zip(widths, widths[1:])
        )
        self.to_output = nn.Linear(widths[-1], math.prod(out_shape))
        self.out_shape = tuple(out_shape)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = z
        for block in self.blocks:
            h = block(h)
        return self.to_output(h).unflatten(1, self.out_shape)  # (N, C, H, W)


def mlp_encoder(input_shape: tuple[int, int, int], hidden: list[int], latent: int, activation: str, dropout: float,
                batch_norm: bool) -> MLPEncoder:
    """The encoder every MLP model shares, so autoencoder and classifier weights line up."""
    return MLPEncoder(math.prod(input_shape), hidden, latent, activation, dropout, batch_norm)


def mlp_decoder(input_shape: tuple[int, int, int], hidden: list[int], latent: int, activation: str,
                batch_norm: bool) -> MLPDecoder:
    """The mirror image of `mlp_encoder` with the same options (no dropout: it only regularises the encoder)."""
    return MLPDecoder(latent, list(reversed(hidden)), input_shape, activation, batch_norm)
