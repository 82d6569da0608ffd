"""Which library architectures `torchvision:<name>` and `timm:<name>` accept, without importing torch.

torchvision's classification architectures are written down by family (the family decides how
the network is split and shrunk for small inputs, see torchvision_backbones.py), so `ptft config`
and `ptft models` stay torch-free for them; a test holds the list against torchvision's own.
timm's list is timm's: asking for it imports timm (and torch), and a missing timm is a UserError
naming the extra to install.
"""

from __future__ import annotations

from ptft.errors import UserError

# torchvision 0.19+ classification architectures by family. Left out: googlenet and inception_v3
# (auxiliary classifiers that change the output in training), squeezenet (a conv classifier, no
# Linear head to replace), maxvit_t (built for one input size), alexnet (no use as a backbone).
TORCHVISION_FAMILIES: dict[str, tuple[str, ...]] = {
    "resnet": ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x8d",
               "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2"),
    "regnet": tuple(f"regnet_{kind}_{size}" for kind, sizes in (
        ("x", ("400mf", "800mf", "1_6gf", "3_2gf", "8gf", "16gf", "32gf")),
        ("y", ("400mf", "800mf", "1_6gf", "3_2gf", "8gf", "16gf", "32gf", "128gf"))) for size in sizes),
    "convnext": ("convnext_tiny", "convnext_small", "convnext_base", "convnext_large"),
    "efficientnet": (*(f"efficientnet_b{i}" for i in range(8)), "efficientnet_v2_s", "efficientnet_v2_m",
                     "efficientnet_v2_l"),
    "mobilenet": ("mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large"),
    "mnasnet": ("mnasnet0_5", "mnasnet0_75", "mnasnet1_0", "mnasnet1_3"),
    "shufflenet": ("shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "shufflenet_v2_x1_5", "shufflenet_v2_x2_0"),
    "densenet": ("densenet121", "densenet161", "densenet169", "densenet201"),
    "vgg": tuple(f"vgg{depth}{bn}" for depth in (11, 13, 16, 19) for bn in ("", "_bn")),
    "vit": ("vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14"),
    "swin": ("swin_t", "swin_s", "swin_b", "swin_v2_t", "swin_v2_s", "swin_v2_b"),
}
TORCHVISION_FAMILY_OF = {arch: family for family, archs in TORCHVISION_FAMILIES.items() for arch in archs}
TIMM_EXTRA = "pip install 'ptft[timm]'"


def torchvision_names() -> tuple[str, ...]:
    """The torchvision architectures `torchvision:<name>` builds."""
    return tuple(TORCHVISION_FAMILY_OF)


def timm_names() -> set[str]:
    """Every `timm.list_models()` name, with and without a pretrained tag (`vit_small_patch16_224.augreg_in1k`).

    Raises:
        UserError: timm is not installed (names the extra).
    """
    timm = import_timm()
    return set(timm.list_models()) | set(timm.list_models(pretrained=True))


def import_timm():
    """The timm module, or a UserError saying how to install it."""
    try:
        import timm
    except ImportError:
        raise UserError(f"model.name: timm models need the timm package, which is not installed; "
                        f"install it with {TIMM_EXTRA}") from None
    return timm
