"""Image files -> the model's uint8 pixels, as imagefolder reads training images. No torch here.

Worker processes import only this module (and PIL, numpy), so a decoding pool starts in a
fraction of a second instead of paying for a torch import in every worker.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ptft.data.images import read_image
from ptft.errors import DataError


def decode_image(path: str, shape: tuple[int, int, int], resize: str, pixel_rules: int) -> np.ndarray:
    """One image file as uint8 pixels of `shape` (C, H, W): grey or RGB as the model needs, fitted to
    its size by `resize` (data.resize: crop or stretch, as training fitted imagefolder's images), by
    the `pixel_rules` (ptft.data.images.RULES_VERSION) its training images were decoded with.

    Raises:
        DataError: the file is missing, not an image, truncated or of pixels ptft cannot read
            (the message names it).
    """
    from PIL import Image

    channels, height, width = shape
    try:
        pixels = read_image(Path(path), channels, (width, height), resize, rules_version=pixel_rules)  # (H, W, C)
    except DataError as exc:
        # Its messages are written for training data: they start with the data.root key.
        raise DataError(str(exc).removeprefix("data.root: ")) from None
    except (OSError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read image '{path}' ({exc})") from None
    return pixels.transpose(2, 0, 1)


def decode_chunk(paths: list[str], shape: tuple[int, int, int], resize: str,
                 pixel_rules: int) -> tuple[np.ndarray, list[str | None]]:
    """Decode a chunk of files (in a worker process): (G, C, H, W) uint8 of the readable ones, and
    for each path the reason it could not be read, or None."""
    images, errors = [], []
    for path in paths:
        try:
            images.append(decode_image(path, shape, resize, pixel_rules))
            errors.append(None)
        except DataError as exc:
            errors.append(str(exc))
    return (np.stack(images) if images else np.empty((0, *shape), dtype=np.uint8)), errors
