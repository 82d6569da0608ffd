"""timm models as ptft encoders (`model.name: timm:<name>`, the `ptft[timm]` extra).

timm does the work itself: `create_model(name, in_chans=C)` builds the stem for the data's
channels (a 3-channel file's stem loads into a 1-channel one summed over RGB, as timm's own
`adapt_input_conv` does), `reset_classifier(0)` leaves the pooled pre-logits features as the
output (`forward_head(pre_logits=True)`), `set_input_size` rebuilds a ViT's patch grid for the
data's image size, and `group_matcher` says which block a parameter belongs to (layer decay).
The encoder's keys are timm's own names (`encoder.` + `blocks.0.attn.qkv.weight`), the file's
classifier (`pretrained_cfg["classifier"]`: `head`, `head.fc`, `fc`, ...) becomes ptft's `head.`.
"""

from __future__ import annotations

import torch
from torch import nn

from ptft.models.backbone_names import import_timm
from ptft.models.backbones import FORWARD_FEATURES, LibraryEncoder, PatchTokens, first_conv

PREPROCESSING_KEYS = ("mean", "std", "input_size", "interpolation", "crop_pct")


def timm_encoder(name: str, input_shape: tuple[int, int, int]) -> LibraryEncoder:
    """The timm model `name` (random init) as an encoder for `input_shape` images."""
    timm = import_timm()
    channels, height, width = input_shape
    net = timm.create_model(name, pretrained=False, in_chans=channels)
    classifier = net.get_classifier()
    classifier = classifier[0] if isinstance(classifier, tuple) else classifier  # distilled: (head, head_dist)
    out_features = classifier.in_features
    library_head = _classifier_name(net.pretrained_cfg) + "."
    net.reset_classifier(0)
    if _patch_grid(net) is not None and tuple(net.patch_embed.img_size) != (height, width):
        net.set_input_size(img_size=(height, width))
    stem, _ = first_conv(net)
    return LibraryEncoder(net, out_features=out_features, layer_ids=_layer_ids(net), library_head=library_head,
                          stem=f"{stem}.weight", position_embedding=_position_embedding(net),
                          preprocessing=preprocessing(net, name), blocks=None, tokens=TimmViTTokens.of(net),
                          feature_map=None if _patch_grid(net) else FORWARD_FEATURES)


def _classifier_name(cfg: dict) -> str:
    name = cfg.get("classifier", "head")
    return name[0] if isinstance(name, (tuple, list)) else name


def _patch_grid(net: nn.Module) -> tuple[int, int] | None:
    embed = getattr(net, "patch_embed", None)
    if getattr(embed, "img_size", None) is None or not callable(getattr(net, "set_input_size", None)):
        return None
    return tuple(embed.grid_size)


def _layer_ids(net: nn.Module) -> dict[str, int]:
    """Parameter name -> depth from timm's own block grouping (stem 0, one per block, the rest last)."""
    from timm.models import group_parameters

    groups = group_parameters(net, net.group_matcher(coarse=False))
    rank = {group: depth for depth, group in enumerate(sorted(groups))}
    ids = {name: rank[group] for group, names in groups.items() for name in names}
    last = len(rank)  # parameters timm's matcher does not place sit after every block
    return {name: ids.get(name, last) for name, _ in net.named_parameters()}


def _position_embedding(net: nn.Module) -> tuple[str, int, tuple[int, int]] | None:
    grid = _patch_grid(net)
    embed = getattr(net, "pos_embed", None)
    if grid is None or not isinstance(embed, nn.Parameter) or embed.dim() != 3:
        return None
    prefix = 0 if getattr(net, "no_embed_class", False) else getattr(net, "num_prefix_tokens", 0)
    return "pos_embed", prefix, grid


class TimmViTTokens(PatchTokens):
    """timm's VisionTransformer.forward_features in two steps (see PatchTokens), for the plain layout:
    one class token with its own position, no register tokens, a fixed image size."""

    def __init__(self, net: nn.Module):
        self.net = net
        self.patch_size = net.patch_embed.patch_size[0]
        self.num_patches = net.patch_embed.num_patches
        self.width = net.embed_dim

    @classmethod
    def of(cls, net: nn.Module) -> TimmViTTokens | None:
        plain = (type(net).__name__ == "VisionTransformer" and getattr(net, "cls_token", None) is not None
                 and getattr(net, "reg_token", None) is None and not getattr(net, "no_embed_class", True)
                 and not getattr(net, "dynamic_img_size", True) and getattr(net.patch_embed, "flatten", False))
        return cls(net) if plain else None

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.patch_embed(x) + self.net.pos_embed[:, 1:]  # (N, L, D)

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        net = self.net
        cls = net.cls_token.expand(len(tokens), -1, -1) + net.pos_embed[:, :1]  # (N, 1, D)
        x = net.norm_pre(net.pos_drop(torch.cat([cls, tokens], dim=1)))
        return net.norm(net.blocks(x))  # (N, 1 + K, D)


def preprocessing(net: nn.Module, name: str) -> dict:
    """What timm's pretrained config for `name` expects: mean, std, input size, interpolation, crop."""
    cfg = net.pretrained_cfg
    found = {key: list(cfg[key]) if isinstance(cfg[key], tuple) else cfg[key] for key in PREPROCESSING_KEYS
             if key in cfg}
    return {"source": f"timm pretrained_cfg of {name}", **found}
