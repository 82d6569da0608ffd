"""The OBJECTIVES registry: pretraining and finetuning losses.

A builder is `fn(model, input_shape, *, **options) -> Objective`; its keyword-only
parameters are the config's `objective:` keys. An objective is an `nn.Module` with
`needs_labels: bool` and `forward(model, x, y, generator) -> (loss, logs)`: a scalar loss and
a dict of 0-dim tensors to log, all randomness drawn from `generator`. Builders check the
model's kind and the option values, then import torch; `import ptft.objectives` does not.
Each is registered with `model_kinds`, the model kinds it accepts, so config validation can
refuse a mismatch without building anything. An objective whose loss depends on how a split is
cut into batches sets `eval_chunk_size` (others set None); validation then uses that batch size.
"""

from __future__ import annotations

from typing import Literal, get_args

from ptft.errors import UserError
from ptft.registry import Registry

OBJECTIVES = Registry("objective")

Noise = Literal["gaussian", "mask"]

# Validation batch size of the objectives whose loss depends on the batching: contrastive (the
# negatives are the rest of the batch) and those that draw noise per call (which example gets
# which draw depends on where batches start). Fixed here, not taken from data.eval_batch_size,
# because --resume may change that key and val/loss must stay comparable to pick the best step.
EVAL_CHUNK_SIZE = 256

_KIND_NAMES = {"autoencoder": "an autoencoder", "classifier": "a classifier", "encoder": "an encoder-only model"}


def _model_kind(model) -> str:
    # From the parts the model has, as architecture.md composes them.
    if hasattr(model, "decoder"):
        return "autoencoder"
    if hasattr(model, "head"):
        return "classifier"
    return "encoder"


def _require_model(objective: str, model, kinds: tuple[str, ...]) -> None:
    if not hasattr(model, "encoder"):
        raise UserError(f"objective {objective!r} needs a model with an encoder; "
                        f"model.name gives a {type(model).__name__} without one")
    kind = _model_kind(model)
    if kind not in kinds:
        wanted = " or ".join(_KIND_NAMES[k] for k in kinds)
        raise UserError(f"objective {objective!r} needs {wanted} model (model.name is {_KIND_NAMES[kind]}); "
                        f"pick a matching model.name or another objective.name")


def _require(ok: bool, key: str, expected: str, value) -> None:
    if not ok:
        raise UserError(f"objective.{key}: expected {expected}, got {value!r}")


def _smallest_side(input_shape: tuple[int, int, int]) -> int:
    return min(input_shape[1], input_shape[2])


@OBJECTIVES.register(model_kinds=("autoencoder",))
def reconstruction(model, input_shape: tuple[int, int, int]):
    """Autoencoder: mean squared error between the reconstruction and the input."""
    from ptft.objectives.reconstruction import Reconstruction

    _require_model("reconstruction", model, ("autoencoder",))
    return Reconstruction()


@OBJECTIVES.register(model_kinds=("autoencoder",))
def denoising(model, input_shape: tuple[int, int, int], *, noise: Noise = "gaussian", std: float = 0.3,
              mask_prob: float = 0.25):
    """Denoising autoencoder: reconstruct the clean input from a Gaussian-noised or pixel-masked one."""
    from ptft.objectives.reconstruction import Denoising

    _require_model("denoising", model, ("autoencoder",))
    _require(noise in get_args(Noise), "noise", " or ".join(get_args(Noise)), noise)
    _require(std >= 0, "std", "a standard deviation >= 0", std)
    _require(0 <= mask_prob < 1, "mask_prob", "a probability in [0, 1)", mask_prob)
    return Denoising(noise, std, mask_prob)


@OBJECTIVES.register(model_kinds=("autoencoder",))
def masked(model, input_shape: tuple[int, int, int], *, patch_size: int = 2, mask_ratio: float = 0.5):
    """Masked autoencoder: hide random square patches (filled with 0), MSE on the hidden pixels."""
    from ptft.objectives.reconstruction import Masked

    _require_model("masked", model, ("autoencoder",))
    side = _smallest_side(input_shape)
    _require(1 <= patch_size <= side, "patch_size", f"an integer in [1, {side}] for {input_shape} inputs", patch_size)
    _require(0 < mask_ratio <= 1, "mask_ratio", "a fraction of patches in (0, 1]", mask_ratio)
    return Masked(patch_size, mask_ratio)


