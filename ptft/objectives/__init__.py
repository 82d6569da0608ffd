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
Preset = Literal["custom", "auto", "grey", "grey_objects", "rgb", "simclr_rgb"]

# Strengths of the two views of contrastive and vicreg, per kind of image. grey: digits and
# glyphs (no mirror: a mirrored 2 is no digit; crops keep half a glyph, a quarter is often another
# one); grey_objects: clothes and shapes, which stay what they are mirrored; rgb: photos (small
# crops and mirrors, SimCLR's geometry); simclr_rgb (contrastive): SimCLR's ImageNet recipe, its
# colour and blur ops added by ptft.objectives.contrastive. The options left out keep the builders' defaults.
PRESETS = {
    "grey": {"crop_scale": (0.5, 1.0), "max_rotation": 15.0, "max_shift": 0.1, "noise_std": 0.05, "flip": False},
    "grey_objects": {"crop_scale": (0.5, 1.0), "max_rotation": 10.0, "max_shift": 0.1, "noise_std": 0.05,
                     "flip": True},
    "rgb": {"crop_scale": (0.2, 1.0), "max_rotation": 0.0, "max_shift": 0.0, "noise_std": 0.0, "flip": True},
    "simclr_rgb": {"crop_scale": (0.08, 1.0), "crop_ratio": (3 / 4, 4 / 3), "max_rotation": 0.0, "max_shift": 0.0,
                   "noise_std": 0.0, "flip": True},
}
VIEW_OPTIONS = ("crop_scale", "crop_ratio", "max_rotation", "max_shift", "noise_std", "cutout", "flip")


def resolve_preset(preset: str, input_shape: tuple[int, int, int]) -> str:
    """The preset `auto` stands for: rgb for 3 channels, else grey. (C, H, W) cannot tell a digit
    from a shirt, so grey images get the preset that is safe for both (no mirror images)."""
    if preset != "auto":
        return preset
    return "rgb" if input_shape[0] == 3 else "grey"


def _view_options(objective: str, preset: str, input_shape: tuple[int, int, int], given: dict) -> dict:
    """The view options a builder uses: `given` for preset custom, else the preset's over the defaults.

    Raises:
        UserError: a view option set away from its default beside a preset, which would ignore it.
    """
    if preset == "custom":
        return given
    import inspect

    # Through the registry: importing ptft.objectives.<name> rebinds the package attribute to the module.
    parameters = inspect.signature(OBJECTIVES.get(objective)).parameters
    defaults = {name: p.default for name, p in parameters.items() if name in given}
    changed = sorted(k for k, v in given.items() if _plain(v) != _plain(defaults[k]))
    if changed:
        raise UserError(f"objective.{changed[0]}: set beside objective.preset {preset!r}, which chooses the view "
                        f"options ({', '.join(VIEW_OPTIONS)}); set preset: custom to use your own")
    return {**given, **PRESETS[resolve_preset(preset, input_shape)]}


def _plain(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value

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
                max_shift: float = 0.1, noise_std: float = 0.05, cutout: int = 0, flip: bool = False,
                preset: Preset = "custom"):
    """SimCLR: NT-Xent between projected encoder features of two augmented views (own projector)."""
    from ptft.objectives.contrastive import Contrastive

    _require_model("contrastive", model, ("autoencoder", "classifier", "encoder"))
    _require(temperature > 0, "temperature", "a temperature > 0", temperature)
    _require(projector_dim >= 1, "projector_dim", "an integer >= 1", projector_dim)
    _require(hidden_dim >= 1, "hidden_dim", "an integer >= 1", hidden_dim)
    augment = _two_view_augment("contrastive", preset, input_shape, dict(
        crop_scale=crop_scale, crop_ratio=crop_ratio, max_rotation=max_rotation, max_shift=max_shift,
        noise_std=noise_std, cutout=cutout, flip=flip))
    return Contrastive(model.encoder.out_features, augment, temperature, hidden_dim, projector_dim)


