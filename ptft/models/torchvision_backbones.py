"""torchvision classification architectures as ptft encoders (`model.name: torchvision:<architecture>`).

Built with `weights=None` (pretrained weights come from `init.checkpoint`), then:
- the classifier's last Linear (`fc`, `classifier[-1]`, `heads.head`, `head`) becomes an identity, so
  the network returns the features it fed that Linear; the dropout before it goes too (ptft's
  `model.head_dropout` takes its place);
- grey or other non-RGB data gets a stem conv built for its channels: a 3-channel file's stem
  loads into a 1-channel one summed over RGB (weights.match_into, `adapted` in the key report);
- `small_input` shrinks the stem's downsampling for 28-64 px images where the family allows:
  ResNets take ptft's 3x3 stride-1 stem without max-pool (as ptft/models/resnet.py; the file's 7x7
  conv1 then does not load); RegNet, EfficientNet, MobileNet, MnasNet, ShuffleNet and DenseNet keep
  their stem conv at stride 1 (and drop the stem max-pool) and ConvNeXt its 4x4 patchify at stride 2,
  so their files still load whole. ViT takes the data's image size (a file's position embedding is
  resampled to it); Swin and VGG need nothing for 32 px and have no small-input variant.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from ptft.errors import UserError
from ptft.models.backbone_names import TORCHVISION_FAMILY_OF
from ptft.models.backbones import (LibraryEncoder, PatchTokens, check_layer_ids, conv_like, first_conv,
                                   replace_module)

CLASSIFIER_NAMES = ("fc", "classifier", "heads", "head")
# Depth groups in input-to-output order: `a|b` is one group of top-level names, `x.*` one group
# per child of the container `x` (its blocks or stages).
DEPTH_PLANS: dict[str, tuple[str, ...]] = {
    "resnet": ("conv1|bn1", "layer1", "layer2", "layer3", "layer4"),
    "regnet": ("stem", "trunk_output.*"),
    "convnext": ("features.*", "classifier"),
    "efficientnet": ("features.*", "classifier"),
    "mobilenet": ("features.*", "classifier"),
    "mnasnet": ("layers.*", "classifier"),
    "shufflenet": ("conv1", "stage2", "stage3", "stage4", "conv5"),
    "densenet": ("features.*",),
    "vgg": ("features.*", "classifier"),
    "vit": ("class_token|conv_proj|encoder.pos_embedding", "encoder.layers.*", "encoder.ln", "heads"),
    "swin": ("features.*", "norm"),
}
# Blocks to checkpoint (train.grad_checkpointing) of families whose depth plan names no `x.*` container.
BLOCK_CONTAINERS = {"resnet": ("layer1", "layer2", "layer3", "layer4"), "shufflenet": ("stage2", "stage3", "stage4")}
# The submodule whose output is the last feature map, before global pooling (models/decoders.py decodes it);
# transformers (vit, swin) have tokens instead.
FEATURE_MAPS = {"resnet": "layer4", "regnet": "trunk_output", "convnext": "features", "efficientnet": "features",
                "mobilenet": "features", "mnasnet": "layers", "shufflenet": "conv5", "densenet": "features",
                "vgg": "features"}
# Families whose stem conv runs at stride 1 for small inputs (with the max-pool after it, if any, removed).
STRIDE_ONE_STEMS = {"regnet": None, "efficientnet": None, "mobilenet": None, "mnasnet": None,
                    "shufflenet": "maxpool", "densenet": "features.pool0"}
NO_SMALL_INPUT = {
    "vit": "ViT is built for the data's image size already (its patch grid); leave model.small_input false",
    "swin": "Swin pads its windows, so 32 px inputs run as they are; leave model.small_input false",
    "vgg": "VGG pools to a fixed 7x7 grid, so 32 px inputs run as they are; leave model.small_input false",
}
# Keys of files torchvision wrote before renaming the modules (its own loaders rename them the same way).
LEGACY_RENAMES: dict[str, tuple[tuple[str, str], ...]] = {
    "vit": ((r"\.mlp\.linear_1\.", ".mlp.0."), (r"\.mlp\.linear_2\.", ".mlp.3.")),
    "densenet": ((r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$",
                  r"\1\2"),),
}


def torchvision_encoder(arch: str, input_shape: tuple[int, int, int], small_input: bool) -> LibraryEncoder:
    """The torchvision network `arch` as an encoder for `input_shape` images (see the module docstring).

    Raises:
        UserError: small_input for a family without one; a ViT on non-square images or a size its
            patches do not divide.
    """
    family = TORCHVISION_FAMILY_OF[arch]
    net = torchvision.models.get_model(arch, weights=None, **_size_options(arch, family, input_shape))
    library_head, out_features = _drop_classifier(net)
    stem, conv = first_conv(net)
    if input_shape[0] != conv.in_channels:
        replace_module(net, stem, conv_like(conv, in_channels=input_shape[0]))
    if small_input:
        stem = _shrink_stem(net, arch, family, input_shape[0])
    return LibraryEncoder(
        net, out_features=out_features, layer_ids=check_layer_ids(net, _layer_ids(net, DEPTH_PLANS[family])),
        library_head=library_head, stem=f"{stem}.weight", position_embedding=_position_embedding(net, family),
        legacy_renames=LEGACY_RENAMES.get(family, ()), preprocessing=preprocessing(arch),
        blocks=BLOCK_CONTAINERS.get(family) or _block_containers(DEPTH_PLANS[family]),
        tokens=ViTTokens(net) if family == "vit" else None, feature_map=FEATURE_MAPS.get(family))


def _size_options(arch: str, family: str, input_shape) -> dict:
    if family != "vit":
        return {}
    _, height, width = input_shape
    patch = int(arch.rsplit("_", 1)[1])
    if height != width or height % patch:
        raise UserError(f"model.name: torchvision:{arch} takes square images whose side is a multiple of {patch} "
                        f"px, got {height}x{width}; set data.image_size (e.g. {max(patch, height // patch * patch)})")
    return {"image_size": height}


def _drop_classifier(net: nn.Module) -> tuple[str, int]:
    """Replace the classifier's last Linear (and the dropout in front of it) by identities.

    Returns:
        (the Linear's key prefix, e.g. "classifier.2.", its in_features).
    """
    name = next(n for n in CLASSIFIER_NAMES if isinstance(getattr(net, n, None), nn.Module))
    classifier = getattr(net, name)
    if isinstance(classifier, nn.Linear):
        setattr(net, name, nn.Identity())
        return f"{name}.", classifier.in_features
    # A Sequential ending in the Linear (convnext, efficientnet, mobilenet, vgg, vit's `heads`).
    children = list(classifier.named_children())
    path, linear = children[-1]
    replace_module(classifier, path, nn.Identity())
    if len(children) > 1 and isinstance(children[-2][1], nn.Dropout):
        replace_module(classifier, children[-2][0], nn.Identity())
    return f"{name}.{path}.", linear.in_features


def _shrink_stem(net: nn.Module, arch: str, family: str, channels: int) -> str:
    """Less downsampling in the stem for 28-64 px images; returns the stem conv's path."""
    if family in NO_SMALL_INPUT:
        raise UserError(f"model.small_input: torchvision:{arch} has no small-input variant: {NO_SMALL_INPUT[family]}")
    stem, conv = first_conv(net)
    if family == "resnet":  # ptft's ResNet stem (models/resnet.py): the last stage sees 4x4 at 32 px, not 1x1
        replace_module(net, stem, nn.Conv2d(channels, conv.out_channels, 3, stride=1, padding=1, bias=False))
        net.maxpool = nn.Identity()
    elif family == "convnext":  # 4x4 patchify at stride 2, padding 1: 32 px -> 16x16, same weights
        conv.stride, conv.padding = (2, 2), (1, 1)
    else:
        conv.stride = (1, 1)
        if STRIDE_ONE_STEMS[family]:
            replace_module(net, STRIDE_ONE_STEMS[family], nn.Identity())
    return stem


def _layer_ids(net: nn.Module, plan: tuple[str, ...]) -> dict[str, int]:
    """Parameter name -> depth: the rank of its group in `plan` (groups without parameters skipped)."""
    groups: dict[str, int] = {}
    ids = {}
    for name, _ in net.named_parameters():
        group = _group_of(name, plan)
        ids[name] = groups.setdefault(group, len(groups))
    return ids


def _group_of(name: str, plan: tuple[str, ...]) -> str:
    for entry in plan:
        if entry.endswith(".*"):
            container = entry[:-1]  # "features."
            if name.startswith(container):
                return container + name[len(container):].split(".")[0]
        elif any(name == top or name.startswith(top + ".") for top in entry.split("|")):
            return entry
    raise ValueError(f"parameter {name!r} is in no depth group of {plan}")


def _block_containers(plan: tuple[str, ...]) -> tuple[str, ...]:
    """The containers whose children are blocks (`features`, `encoder.layers`): what grad checkpointing wraps."""
    return tuple(entry[:-2] for entry in plan if entry.endswith(".*"))


def _position_embedding(net: nn.Module, family: str) -> tuple[str, int, tuple[int, int]] | None:
    if family != "vit":
        return None
    grid = net.image_size // net.patch_size
    return "encoder.pos_embedding", 1, (grid, grid)  # one class token before the patches


class ViTTokens(PatchTokens):
    """torchvision's VisionTransformer.forward in two steps (see PatchTokens)."""

    def __init__(self, net: nn.Module):
        self.net = net
        self.patch_size = net.patch_size
        self.num_patches = (net.image_size // net.patch_size) ** 2
        self.width = net.hidden_dim

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.net._process_input(x) + self.net.encoder.pos_embedding[:, 1:]  # (N, L, D)

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        net = self.net
        cls = net.class_token.expand(len(tokens), -1, -1) + net.encoder.pos_embedding[:, :1]  # (N, 1, D)
        x = net.encoder.dropout(torch.cat([cls, tokens], dim=1))
        return net.encoder.ln(net.encoder.layers(x))  # (N, 1 + K, D)


def preprocessing(arch: str) -> dict | None:
    """What torchvision's default weights for `arch` expect: mean, std, resize and crop size, interpolation."""
    try:
        weights = torchvision.models.get_model_weights(arch).DEFAULT
    except (ValueError, AttributeError):
        return None
    transform = weights.transforms()
    return {"source": f"torchvision {weights}", "mean": list(transform.mean), "std": list(transform.std),
            "resize_size": list(transform.resize_size), "crop_size": list(transform.crop_size),
            "interpolation": transform.interpolation.value}

