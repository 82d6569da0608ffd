"""Image files of any PIL mode as uint8 grey or RGB pixels: what a pixel of each mode means in 0..255.

PIL's `convert("L")` clips 16-bit, 32-bit and float images at 255 and drops alpha, so a folder of
16-bit scans would train on white squares. Every image ptft reads from a user's files goes through
`read_image`, with these rules:

- 8-bit modes ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr"): PIL's conversion. "1" is 0 or 255,
  a palette is expanded, CMYK becomes (255 - C) * (255 - K) / 255, YCbCr is JPEG's full-range YCbCr.
- Transparency (the alpha of "LA", "PA", "RGBA"; a transparent palette entry or colour) is composited
  over black: every band becomes v * alpha / 255, rounded half up. A transparent pixel is 0 whatever
  colour it hides (editors leave anything there); an opaque image is unchanged.
- Integer samples wider than 8 bits ("I;16", "I;16B", ..., "I") map linearly from their range [lo, hi]
  to the nearest uint8, round((v - lo) * 255 / (hi - lo)). The range is the one the file declares
  (TIFF MinSampleValue / MaxSampleValue: 12-bit data in a 16-bit TIFF declares 4095), else the bit
  depth: [0, 65535] for 16-bit, where this is the exact inverse of the usual 8- to 16-bit expansion
  (k * 257 -> k). A 32-bit image ("I") has no bit depth worth scaling by (its values are counts,
  depths or labels), so it is refused unless its file declares a range.
- Float samples ("F") are intensities in [0, 1]: round(v * 255), half up.

Values outside the range (or not finite) are a DataError naming the file and its mode, never
saturated pixels; so is a mode with no meaning here (e.g. "LAB").

Sizes: after the 8-bit conversion, an image is fitted to the size asked for by `fit` (crop the
centre, or stretch), bilinearly. A JPEG larger than that is first decoded at the smallest DCT
scale (1/2, 1/4 or 1/8, PIL's `draft` rule) that still covers the size: a 4000 x 3000 photo bound
for 224 px decodes at 500 x 375, several times faster, and is then fitted the same way.

JPEGs are decoded by simplejpeg when it is installed (`pip install 'ptft[jpeg]'`, data.decoder):
the same libjpeg-turbo, DCT method and chroma upsampling as PIL's, so bitwise the same pixels,
without PIL's per-image overhead. CMYK JPEGs, decompression bombs and anything simplejpeg
refuses go to PIL, which decodes or names the problem as before.
"""

from __future__ import annotations

import functools
import importlib.util
import io
from pathlib import Path

import numpy as np
from PIL import Image

from ptft.errors import DataError

