"""A lightweight decoder for a backbone's last feature map: reconstruction objectives for library backbones.

ptft's own autoencoders come with their decoders; a torchvision or timm classification network
does not. For the objectives that reconstruct their input (reconstruction, denoising, masked),
`autoencoder_of` composes the backbone's encoder with a `FeatureMapDecoder`: the encoder's last
feature map (before global pooling, so the decoder sees where things are), upsampled by a few
nearest-neighbour x2 + 3x3 conv blocks to the input's size. The result is an autoencoder like
ptft's own (`encoder.` + the library's names, `decoder.` + the decoder's), so a finetune from it
loads the encoder and reports the decoder's keys as unexpected, as after any autoencoder.
Transformers have tokens, not a feature map: they are refused, naming the objectives that fit.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ptft.errors import UserError
from ptft.models import no_decoder_message

# The decoder's width after the first 1x1 conv, halved by each upsampling block down to the floor.
WIDTH = 128
MIN_WIDTH = 16


class FeatureMapDecoder(nn.Module):
    """(N, C', h, w) feature map -> (N, C, H, W) logits.

    A 1x1 conv to WIDTH channels, then one block (nearest x2, 3x3 conv, batch norm, ReLU) per
    doubling needed to reach (H, W), halving the width each time, then a 3x3 conv to C channels;
    sizes that are no power-of-2 multiple of (h, w) are resized bilinearly at the end.
    """

    def __init__(self, in_channels: int, map_size: tuple[int, int], output_shape: tuple[int, int, int]):
        super().__init__()
        channels, height, width = output_shape
        self.output_size = (height, width)
        doublings = max(0, math.ceil(math.log2(max(height / map_size[0], width / map_size[1]))))
        widths = [max(MIN_WIDTH, WIDTH >> i) for i in range(doublings + 1)]
        layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 1)]
        for wide, narrow in zip(widths, widths[1:]):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(wide, narrow, 3, padding=1, bias=False),
                       nn.BatchNorm2d(narrow), nn.ReLU(inplace=True)]
        layers.append(nn.Conv2d(widths[-1], channels, 3, padding=1))
        self.blocks = nn.Sequential(*layers)

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        x = self.blocks(feature_map)  # (N, C, h * 2^k, w * 2^k)
        if tuple(x.shape[-2:]) != self.output_size:
            x = F.interpolate(x, size=self.output_size, mode="bilinear", align_corners=False)
        return x


class FeatureMapAutoEncoder(nn.Module):
    """encoder's last feature map -> FeatureMapDecoder; output in [0, 1], as compose.AutoEncoder's.

    `encoder(x)` stays the pooled features (probes, k-NN, embed); the reconstruction decodes
    `encoder(x, feature_map=True)`, through the encoder's forward so data.normalize applies.
    """

    def __init__(self, encoder: nn.Module, decoder: FeatureMapDecoder, leaves_parameters_unused: bool):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        # Encoder parameters after the feature map (ConvNeXt's last norm, MobileNetV3's and VGG's
        # classifier layers) get no gradient: DDP must then look for them (assembly.build_train_parts).
        self.leaves_parameters_unused = leaves_parameters_unused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decoder(self.encoder(x, feature_map=True)))


def autoencoder_of(model: nn.Module, input_shape: tuple[int, int, int], model_name: str,
                   objective: str) -> FeatureMapAutoEncoder:
    """`model`'s encoder (a library backbone) with a FeatureMapDecoder for `input_shape` images.

    Raises:
        UserError: the encoder has no feature map (a transformer), naming the objectives that fit.
    """
    encoder = model.encoder
    probe = _probe_feature_map(encoder, input_shape) if getattr(encoder, "has_feature_map", False) else None
    # timm's maps have `num_features` channels first; its Swin's are channels-last, so they fail this too.
    if probe is None or probe[0][0] != getattr(encoder, "num_features", probe[0][0]):
        has_patch_tokens = getattr(encoder, "patch_tokens", None) is not None
        raise UserError(f"objective.name: {no_decoder_message(model_name, objective, has_patch_tokens)}")
    (channels, height, width), unused = probe
    return FeatureMapAutoEncoder(encoder, FeatureMapDecoder(channels, (height, width), input_shape), unused)


def _probe_feature_map(encoder: nn.Module, input_shape: tuple[int, int, int]) -> tuple[tuple, bool] | None:
    """((C', h, w) of the encoder's feature map, whether some encoder parameter does not reach it), or
    None when the output is no (N, C', h, w) map.

    One forward and backward of a blank image in eval mode: no running statistic moves, no
    generator is drawn, no `.grad` is written.
    """
    training = encoder.training
    encoder.eval()
    try:
        params = [p for p in encoder.parameters() if p.requires_grad]
        output = encoder(torch.zeros(1, *input_shape, device=params[0].device), feature_map=True)
        if output.dim() != 4:
            return None
        grads = torch.autograd.grad(output.sum(), params, allow_unused=True)
    finally:
        encoder.train(training)
    return tuple(output.shape[1:]), any(grad is None for grad in grads)
