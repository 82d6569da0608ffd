"""torchvision ResNets as encoders: the network without its `fc`, features = pooled output.

The encoder holds torchvision's modules under their own names, so its parameter names are
torchvision's (`conv1.weight`, `layer1.0.bn1.weight`, ...) and a model's keys are those with
an `encoder.` prefix. A plain torchvision state dict therefore maps on as `encoder.` + key,
and its `fc.*` (same shapes as our `head.*` for the same number of classes) as `head.*`.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn

STAGES = ("layer1", "layer2", "layer3", "layer4")
# The two stems by conv1's kernel size: (the small_input value that builds it, how to name it).
STEMS = {7: (False, "ImageNet's 7x7 stem"), 3: (True, "the 3x3 small-input stem")}


class ResNetEncoder(nn.Module):
    """(N, C, H, W) -> stem -> four residual stages -> global average pool -> (N, 512 or 2048).

    Args:
        arch: a torchvision ResNet name ("resnet18", "resnet34", "resnet50"), built with `weights=None`.
        in_channels: channels of the input images; the first conv takes this many.
        small_input: for 28-32 px images, a 3x3 stride-1 first conv and no max-pool, so the last
            stage still sees 4x4 rather than 1x1 (ImageNet's stem shrinks the input 4x at once).
    """

    def __init__(self, arch: str, in_channels: int, small_input: bool = True):
        super().__init__()
        net = getattr(torchvision.models, arch)(weights=None)
        if small_input:
            net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        elif in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        # Registration order is depth order: layer_of is then monotone over named_parameters().
        for name in ("conv1", "bn1", "relu", "maxpool", *STAGES, "avgpool"):
            self.add_module(name, getattr(net, name))
        self.out_features = net.fc.in_features
        self.num_layers = 1 + len(STAGES)

    def layer_of(self, param_name: str) -> int:
        """Depth of a parameter: 0 for the stem (conv1, bn1), k for `layer<k>.*` (1..4).

        Raises:
            ValueError: the name is not one of this encoder's parameters.
        """
        top = param_name.split(".")[0]
        if top in ("conv1", "bn1"):
            return 0
        if top in STAGES:
            return STAGES.index(top) + 1
        raise ValueError(f"not a ResNet encoder parameter: {param_name!r}")

    def explain_mismatch(self, param_name: str, file_shape, model_shape) -> str | None:
        """The fix, in config terms, for weights whose stem is the other one (see weights.match_into).

        A torchvision ImageNet file has the 7x7 stem; the default here is the 3x3 small-input stem.
        """
        if param_name != "conv1.weight" or len(file_shape) != 4 or len(model_shape) != 4:
            return None
        theirs, ours = STEMS.get(file_shape[-1]), STEMS.get(model_shape[-1])
        if theirs is None or ours is None or theirs == ours:
            return None
        return (f"The file's conv1 is {theirs[1]}, the model's {ours[1]}: set "
                f"model.small_input={str(theirs[0]).lower()} to build the file's stem")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for name in STAGES:
            x = getattr(self, name)(x)
        return self.avgpool(x).flatten(1)  # (N, out_features, 1, 1) -> (N, out_features)
