"""The MODELS registry: named builders of autoencoders, classifiers and bare encoders.

A builder is `fn(input_shape, num_classes, *, **options) -> nn.Module`; its keyword-only
parameters are the config's `model:` keys. Builders import torch inside their body, so
listing and validating models never imports it. Each family shares its encoder between its
autoencoder, classifier and encoder builders with the same option names, so a classifier
loads the `encoder.*` weights of an autoencoder built with the same options as they are.
Registered with `kind` ("autoencoder", "classifier", "encoder") for config validation.
"""

from __future__ import annotations

import functools
from typing import Annotated, Literal

from pydantic import Field

from ptft.errors import UserError
from ptft.models import backbone_names
from ptft.registry import Registry

MODELS = Registry("model", entry_point_group="ptft.models", allow_import_path=True)

# Option types. Their ranges are the checks: config validation reads them from the builders'
# signatures (so `ptft config` catches `model.latent=0`), and `_checked` applies the same
# ones to builders called from Python.
Activation = Literal["relu", "gelu", "silu"]
Size = Annotated[int, Field(ge=1)]
Sizes = Annotated[list[Size], Field(min_length=1)]
Dropout = Annotated[float, Field(ge=0, lt=1)]
# torchvision families with tokens, not a feature map, for ptft's decoder (models/decoders.py).
TORCHVISION_TRANSFORMERS = ("vit", "swin")


def build_model(model_cfg, input_shape, num_classes: int, objective: str | None = None):
    """The registry's model named by `model_cfg` (a config's `model:` section), with its options, on the CPU.

    `objective` (the run's objective.name): one that reconstructs its input turns a library
    backbone into an autoencoder with ptft's feature-map decoder (models/decoders.py).

    Raises:
        UserError: bad options; a backbone without a feature map for a reconstruction objective.
    """
    model = MODELS.get(model_cfg.name)(tuple(input_shape), num_classes, **model_cfg.options)
    if objective is not None and decodes(model_cfg.name, objective):
        from ptft.models import decoders

        model = decoders.autoencoder_of(model, tuple(input_shape), model_cfg.name, objective)
    return model


def model_kind(model_name: str, objective: str | None = None) -> str | None:
    """The kind of model `build_model` builds: the registry's, or "autoencoder" for a library backbone
    that a reconstruction objective gives a decoder. None for import paths and plugins without one."""
    if objective is not None and decodes(model_name, objective):
        return "autoencoder"
    return MODELS.meta(model_name).get("kind")


def enable_grad_checkpointing(model, model_name: str) -> None:
    """train.grad_checkpointing: the encoder recomputes its blocks' activations in the backward pass.

    Raises:
        UserError: naming the key and the model, when its encoder does not support it.
    """
    enable = getattr(model.encoder, "set_grad_checkpointing", None)
    if enable is None:
        raise UserError(f"train.grad_checkpointing: model.name {model_name!r} does not support gradient "
                        "checkpointing (the torchvision: and timm: backbones do); set it to false")
    try:
        enable(True)
    except UserError as exc:
        reason = str(exc).removeprefix("train.grad_checkpointing: ")
        raise UserError(f"train.grad_checkpointing: model.name {model_name!r}: {reason}") from None


def decodes(model_name: str, objective: str) -> bool:
    """Whether `objective` trains autoencoders only and `model_name` is a library backbone (torchvision:, timm:)."""
    from ptft.objectives import OBJECTIVES

    family = model_name.partition(":")[0] if ":" in model_name else None
    return (family in MODELS.families() and not MODELS.is_import_path(model_name)
            and tuple(OBJECTIVES.meta(objective).get("model_kinds", ())) == ("autoencoder",))


def decoder_problem(model_name: str, objective: str) -> str | None:
    """Without torch: why `objective` cannot train `model_name` (a torchvision transformer has no
    feature map to decode), or None. timm models are checked when built (models/decoders.py)."""
    if not decodes(model_name, objective) or not model_name.startswith("torchvision:"):
        return None
    family = backbone_names.TORCHVISION_FAMILY_OF.get(model_name.partition(":")[2])
    if family not in TORCHVISION_TRANSFORMERS:
        return None
    return no_decoder_message(model_name, objective, has_patch_tokens=family == "vit")


def no_decoder_message(model_name: str, objective: str, has_patch_tokens: bool) -> str:
    """Why a reconstruction `objective` cannot train the transformer `model_name`, and which objectives can
    (a message about the key objective.name)."""
    fitting = "mae (masked patches in token space), " if has_patch_tokens else ""
    fitting += "contrastive, vicreg or supervised"
    return (f"{objective!r} reconstructs images through ptft's decoder of a convolutional feature "
            f"map, and model.name {model_name!r} is a transformer with tokens instead; pretrain it with {fitting}")


def summarize(model) -> list[tuple[str, int]]:
    """(top-level child name, parameter count) for each child of `model`, e.g. encoder, head."""
    return [(name, sum(p.numel() for p in child.parameters())) for name, child in model.named_children()]


