"""Models as compositions: autoencoder = encoder + decoder, classifier = encoder + head.

Every model keeps its encoder under the attribute `encoder`, so state-dict keys start with
`encoder.` in all of them and a classifier loads a pretrained autoencoder's encoder with no
renaming. Also the small parts the encoder families share.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


def activation_layer(name: str) -> nn.Module:
    """A fresh activation module by its config name ("relu", "gelu", "silu")."""
    return ACTIVATIONS[name]()


def block_layer_of(param_name: str, num_blocks: int) -> int:
    """Depth of a parameter in an encoder built as `blocks.<i>.*` followed by `to_latent.*`.

    Raises:
        ValueError: the name belongs to neither (a bug in the caller).
    """
    if param_name.startswith("blocks."):
        return int(param_name.split(".")[1])
    if param_name.startswith("to_latent."):
        return num_blocks
    raise ValueError(f"not an encoder parameter: {param_name!r}")


class AutoEncoder(nn.Module):
    """encoder (N, C, H, W) -> (N, D); decoder (N, D) -> (N, C, H, W) logits; output in [0, 1]."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Inputs are images in [0, 1], so the reconstruction is squashed to the same range.
        return torch.sigmoid(self.decoder(self.encoder(x)))


class Classifier(nn.Module):
    """encoder (N, C, H, W) -> (N, D); head: nn.Linear(D, num_classes) -> logits (N, num_classes)."""

    def __init__(self, encoder: nn.Module, head: nn.Linear, head_dropout: float = 0.0):
        super().__init__()
        self.encoder = encoder
        self.head = head
        # A probability rather than an nn.Dropout child: the model's children stay exactly
        # `encoder` and `head`, which is what the summary and the freeze patterns show.
        self.head_dropout = head_dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = F.dropout(self.encoder(x), self.head_dropout, self.training)
        return self.head(features)


class EncoderOnly(nn.Module):
    """Just the encoder: (N, C, H, W) -> features (N, D); for objectives that bring their own head."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


def classifier(encoder: nn.Module, num_classes: int, head_dropout: float = 0.0) -> Classifier:
    """A classifier over `encoder` with a fresh linear head of `num_classes` outputs."""
    return Classifier(encoder, nn.Linear(encoder.out_features, num_classes), head_dropout)
