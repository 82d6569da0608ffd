"""The MODELS registry: named builders of autoencoders, classifiers and bare encoders.

A builder is `fn(input_shape, num_classes, *, **options) -> nn.Module`; its keyword-only
parameters are the config's `model:` keys. Builders import torch inside their body, so
listing and validating models never imports it. Each family shares its encoder between its
autoencoder, classifier and encoder builders with the same option names, so a classifier
loads the `encoder.*` weights of an autoencoder built with the same options as they are.
Registered with `kind` ("autoencoder", "classifier", "encoder") for config validation.
"""

from __future__ import annotations

from typing import Literal, get_args

from ptft.errors import UserError
from ptft.registry import Registry

MODELS = Registry("model", entry_point_group="ptft.models", allow_import_path=True)

Activation = Literal["relu", "gelu", "silu"]


def summarize(model) -> list[tuple[str, int]]:
    """(top-level child name, parameter count) for each child of `model`, e.g. encoder, head."""
    return [(name, sum(p.numel() for p in child.parameters())) for name, child in model.named_children()]


def _check_sizes(key: str, values: list[int]) -> None:
    if not values or any(v < 1 for v in values):
        raise UserError(f"model.{key}: expected a non-empty list of positive integers, got {values!r}")


def _check_positive(key: str, value: int) -> None:
    if value < 1:
        raise UserError(f"model.{key}: expected an integer >= 1, got {value!r}")


