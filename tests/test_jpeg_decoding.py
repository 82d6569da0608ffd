"""JPEGs: simplejpeg gives PIL's pixels bitwise, large ones decode at a DCT scale, and predict follows the
rules a checkpoint was trained with (issue #15)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_finetune_config
from ptft.data import decoding, images, sources
from ptft.data.images import dct_scale, read_image
from ptft.errors import UserError

pytest.importorskip("simplejpeg")  # the dev extra installs it


def photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8: smooth gradients plus noise, like a photo's mix of flat and busy regions."""
    rng = np.random.default_rng(seed)
    ramp = np.add.outer(np.linspace(0, 160, height), np.linspace(0, 80, width))
    return (ramp[..., None] * [1.0, 0.7, 0.4] + rng.normal(0, 25, (height, width, 3))).clip(0, 255).astype(np.uint8)


def save_jpeg(path: Path, pixels: np.ndarray, mode: str = "RGB", **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, "RGB").convert(mode).save(path, "JPEG", **options)
    return path


JPEG_KINDS = {
    "baseline 4:2:0": dict(quality=90),
    "4:4:4": dict(quality=95, subsampling=0),
    "progressive": dict(progressive=True),
    "grey": dict(mode="L"),
    "cmyk (PIL's)": dict(mode="CMYK"),
}


@pytest.mark.parametrize("kind", JPEG_KINDS)
@pytest.mark.parametrize("size", [None, (32, 32), (24, 40)])
@pytest.mark.parametrize("resize", ["crop", "stretch"])
def test_simplejpeg_decodes_every_kind_of_jpeg_to_pils_pixels_bitwise(tmp_path, kind, size, resize):
    options = dict(JPEG_KINDS[kind])
    path = save_jpeg(tmp_path / "a.jpg", photo(301, 203), options.pop("mode", "RGB"), **options)  # odd sides
    assert dct_scale(301, 203, size) == (1 if size is None else {(32, 32): 4, (24, 40): 4}[size])
    for channels in (None, 1, 3):
        pil = read_image(path, channels, size, resize, decoder="pil")
        fast = read_image(path, channels, size, resize, decoder="simplejpeg")
        assert fast.dtype == np.uint8 and np.array_equal(fast, pil), channels


def test_a_large_jpeg_decodes_at_a_dct_scale_close_to_the_full_decode(tmp_path):
    path = save_jpeg(tmp_path / "big.jpg", photo(640, 480), quality=95)
    scaled = read_image(path, None, (32, 32), "crop")  # 1/8: decoded at 80 x 60
    full = read_image(path, None, (32, 32), "crop", rules_version=1)  # the rules before DCT scaling
    with Image.open(path) as image:
        image.draft(None, (32, 32))
        assert image.size == (80, 60)
    assert scaled.shape == full.shape == (32, 32, 3) and not np.array_equal(scaled, full)
    assert np.abs(scaled.astype(int) - full).mean() < 4  # the same picture, resampled another way
    small = save_jpeg(tmp_path / "small.jpg", photo(40, 30))
    assert np.array_equal(read_image(small, None, (32, 32), "crop"), read_image(small, None, (32, 32), "crop",
                                                                               rules_version=1))


def test_a_damaged_jpeg_is_named_alike_by_both_decoders(tmp_path):
    path = save_jpeg(tmp_path / "cut.jpg", photo(64, 48))
    path.write_bytes(path.read_bytes()[:300])
    (pil,) = decoding.decode_chunk([str(path)], (8, 8), "crop", "pil")
    (fast,) = decoding.decode_chunk([str(path)], (8, 8), "crop", "simplejpeg")
    assert isinstance(pil, str) and pil == fast and "cut.jpg" in pil


def test_decoder_simplejpeg_without_it_installed_names_the_extra(tmp_path, monkeypatch):
    save_jpeg(tmp_path / "images" / "train" / "a" / "0.jpg", photo(8, 8))
    monkeypatch.setattr(sources, "simplejpeg_installed", lambda: False)
    with pytest.raises(UserError, match=r"^data.decoder: simplejpeg is not installed; .*pip install 'ptft\[jpeg\]'"):
        sources.load_imagefolder(tmp_path / "images", decoder="simplejpeg", cache_dir=tmp_path / "cache")


def test_the_decoder_is_not_part_of_the_cache_key(tmp_path):
    # Both give the same pixels, so a cache written by one serves the other.
    pixels = decoding.DecodeOptions(8, decoder="pil").pixel_rules()
    assert pixels == decoding.DecodeOptions(8, decoder="simplejpeg").pixel_rules()
    assert pixels["rules_version"] == images.RULES_VERSION


def write_jpeg_folder(root: Path) -> Path:
    """Two classes of 64 x 48 JPEG photos, one brighter on the left, one on the right: fitted to 6 px, each
    decodes at a DCT scale of 1/8."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 24), ("test", 8)):
        for name, bright in (("left", slice(0, 32)), ("right", slice(32, 64))):
            for i in range(count):
                pixels = rng.integers(0, 180, (48, 64, 3), dtype=np.uint8)
                pixels[:, bright] += 60
                save_jpeg(root / split / name / f"{i:02d}.jpg", pixels, quality=90)
    return root


def test_predict_decodes_jpegs_by_the_rules_its_checkpoint_was_trained_with(tmp_path, ptft):
    from test_predict import records, train

    root = write_jpeg_folder(tmp_path / "photos")
    data = {"name": "imagefolder", "root": str(root), "image_size": 6, "labels_per_class": None,
            "batch_size": 16, "val_fraction": 0.25}
    run = tmp_path / "run"
    train("finetune", tiny_finetune_config(run, None, data=data, train={"max_steps": 10}))
    metas = sorted((run / "checkpoints").glob("step-*/meta.json"))
    assert {json.loads(m.read_text())["inputs"]["pixel_rules"] for m in metas} == {images.RULES_VERSION}

    def predicted(*args) -> list[tuple]:
        result = ptft("predict", run, *args)
        assert result.code == 0, result.stderr
        return [(r["pred"], r["prob"]) for r in records(result.stdout)]

    # The files, decoded for predict, are the split's images as training decoded them: the same outputs.
    current = predicted(root / "test")
    assert current == predicted("--split", "test")
    for meta_file in metas:  # as ptft wrote them before it recorded its pixel rules (full-size JPEG decodes)
        written = json.loads(meta_file.read_text())
        del written["inputs"]["pixel_rules"]
        meta_file.write_text(json.dumps(written))
    # Such a checkpoint was trained on full-size decodes, so predict decodes the files that way: other pixels.
    assert predicted(root / "test") != current


def test_the_config_offers_exactly_the_decoders_images_knows():
    import typing

    from ptft.config.schema import DataSection

    assert typing.get_args(DataSection.model_fields["decoder"].annotation) == images.DECODERS