def _checked(builder):
    """The builder, its keyword options checked against its annotations on every call, as a config's are."""

    @functools.wraps(builder)
    def build(input_shape, num_classes, **options):
        from ptft.config.validation import check_builder_options

        return builder(input_shape, num_classes, **check_builder_options("model", builder, options))

    return build


# ---- MLP: flatten -> hidden blocks -> linear latent -------------------------------------------

@MODELS.register(kind="autoencoder")
@_checked
def mlp_autoencoder(input_shape: tuple[int, int, int], num_classes: int, *, hidden: Sizes = [256, 128],
                    latent: Size = 64, activation: Activation = "relu", dropout: Dropout = 0.0,
                    batch_norm: bool = False):
    """MLP autoencoder: flatten -> hidden layers -> latent -> mirrored decoder, output in [0, 1]."""
    from ptft.models import compose, mlp

    encoder = mlp.mlp_encoder(input_shape, hidden, latent, activation, dropout, batch_norm)
    return compose.AutoEncoder(encoder, mlp.mlp_decoder(input_shape, hidden, latent, activation, batch_norm))


@MODELS.register(kind="classifier")
@_checked
def mlp_classifier(input_shape: tuple[int, int, int], num_classes: int, *, hidden: Sizes = [256, 128],
                   latent: Size = 64, activation: Activation = "relu", dropout: Dropout = 0.0, batch_norm: bool = False,
                   head_dropout: Dropout = 0.0):
    """MLP classifier: the mlp_autoencoder's encoder plus a linear head."""
    from ptft.models import compose, mlp

    encoder = mlp.mlp_encoder(input_shape, hidden, latent, activation, dropout, batch_norm)
    return compose.classifier(encoder, num_classes, head_dropout)


@MODELS.register(kind="encoder")
@_checked
def mlp_encoder(input_shape: tuple[int, int, int], num_classes: int, *, hidden: Sizes = [256, 128],
                latent: Size = 64, activation: Activation = "relu", dropout: Dropout = 0.0, batch_norm: bool = False):
    """MLP encoder alone (features = latent), for objectives with their own head, e.g. contrastive."""
    from ptft.models import compose, mlp

    return compose.EncoderOnly(mlp.mlp_encoder(input_shape, hidden, latent, activation, dropout, batch_norm))


@MODELS.register(kind="autoencoder")
@_checked
def tiny_mlp_autoencoder(input_shape: tuple[int, int, int], num_classes: int, *, hidden: Sizes = [8],
                         latent: Size = 8, activation: Activation = "relu", dropout: Dropout = 0.0,
                         batch_norm: bool = False):
    """Tiny mlp_autoencoder for tests (about 1,200 parameters on 8x8 digits)."""
    return mlp_autoencoder(input_shape, num_classes, hidden=hidden, latent=latent, activation=activation,
                           dropout=dropout, batch_norm=batch_norm)


@MODELS.register(kind="classifier")
@_checked
def tiny_mlp_classifier(input_shape: tuple[int, int, int], num_classes: int, *, hidden: Sizes = [8],
                        latent: Size = 8, activation: Activation = "relu", dropout: Dropout = 0.0,
                        batch_norm: bool = False, head_dropout: Dropout = 0.0):
    """Tiny mlp_classifier for tests; loads tiny_mlp_autoencoder's encoder."""
    return mlp_classifier(input_shape, num_classes, hidden=hidden, latent=latent, activation=activation,
                          dropout=dropout, batch_norm=batch_norm, head_dropout=head_dropout)


# ---- Conv: stride-2 3x3 conv stages -> flatten -> linear latent -------------------------------

@MODELS.register(kind="autoencoder")
@_checked
def conv_autoencoder(input_shape: tuple[int, int, int], num_classes: int, *, channels: Sizes = [32, 64],
                     latent: Size = 128, activation: Activation = "relu", batch_norm: bool = True):
    """Conv autoencoder: stride-2 conv stages -> latent -> transposed convs, output in [0, 1]."""
    from ptft.models import compose, conv

    encoder = conv.conv_encoder(input_shape, channels, latent, activation, batch_norm)
    return compose.AutoEncoder(encoder, conv.conv_decoder(input_shape, channels, latent, activation, batch_norm))


@MODELS.register(kind="classifier")
@_checked
def conv_classifier(input_shape: tuple[int, int, int], num_classes: int, *, channels: Sizes = [32, 64],
                    latent: Size = 128, activation: Activation = "relu", batch_norm: bool = True,
                    head_dropout: Dropout = 0.0):
    """Conv classifier: the conv_autoencoder's encoder plus a linear head."""
    from ptft.models import compose, conv

    encoder = conv.conv_encoder(input_shape, channels, latent, activation, batch_norm)
    return compose.classifier(encoder, num_classes, head_dropout)


@MODELS.register(kind="encoder")
@_checked
def conv_encoder(input_shape: tuple[int, int, int], num_classes: int, *, channels: Sizes = [32, 64],
                 latent: Size = 128, activation: Activation = "relu", batch_norm: bool = True):
    """Conv encoder alone (features = latent), for objectives with their own head, e.g. contrastive."""
    from ptft.models import compose, conv

    return compose.EncoderOnly(conv.conv_encoder(input_shape, channels, latent, activation, batch_norm))