@OBJECTIVES.register(model_kinds=("autoencoder", "classifier", "encoder"))
def vicreg(model, input_shape: tuple[int, int, int], *, projector_dim: int = 128, hidden_dim: int = 256,
           invariance_weight: float = 25.0, variance_weight: float = 25.0, covariance_weight: float = 1.0,
           crop_scale: tuple[float, float] = (0.5, 1.0), crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
           max_rotation: float = 15.0, max_shift: float = 0.1, noise_std: float = 0.05, cutout: int = 0,
           flip: bool = False, preset: Preset = "custom"):
    """VICReg: invariance, variance and covariance terms on projected features of two views (no negatives)."""
    from ptft.objectives.vicreg import VICReg

    _require_model("vicreg", model, ("autoencoder", "classifier", "encoder"))
    _require(projector_dim >= 2, "projector_dim", "an integer >= 2 (covariance needs two dimensions)", projector_dim)
    _require(hidden_dim >= 1, "hidden_dim", "an integer >= 1", hidden_dim)
    for key, weight in (("invariance_weight", invariance_weight), ("variance_weight", variance_weight),
                        ("covariance_weight", covariance_weight)):
        _require(weight >= 0, key, "a weight >= 0", weight)
    augment = _two_view_augment("vicreg", preset, input_shape, dict(
        crop_scale=crop_scale, crop_ratio=crop_ratio, max_rotation=max_rotation, max_shift=max_shift,
        noise_std=noise_std, cutout=cutout, flip=flip))
    return VICReg(model.encoder.out_features, augment, hidden_dim, projector_dim,
                  invariance_weight, variance_weight, covariance_weight)


def _two_view_augment(objective: str, preset: str, input_shape, options: dict):
    """The views of a two-view objective (contrastive, vicreg): its options or its preset, plus colour for simclr_rgb."""
    augment = _augment(input_shape, **_view_options(objective, preset, input_shape, options))
    if preset == "simclr_rgb":
        from ptft.objectives.contrastive import with_simclr_colour

        augment = with_simclr_colour(augment, input_shape)
    return augment


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
                   max_shift=max_shift, flip_p=0.5 if flip else 0.0, cutout=cutout, noise_std=noise_std,
                   output_size=tuple(input_shape[1:]))


@OBJECTIVES.register(model_kinds=("classifier",))
def supervised(model, input_shape: tuple[int, int, int], *, label_smoothing: float = 0.0,
               crop_scale: tuple[float, float] = (1.0, 1.0), crop_ratio: tuple[float, float] = (1.0, 1.0),
               max_rotation: float = 0.0, max_shift: float = 0.0, noise_std: float = 0.0, cutout: int = 0,
               flip: bool = False, class_weights: Literal["balanced"] | list[float] | None = None):
    """Softmax cross-entropy on labels (supervised pretraining, every finetuning run), optionally augmented."""
    # The augmentation options are contrastive's, all off by default. They apply to training
    # batches only: validation and evaluation see the images as they are.
    from ptft.objectives.supervised import Supervised

    _require_model("supervised", model, ("classifier",))
    _require(0 <= label_smoothing < 1, "label_smoothing", "a value in [0, 1)", label_smoothing)
    augment = _augment(input_shape, crop_scale, crop_ratio, max_rotation, max_shift, noise_std, cutout, flip)
    # class_weights: "balanced" is set from the labelled subset by Supervised.fit_to_labels;
    # a list is checked here against the classifier's outputs (known only once the model is built).
    return Supervised(label_smoothing, augment if augment.changes_images else None, class_weights,
                      model.head.out_features)


@OBJECTIVES.register(model_kinds=("classifier", "encoder"))
def mae(model, input_shape: tuple[int, int, int], *, mask_ratio: float = 0.75, decoder_dim: int = 128,
        decoder_depth: int = 2, decoder_heads: int = 4, norm_pix_loss: bool = True):
    """MAE for ViTs: encode the visible patches only, a light decoder predicts the masked patches' pixels."""
    from ptft.objectives.mae import MAE

    _require_model("mae", model, ("classifier", "encoder"))
    tokens = getattr(model.encoder, "patch_tokens", None)
    if tokens is None:
        raise UserError("objective 'mae' masks patches in token space, so it needs a ViT encoder (model.name "
                        "torchvision:vit_b_16 or a timm ViT such as timm:vit_tiny_patch16_224); for other models "
                        "use 'masked' with an autoencoder, 'contrastive' or 'vicreg'")
    _require(0 < mask_ratio < 1, "mask_ratio", "a fraction of patches in (0, 1)", mask_ratio)
    _require(decoder_dim >= 1 and decoder_depth >= 1, "decoder_dim", "decoder_dim and decoder_depth >= 1",
             (decoder_dim, decoder_depth))
    _require(decoder_heads >= 1 and decoder_dim % decoder_heads == 0, "decoder_heads",
             f"a divisor of decoder_dim {decoder_dim}", decoder_heads)
    return MAE(tokens, input_shape[0], mask_ratio, decoder_dim, decoder_depth, decoder_heads, norm_pix_loss)