GREY_MODES = ("1", "L", "LA", "I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # one colour channel
COLOUR_MODES = ("P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr")
WIDE_MODES = {"I;16": "16-bit integer", "I;16L": "16-bit integer", "I;16B": "16-bit integer",
              "I;16N": "16-bit integer", "I": "32-bit integer", "F": "32-bit float"}
ALPHA_MODES = ("LA", "PA", "RGBA")
TIFF_MIN_SAMPLE_VALUE, TIFF_MAX_SAMPLE_VALUE = 280, 281  # TIFF tags: the range a file's samples span
SIXTEEN_BIT_MAX = 65535
# How an image is fitted to data.image_size: see `fit`.
RESIZE_RULES = ("crop", "stretch")
# Bumped whenever a rule here changes what a file decodes to: decode caches keyed by it go stale,
# and checkpoints record it (meta.json inputs.pixel_rules) so predict decodes files as training did.
# 2: JPEGs decoded at a DCT scale before fitting.
RULES_VERSION = 2
DCT_SCALING_SINCE = 2  # the first RULES_VERSION that decodes JPEGs at a DCT scale
DECODERS = ("auto", "pil", "simplejpeg")  # data.decoder; auto: simplejpeg for JPEGs where installed
JPEG_EXTRA = "pip install 'ptft[jpeg]'"
JPEG_MAGIC = b"\xff\xd8\xff"
SIMPLEJPEG_COLOURS = {"Gray": "GRAY", "YCbCr": "RGB"}  # JPEG colour space -> what simplejpeg decodes it to


def channels_of(path: Path, mode: str) -> int:
    """1 for a grey PIL mode, 3 for a colour one.

    Raises:
        DataError: a mode whose pixels ptft cannot interpret (the message names the file).
    """
    if mode in GREY_MODES:
        return 1
    if mode in COLOUR_MODES:
        return 3
    raise DataError(f"data.root: '{path}' is a PIL mode {mode} image, which ptft cannot turn into grey or RGB "
                    f"pixels (it reads modes {', '.join(GREY_MODES + COLOUR_MODES)}); save it as RGB")


@functools.cache
def simplejpeg_installed() -> bool:
    return importlib.util.find_spec("simplejpeg") is not None


def read_image(path: Path, channels: int | None, size: tuple[int, int] | None,
               resize: str = "stretch", *, decoder: str = "auto", rules_version: int = RULES_VERSION) -> np.ndarray:
    """One image file as uint8 pixels (H, W, channels), read once, fitted to `size` (W, H) by `resize`.

    Grey images are replicated into RGB; colour ones become grey by PIL's luma (convert("L")).
    `channels` None keeps the image's own (1 for a grey mode, 3 for a colour one); `size` None
    keeps its size. `resize` is one of RESIZE_RULES (see `fit`). `decoder` is one of DECODERS;
    `rules_version` the RULES_VERSION to decode by (a checkpoint's, for predict): before
    DCT_SCALING_SINCE a JPEG is decoded at full size.

    Raises:
        DataError: an unknown mode, or values outside the image's range (the message names the file).
        OSError: a file PIL cannot decode.
    """
    scaled_to = size if rules_version >= DCT_SCALING_SINCE else None
    with _opened(path, scaled_to, decoder) as image:
        own_channels = channels_of(path, image.mode)
        pixels, wanted = _eight_bit(image, path), "L" if (channels or own_channels) == 1 else "RGB"
        if pixels.mode != wanted:  # _eight_bit's image is already a copy: converting to its own mode copies again
            pixels = pixels.convert(wanted)
    # After the 8-bit conversion, so wide samples are scaled once, exactly, before interpolation.
    pixels = fit(pixels, size, resize)
    width, height = pixels.size
    return np.asarray(pixels).reshape(height, width, len(pixels.getbands()))


def _opened(path: Path, scaled_to: tuple[int, int] | None, decoder: str) -> Image.Image:
    """The file as a PIL image: a JPEG decoded by simplejpeg where it can, else opened (lazily) by PIL;
    a JPEG at the smallest DCT scale still covering `scaled_to` (W, H) when it is given."""
    data = Path(path).read_bytes()
    if decoder != "pil" and data[:3] == JPEG_MAGIC and simplejpeg_installed():
        pixels = _simplejpeg_pixels(data, scaled_to)
        if pixels is not None:
            return Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels)
    image = Image.open(io.BytesIO(data))
    if scaled_to is not None and image.format == "JPEG":
        image.draft(None, scaled_to)
    return image