@OBJECTIVES.register(model_kinds=("autoencoder", "classifier", "encoder"))
def contrastive(model, input_shape: tuple[int, int, int], *, temperature: float = 0.2, projector_dim: int = 64,
                hidden_dim: int = 256, crop_scale: tuple[float, float] = (0.5, 1.0),
                crop_ratio: tuple[float, float] = (3 / 4, 4 / 3), max_rotation: float = 15.0,
                max_shift: float = 0.1, noise_std: float = 0.05, cutout: int = 0, flip: bool = False):
    """SimCLR: NT-Xent between projected encoder features of two augmented views (own projector)."""
    from ptft.objectives.contrastive import Contrastive

    _require_model("contrastive", model, ("autoencoder", "classifier", "encoder"))
    _require(temperature > 0, "temperature", "a temperature > 0", temperature)
    _require(projector_dim >= 1, "projector_dim", "an integer >= 1", projector_dim)
    _require(hidden_dim >= 1, "hidden_dim", "an integer >= 1", hidden_dim)
    augment = _augment(input_shape, crop_scale, crop_ratio, max_rotation, max_shift, noise_std, cutout, flip)
    return Contrastive(model.encoder.out_features, augment, temperature, hidden_dim, projector_dim)


def _augment(input_shape, crop_scale, crop_ratio, max_rotation, max_shift, noise_std, cutout, flip):
    """The Augment that the options describe, after checking each one (errors name the key)."""
    from ptft.objectives.augment import Augment

    low, high = crop_scale
    _require(0 < low <= high <= 1, "crop_scale", "[low, high] with 0 < low <= high <= 1", crop_scale)
    low, high = crop_ratio
    _require(0 < low <= high, "crop_ratio", "[low, high] with 0 < low <= high", crop_ratio)
    _require(0 <= max_rotation <= 180, "max_rotation", "degrees in [0, 180]", max_rotation)
    _require(0 <= max_shift < 1, "max_shift", "a fraction of the image size in [0, 1)", max_shift)
    _require(noise_std >= 0, "noise_std", "a standard deviation >= 0", noise_std)
    side = _smallest_side(input_shape)
    _require(0 <= cutout <= side, "cutout", f"a square side in [0, {side}] pixels for {input_shape} inputs", cutout)
    # Flip is opt-in everywhere: a mirrored digit is often another digit or none.
    return Augment(crop_scale=tuple(crop_scale), crop_ratio=tuple(crop_ratio), max_rotation=max_rotation,
                   max_shift=max_shift, flip_p=0.5 if flip else 0.0, cutout=cutout, noise_std=noise_std)


@OBJECTIVES.register(model_kinds=("classifier",))
def supervised(model, input_shape: tuple[int, int, int], *, label_smoothing: float = 0.0,
               crop_scale: tuple[float, float] = (1.0, 1.0), crop_ratio: tuple[float, float] = (1.0, 1.0),
               max_rotation: float = 0.0, max_shift: float = 0.0, noise_std: float = 0.0, cutout: int = 0,
               flip: bool = False):
    """Softmax cross-entropy on labels (supervised pretraining, every finetuning run), optionally augmented."""
    # The augmentation options are contrastive's, all off by default. They apply to training
    # batches only: validation and evaluation see the images as they are.
    from ptft.objectives.supervised import Supervised

    _require_model("supervised", model, ("classifier",))
    _require(0 <= label_smoothing < 1, "label_smoothing", "a value in [0, 1)", label_smoothing)
    augment = _augment(input_shape, crop_scale, crop_ratio, max_rotation, max_shift, noise_std, cutout, flip)
    return Supervised(label_smoothing, augment if augment.changes_images else None)
