"""The checkpoint's preprocessing: an image file -> exactly the input its model was trained on.

Training images are (C, H, W) float32 in [0, 1]: uint8 pixels / 255 (torchvision datasets,
imagefolder) or the dataset's own float values (digits: pixel counts 0..16, divided by 16).
A user's file becomes uint8 pixels as imagefolder's training images do (`decode.py`: the
same channel rules and the same data.resize rule, crop or stretch, to the model's size), then
float in [0, 1] here, quantised to the dataset's pixel levels where it has them (digits), so
an image written from the training data comes back bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ptft.config import Config
from ptft.data import DATASETS, build_data
from ptft.data.batches import to_float
from ptft.data.images import DCT_SCALING_SINCE
from ptft.data.normalize import recorded_normalization
from ptft.errors import DataError
from ptft.meta import CheckpointMeta

# data.resize, as ptft.data.images.fit applies it to training images and to a user's files alike.
RESIZE_RULES = {
    "crop": "bilinear (PIL) from the largest centred region of height:width aspect ratio (as resizing the shorter "
            "side to the size and cropping the centre, in one pass) to height x width",
    "stretch": "bilinear (PIL) from the whole image to height x width, aspect ratio ignored",
}
GREY_FROM_RGB = "ITU-R 601-2 luma as PIL convert('L'): L = (19595 R + 38470 G + 7471 B + 32768) >> 16"
PIXEL_RULES = "16-bit, float and alpha images as ptft.data.images reads them (alpha over black)"
JPEG_RULES = {False: "decoded at full size, then resized",
              True: "decoded at the smallest DCT scale (1/2, 1/4, 1/8; PIL draft) covering height x width, then resized"}


@dataclass(frozen=True)
class Preprocessing:
    """What a model expects: (channels, height, width) in [0, 1], and its class names."""

    channels: int
    height: int
    width: int
    class_names: tuple[str, ...]
    resize: str  # data.resize: how a file of another size is fitted to (height, width); see RESIZE_RULES
    pixel_levels: int | None = None  # the dataset's pixels were counts 0..pixel_levels (digits: 16)
    # data.normalize's {"mean", "std"}: applied by the model itself (a hook on its encoder), not here
    normalization: dict | None = None
    # What the library weights the run started from expected (meta.json parent.expects): for the record;
    # the model was trained, and is fed, with `normalization`.
    pretrained: dict | None = None
    # The ptft.data.images.RULES_VERSION training images were decoded by (meta.json inputs.pixel_rules;
    # 1 before it was recorded): files are decoded by the same rules.
    pixel_rules: int = 1
    # (H, W) training images were decoded at when larger than the model's input (data.decode_size;
    # meta.json inputs.decoded_size): files are decoded at it, and the model fits them to its input
    # as it fitted every evaluation batch (ptft.data.resize).
    decoded_size: tuple[int, int] | None = None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.channels, self.height, self.width

    @property
    def decode_shape(self) -> tuple[int, int, int]:
        """(C, H, W) a file is decoded to: the model's input, or the larger size training kept images at."""
        return (self.channels, *self.decoded_size) if self.decoded_size else self.input_shape

    def to_model_input(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) uint8 pixels, or a dataset's own float images, -> float32 in [0, 1]."""
        x = to_float(images)
        if images.dtype == torch.uint8 and self.pixel_levels:
            x = x.mul_(self.pixel_levels).round_().div_(self.pixel_levels)
        return x

    def describe(self) -> dict:
        """The recipe in words and numbers, for people and for other runtimes (export's sidecar)."""
        levels = self.pixel_levels
        return {
            "layout": "NCHW", "dtype": "float32", "shape": [None, *self.input_shape],
            "color": "grey" if self.channels == 1 else "rgb",
            "grey_from_rgb": GREY_FROM_RGB if self.channels == 1 else None,
            "resize": RESIZE_RULES[self.resize], "resize_rule": self.resize, "pixels": PIXEL_RULES,
            "jpeg": JPEG_RULES[self.pixel_rules >= DCT_SCALING_SINCE],
            "decoded_size": list(self.decoded_size) if self.decoded_size else None,
            "scale": f"round(pixel / 255 * {levels}) / {levels}" if levels else "pixel / 255",
            # Nothing to subtract or divide outside: data.normalize's numbers travel inside the model.
            "mean": [0.0] * self.channels, "std": [1.0] * self.channels,
            "normalization_inside_model": self.normalization,
            "pretrained_weights_expected": self.pretrained,
            "class_names": list(self.class_names),
        }


def preprocessing_of(cfg: Config, meta: CheckpointMeta) -> Preprocessing:
    """The preprocessing a checkpoint's model was trained with (its meta.json and dataset).

    Raises:
        DataError: an older checkpoint that did not record its inputs, whose dataset is not at hand.
    """
    if meta.inputs:
        shape, class_names = meta.inputs["shape"], meta.inputs["class_names"]
    else:
        # Checkpoints written before ptft recorded their inputs: the dataset itself says.
        try:
            data = build_data(cfg.data, "cpu")
        except DataError as exc:
            raise DataError(f"this checkpoint does not record its input shape, so its dataset is needed: {exc}") \
                from None
        shape, class_names = data.input_shape, data.class_names
    channels, height, width = shape
    # cfg is the checkpoint's config as trained: one written before data.resize existed reads as stretch.
    return Preprocessing(channels, height, width, tuple(class_names), cfg.data.resize,
                         DATASETS.meta(cfg.data.name).get("pixel_levels"), recorded_normalization(meta),
                         (meta.parent or {}).get("expects"), (meta.inputs or {}).get("pixel_rules", 1),
                         _decoded_size(meta))


def _decoded_size(meta: CheckpointMeta) -> tuple[int, int] | None:
    size = (meta.inputs or {}).get("decoded_size")
    return tuple(size) if size else None