@MODELS.register(kind="autoencoder")
@_checked
def tiny_conv_autoencoder(input_shape: tuple[int, int, int], num_classes: int, *, channels: Sizes = [4, 8],
                          latent: Size = 8, activation: Activation = "relu", batch_norm: bool = True):
    """Tiny conv_autoencoder for tests (about 1,300 parameters on 8x8 digits)."""
    return conv_autoencoder(input_shape, num_classes, channels=channels, latent=latent, activation=activation,
                            batch_norm=batch_norm)


@MODELS.register(kind="classifier")
@_checked
def tiny_conv_classifier(input_shape: tuple[int, int, int], num_classes: int, *, channels: Sizes = [4, 8],
                         latent: Size = 8, activation: Activation = "relu", batch_norm: bool = True,
                         head_dropout: Dropout = 0.0):
    """Tiny conv_classifier for tests; loads tiny_conv_autoencoder's encoder."""
    return conv_classifier(input_shape, num_classes, channels=channels, latent=latent, activation=activation,
                           batch_norm=batch_norm, head_dropout=head_dropout)


# ---- torchvision ResNets (keys: encoder.<torchvision name>, head = torchvision's fc) ---------

def _resnet_classifier(arch: str, input_shape, num_classes: int, small_input: bool, head_dropout: float):
    from ptft.models import compose, resnet

    return compose.classifier(resnet.ResNetEncoder(arch, input_shape[0], small_input), num_classes, head_dropout)


@MODELS.register(kind="classifier")
@_checked
def resnet18_classifier(input_shape: tuple[int, int, int], num_classes: int, *, small_input: bool = True,
                        head_dropout: Dropout = 0.0):
    """torchvision ResNet-18 (random init) with a linear head; small_input: 3x3 stem, no max-pool."""
    return _resnet_classifier("resnet18", input_shape, num_classes, small_input, head_dropout)


@MODELS.register(kind="classifier")
@_checked
def resnet34_classifier(input_shape: tuple[int, int, int], num_classes: int, *, small_input: bool = True,
                        head_dropout: Dropout = 0.0):
    """torchvision ResNet-34 (random init) with a linear head; small_input: 3x3 stem, no max-pool."""
    return _resnet_classifier("resnet34", input_shape, num_classes, small_input, head_dropout)


@MODELS.register(kind="classifier")
@_checked
def resnet50_classifier(input_shape: tuple[int, int, int], num_classes: int, *, small_input: bool = True,
                        head_dropout: Dropout = 0.0):
    """torchvision ResNet-50 (random init) with a linear head; small_input: 3x3 stem, no max-pool."""
    return _resnet_classifier("resnet50", input_shape, num_classes, small_input, head_dropout)


@MODELS.register(kind="encoder")
@_checked
def resnet18_encoder(input_shape: tuple[int, int, int], num_classes: int, *, small_input: bool = True):
    """torchvision ResNet-18 encoder alone (512 pooled features), e.g. for contrastive pretraining."""
    from ptft.models import compose, resnet

    return compose.EncoderOnly(resnet.ResNetEncoder("resnet18", input_shape[0], small_input))


# ---- Library backbones: torchvision:<architecture>, timm:<name> (keys: encoder.<library name>) ---
# A family resolves each member to a builder of its own, so the config validates the options of
# `torchvision:vit_b_16` like any registered model's. See models/torchvision_backbones.py.

def _family_builder(build, name: str, description: str):
    build.__name__ = build.__qualname__ = name.replace(":", "_")
    build.__doc__ = description
    return _checked(build)


@MODELS.register_family("torchvision", members=backbone_names.torchvision_names, member="architecture",
                        kind="classifier")
def torchvision_classifier(arch: str):
    """Any torchvision classification network, e.g. torchvision:convnext_tiny (random init) + linear head."""

    def build(input_shape: tuple[int, int, int], num_classes: int, *, small_input: bool = False,
              head_dropout: Dropout = 0.0):
        from ptft.models import compose, torchvision_backbones

        encoder = torchvision_backbones.torchvision_encoder(arch, input_shape, small_input)
        return compose.classifier(encoder, num_classes, head_dropout)

    return _family_builder(build, f"torchvision:{arch}", f"torchvision {arch} (random init) with a linear head; "
                                                         "small_input: less stem downsampling for 28-64 px images")


@MODELS.register_family("timm", members=backbone_names.timm_names, kind="classifier")
def timm_classifier(name: str):
    """Any timm.list_models() name, e.g. timm:vit_small_patch16_224 (random init) + linear head; ptft[timm] extra."""

    def build(input_shape: tuple[int, int, int], num_classes: int, *, head_dropout: Dropout = 0.0):
        from ptft.models import compose, timm_backbones

        return compose.classifier(timm_backbones.timm_encoder(name, input_shape), num_classes, head_dropout)

    return _family_builder(build, f"timm:{name}", f"timm {name} (random init) with a linear head")