def _check_probability(key: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise UserError(f"model.{key}: expected a dropout probability in [0, 1), got {value!r}")


def _check_activation(value: str) -> None:
    if value not in get_args(Activation):
        raise UserError(f"model.activation: expected one of {', '.join(get_args(Activation))}, got {value!r}")


def _checked_mlp(hidden: list[int], latent: int, activation: str, dropout: float) -> None:
    _check_sizes("hidden", hidden)
    _check_positive("latent", latent)
    _check_activation(activation)
    _check_probability("dropout", dropout)


def _checked_conv(channels: list[int], latent: int, activation: str) -> None:
    _check_sizes("channels", channels)
    _check_positive("latent", latent)
    _check_activation(activation)


# ---- MLP: flatten -> hidden blocks -> linear latent -------------------------------------------

@MODELS.register(kind="autoencoder")
def mlp_autoencoder(input_shape: tuple[int, int, int], num_classes: int, *, hidden: list[int] = [256, 128],
                    latent: int = 64, activation: Activation = "relu", dropout: float = 0.0, batch_norm: bool = False):
    """MLP autoencoder: flatten -> hidden layers -> latent -> mirrored decoder, output in [0, 1]."""
    from ptft.models import compose, mlp

    _checked_mlp(hidden, latent, activation, dropout)
    encoder = mlp.mlp_encoder(input_shape, hidden, latent, activation, dropout, batch_norm)
    return compose.AutoEncoder(encoder, mlp.mlp_decoder(input_shape, hidden, latent, activation, batch_norm))


@MODELS.register(kind="classifier")
def mlp_classifier(input_shape: tuple[int, int, int], num_classes: int, *, hidden: list[int] = [256, 128],
                   latent: int = 64, activation: Activation = "relu", dropout: float = 0.0, batch_norm: bool = False,
                   head_dropout: float = 0.0):
    """MLP classifier: the mlp_autoencoder's encoder plus a linear head."""
    from ptft.models import compose, mlp

    _checked_mlp(hidden, latent, activation, dropout)
    _check_probability("head_dropout", head_dropout)
    encoder = mlp.mlp_encoder(input_shape, hidden, latent, activation, dropout, batch_norm)
    return compose.classifier(encoder, num_classes, head_dropout)


@MODELS.register(kind="encoder")
def mlp_encoder(input_shape: tuple[int, int, int], num_classes: int, *, hidden: list[int] = [256, 128],
                latent: int = 64, activation: Activation = "relu", dropout: float = 0.0, batch_norm: bool = False):
    """MLP encoder alone (features = latent), for objectives with their own head, e.g. contrastive."""
    from ptft.models import compose, mlp

    _checked_mlp(hidden, latent, activation, dropout)
    return compose.EncoderOnly(mlp.mlp_encoder(input_shape, hidden, latent, activation, dropout, batch_norm))


@MODELS.register(kind="autoencoder")
def tiny_mlp_autoencoder(input_shape: tuple[int, int, int], num_classes: int, *, hidden: list[int] = [8],
                         latent: int = 8, activation: Activation = "relu", dropout: float = 0.0,
                         batch_norm: bool = False):
    """Tiny mlp_autoencoder for tests (about 1,200 parameters on 8x8 digits)."""
    return mlp_autoencoder(input_shape, num_classes, hidden=hidden, latent=latent, activation=activation,
                           dropout=dropout, batch_norm=batch_norm)


@MODELS.register(kind="classifier")
def tiny_mlp_classifier(input_shape: tuple[int, int, int], num_classes: int, *, hidden: list[int] = [8],
                        latent: int = 8, activation: Activation = "relu", dropout: float = 0.0,
                        batch_norm: bool = False, head_dropout: float = 0.0):
    """Tiny mlp_classifier for tests; loads tiny_mlp_autoencoder's encoder."""
    return mlp_classifier(input_shape, num_classes, hidden=hidden, latent=latent, activation=activation,
                          dropout=dropout, batch_norm=batch_norm, head_dropout=head_dropout)


# ---- Conv: stride-2 3x3 conv stages -> flatten -> linear latent -------------------------------

@MODELS.register(kind="autoencoder")
def conv_autoencoder(input_shape: tuple[int, int, int], num_classes: int, *, channels: list[int] = [32, 64],
                     latent: int = 128, activation: Activation = "relu", batch_norm: bool = True):
    """Conv autoencoder: stride-2 conv stages -> latent -> transposed convs, output in [0, 1]."""
    from ptft.models import compose, conv

    _checked_conv(channels, latent, activation)
    encoder = conv.conv_encoder(input_shape, channels, latent, activation, batch_norm)
    return compose.AutoEncoder(encoder, conv.conv_decoder(input_shape, channels, latent, activation, batch_norm))


@MODELS.register(kind="classifier")
def conv_classifier(input_shape: tuple[int, int, int], num_classes: int, *, channels: list[int] = [32, 64],
                    latent: int = 128, activation: Activation = "relu", batch_norm: bool = True,
                    head_dropout: float = 0.0):
    """Conv classifier: the conv_autoencoder's encoder plus a linear head."""
    from ptft.models import compose, conv

    _checked_conv(channels, latent, activation)
    _check_probability("head_dropout", head_dropout)
    encoder = conv.conv_encoder(input_shape, channels, latent, activation, batch_norm)
    return compose.classifier(encoder, num_classes, head_dropout)


@MODELS.register(kind="encoder")
def conv_encoder(input_shape: tuple[int, int, int], num_classes: int, *, channels: list[int] = [32, 64],
                 latent: int = 128, activation: Activation = "relu", batch_norm: bool = True):
    """Conv encoder alone (features = latent), for objectives with their own head, e.g. contrastive."""
    from ptft.models import compose, conv

    _checked_conv(channels, latent, activation)
    return compose.EncoderOnly(conv.conv_encoder(input_shape, channels, latent, activation, batch_norm))


@MODELS.register(kind="autoencoder")
def tiny_conv_autoencoder(input_shape: tuple[int, int, int], num_classes: int, *, channels: list[int] = [4, 8],
                          latent: int = 8, activation: Activation = "relu", batch_norm: bool = True):
    """Tiny conv_autoencoder for tests (about 1,300 parameters on 8x8 digits)."""
    return conv_autoencoder(input_shape, num_classes, channels=channels, latent=latent, activation=activation,
                            batch_norm=batch_norm)


@MODELS.register(kind="classifier")
def tiny_conv_classifier(input_shape: tuple[int, int, int], num_classes: int, *, channels: list[int] = [4, 8],
                         latent: int = 8, activation: Activation = "relu", batch_norm: bool = True,
                         head_dropout: float = 0.0):
    """Tiny conv_classifier for tests; loads tiny_conv_autoencoder's encoder."""
    return conv_classifier(input_shape, num_classes, channels=channels, latent=latent, activation=activation,
                           batch_norm=batch_norm, head_dropout=head_dropout)


# ---- torchvision ResNets (keys: encoder.<torchvision name>, head = torchvision's fc) ---------

def _resnet_classifier(arch: str, input_shape, num_classes: int, small_input: bool, head_dropout: float):
    from ptft.models import compose, resnet

    _check_probability("head_dropout", head_dropout)
    return compose.classifier(resnet.ResNetEncoder(arch, input_shape[0], small_input), num_classes, head_dropout)


@MODELS.register(kind="classifier")
def resnet18_classifier(input_shape: tuple[int, int, int], num_classes: int, *, small_input: bool = True,
                        head_dropout: float = 0.0):
    """torchvision ResNet-18 (random init) with a linear head; small_input: 3x3 stem, no max-pool."""
    return _resnet_classifier("resnet18", input_shape, num_classes, small_input, head_dropout)


@MODELS.register(kind="classifier")
def resnet34_classifier(input_shape: tuple[int, int, int], num_classes: int, *, small_input: bool = True,
                        head_dropout: float = 0.0):
    """torchvision ResNet-34 (random init) with a linear head; small_input: 3x3 stem, no max-pool."""
    return _resnet_classifier("resnet34", input_shape, num_classes, small_input, head_dropout)


@MODELS.register(kind="classifier")
def resnet50_classifier(input_shape: tuple[int, int, int], num_classes: int, *, small_input: bool = True,
                        head_dropout: float = 0.0):
    """torchvision ResNet-50 (random init) with a linear head; small_input: 3x3 stem, no max-pool."""
    return _resnet_classifier("resnet50", input_shape, num_classes, small_input, head_dropout)


@MODELS.register(kind="encoder")
def resnet18_encoder(input_shape: tuple[int, int, int], num_classes: int, *, small_input: bool = True):
    """torchvision ResNet-18 encoder alone (512 pooled features), e.g. for contrastive pretraining."""
    from ptft.models import compose, resnet

    return compose.EncoderOnly(resnet.ResNetEncoder("resnet18", input_shape[0], small_input))