def dct_scale(width: int, height: int, size: tuple[int, int] | None) -> int:
    """PIL draft's DCT scale for a `width` x `height` JPEG bound for `size` (W, H): the largest of 8, 4, 2
    and 1 that leaves it at least `size` in both sides (1 without a size)."""
    if size is None:
        return 1
    fits = min(width // size[0], height // size[1])
    return next((scale for scale in (8, 4, 2) if fits >= scale), 1)


def _simplejpeg_pixels(data: bytes, scaled_to: tuple[int, int] | None) -> np.ndarray | None:
    """(H, W, 1 or 3) uint8 of a grey or YCbCr JPEG at PIL draft's scale, or None for PIL to decode it."""
    import simplejpeg

    try:
        height, width, colour, _ = simplejpeg.decode_jpeg_header(data)
        if colour not in SIMPLEJPEG_COLOURS or width * height > Image.MAX_IMAGE_PIXELS:
            return None  # CMYK / YCCK, or a size PIL warns about or refuses: its rules apply
        scale = dct_scale(width, height, scaled_to)
        # libjpeg's scaled size is ceil(side / scale): asking for exactly that picks PIL's scale.
        return simplejpeg.decode_jpeg(data, SIMPLEJPEG_COLOURS[colour], min_height=-(-height // scale),
                                      min_width=-(-width // scale))
    except ValueError:  # a file simplejpeg refuses (damaged, unusual): PIL decodes it or names the problem
        return None


def fit(pixels: Image.Image, size: tuple[int, int] | None, resize: str) -> Image.Image:
    """`pixels` resampled bilinearly to `size` (W, H); None or the same size leaves them as they are.

    stretch: the whole image, its aspect ratio ignored. crop: the largest centred region of
    `size`'s aspect ratio, which is what resizing the shorter side and cropping the centre
    keeps, resampled in one pass (no rounding of an intermediate size).
    """
    if size is None or pixels.size == tuple(size):
        return pixels
    if resize not in RESIZE_RULES:
        raise ValueError(f"resize must be one of {', '.join(RESIZE_RULES)}, got {resize!r}")
    box = _centre_box(pixels.size, size) if resize == "crop" else None
    return pixels.resize(tuple(size), Image.Resampling.BILINEAR, box=box)


def _centre_box(source: tuple[int, int], target: tuple[int, int]) -> tuple[float, float, float, float]:
    (width, height), (target_width, target_height) = source, target
    scale = min(width / target_width, height / target_height)  # source pixels per target pixel
    crop_width, crop_height = target_width * scale, target_height * scale
    left, top = (width - crop_width) / 2, (height - crop_height) / 2
    return left, top, left + crop_width, top + crop_height


def _eight_bit(image: Image.Image, path: Path) -> Image.Image:
    """`image` as an 8-bit PIL image without alpha (grey stays grey, colour stays colour)."""
    if image.mode in WIDE_MODES:
        return _scaled_to_eight_bits(image, path)
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        return _composited_over_black(image)
    return image.convert("L" if image.mode in GREY_MODES else "RGB")


def _composited_over_black(image: Image.Image) -> Image.Image:
    grey = image.mode in GREY_MODES
    # convert() turns a transparent palette entry or colour into alpha: (H, W, bands + 1).
    bands = np.asarray(image.convert("LA" if grey else "RGBA"), dtype=np.uint32)
    colour, alpha = bands[..., :-1], bands[..., -1:]
    # v * alpha / 255 rounded half up, in integers: floor((2 v alpha + 255) / 510).
    over_black = ((2 * colour * alpha + 255) // 510).astype(np.uint8)
    return Image.fromarray(over_black[..., 0] if grey else over_black)


def _scaled_to_eight_bits(image: Image.Image, path: Path) -> Image.Image:
    values = np.asarray(image).astype(np.float64)  # (H, W); exact for every 32-bit integer
    low, high, range_name = _sample_range(image, path)
    if not np.isfinite(values).all():
        found = "some are not finite"
    elif values.min() < low or values.max() > high:
        found = f"min {_number(values.min())}, max {_number(values.max())}"
    else:
        # The product first: (v - lo) * 255 is exact, so ties like 127.5 round up, not by float noise.
        return Image.fromarray(np.floor((values - low) * 255 / (high - low) + 0.5).astype(np.uint8))
    advice = ("ptft reads float images as intensities in [0, 1]: rescale them" if image.mode == "F"
              else "fix the file's range tags or rescale its values")
    raise DataError(f"data.root: {_described(image, path)} has values outside {range_name} ({found}); {advice}")


def _sample_range(image: Image.Image, path: Path) -> tuple[float, float, str]:
    """(lo, hi, how to name it) of a wide image's samples; see the module docstring."""
    if image.mode == "F":
        return 0.0, 1.0, "[0, 1]"
    tags = getattr(image, "tag_v2", None)  # TIFF files only
    if tags is not None and TIFF_MAX_SAMPLE_VALUE in tags:
        low, high = _first(tags.get(TIFF_MIN_SAMPLE_VALUE, 0)), _first(tags[TIFF_MAX_SAMPLE_VALUE])
        if high <= low:
            raise DataError(f"data.root: {_described(image, path)} declares an empty value range [{low}, {high}] "
                            "(TIFF MinSampleValue / MaxSampleValue); fix the file's range tags")
        return low, high, f"its declared range [{low}, {high}]"
    # Pillow before 10 opens 16-bit grey PNGs as "I": PNG samples are never wider than 16 bits.
    if image.mode.startswith("I;16") or image.format == "PNG":
        return 0, SIXTEEN_BIT_MAX, f"the 16-bit range [0, {SIXTEEN_BIT_MAX}]"
    raise DataError(f"data.root: {_described(image, path)} declares no value range, so ptft cannot tell which "
                    "value is white; save it as 8- or 16-bit, as float in [0, 1], or as a TIFF with "
                    "MinSampleValue / MaxSampleValue tags")


def _described(image: Image.Image, path: Path) -> str:
    return f"'{path}' (PIL mode {image.mode}, {WIDE_MODES[image.mode]})"


def _first(tag_value) -> int | float:
    # A TIFF tag holds one value per sample; a grey image has one sample.
    return tag_value[0] if isinstance(tag_value, tuple) else tag_value


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)
