"""The imagefolder dataset: a user's own image files, decoded once into one uint8 tensor."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image, PngImagePlugin, TiffImagePlugin

from conftest import REPO, tiny_finetune_config, tiny_pretrain_config, write_yaml
from ptft.data import DATASETS
from ptft.errors import DataError


def save_image(path: Path, value: int, size: tuple[int, int] = (8, 8), mode: str = "L") -> None:
    """A flat image of `value` (grey, or value in the red channel only for RGB)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "L":
        pixels = np.full((size[1], size[0]), value, dtype=np.uint8)
    else:
        pixels = np.zeros((size[1], size[0], 3), dtype=np.uint8)
        pixels[..., 0] = value
    Image.fromarray(pixels, mode).save(path)


def truncate(path: Path) -> None:
    """Cut the end off a small PNG: its header still reads, its pixels do not."""
    data = path.read_bytes()
    path.write_bytes(data[:-24])  # the 12-byte IEND chunk and the end of the pixel data


def image_tree(root: Path, per_class: int = 10, test_per_class: int = 2, unlabelled: int = 3) -> Path:
    """Classes 'cat' (pixels 10 + i) and 'dog' (pixels 100 + i), a test split and unlabelled images."""
    for name, base in [("cat", 10), ("dog", 100)]:
        for i in range(per_class):
            save_image(root / "train" / name / f"{i:02d}.png", base + i)
        for i in range(test_per_class):
            save_image(root / "test" / name / f"t{i}.png", base + 50 + i)
    for i in range(unlabelled):
        save_image(root / "unlabelled" / "batch1" / f"u{i}.jpg", 200 + i)  # any depth, any image suffix
    return root


def load(root: Path, image_size: int | None = None):
    return DATASETS.get("imagefolder")(root, False, image_size=image_size)


def test_classes_labels_splits_and_unlabelled_images(tmp_path):
    data = load(image_tree(tmp_path / "images"))
    assert data.class_names == ["cat", "dog"] and data.num_classes == 2
    assert data.train_x.dtype == torch.uint8 and data.train_x.shape == (20, 1, 8, 8)
    assert data.train_y.tolist() == [0] * 10 + [1] * 10
    # Each image is flat: its first pixel says which file it came from.
    assert data.train_x[:, 0, 0, 0].tolist() == [*range(10, 20), *range(100, 110)]
    assert data.test_x[:, 0, 0, 0].tolist() == [60, 61, 150, 151] and data.test_y.tolist() == [0, 0, 1, 1]
    assert data.unlabelled_x.shape == (3, 1, 8, 8)
    assert (data.unlabelled_x[:, 0, 0, 0].int() - torch.tensor([200, 201, 202])).abs().max() <= 2  # jpeg


def test_without_a_test_folder_a_fixed_stratified_fifth_is_the_test_split(tmp_path):
    root = image_tree(tmp_path / "images", test_per_class=0, unlabelled=0)
    first, again = load(root), load(root)
    assert len(first.train_x) == 16 and first.test_y.tolist() == [0, 0, 1, 1] and first.unlabelled_x is None
    assert torch.equal(first.test_x, again.test_x)  # fixed, whatever the run seed
    seen = set(first.train_x[:, 0, 0, 0].tolist()) | set(first.test_x[:, 0, 0, 0].tolist())
    assert seen == {*range(10, 20), *range(100, 110)}


def test_colour_anywhere_makes_every_image_rgb(tmp_path):
    root = image_tree(tmp_path / "images", unlabelled=0)
    save_image(root / "train" / "cat" / "red.png", 77, mode="RGB")
    data = load(root)
    assert data.train_x.shape[1:] == (3, 8, 8)
    red = data.train_x[data.train_x[:, 0, 0, 0] == 77]
    assert red.shape[0] == 1 and red[0, 1:].max() == 0  # red only in the red channel
    grey = data.train_x[0]
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])


def test_mixed_sizes_need_image_size_which_resizes_them_all(tmp_path):
    root = image_tree(tmp_path / "images", unlabelled=0)
    save_image(root / "train" / "dog" / "big.png", 120, size=(16, 12))
    with pytest.raises(DataError, match=r"data.image_size: images in .* differ in size .*is 8x8.*is 16x12"):
        load(root)
    data = load(root, image_size=6)
    assert data.train_x.shape == (21, 1, 6, 6) and data.test_x.shape == (4, 1, 6, 6)
    assert (data.train_x[:, 0, 0, 0] == 120).sum() == 1  # a flat image stays flat when resized


@pytest.mark.parametrize("make, message", [
    (lambda root: root.mkdir(), r"no 'train' folder in .*imagefolder expects train/<class>/<image>"),
    (lambda root: (root / "train").mkdir(parents=True), r"no class folders in .*train"),
    (lambda root: (image_tree(root), (root / "train" / "emu").mkdir()), r"no images in .*emu"),
    (lambda root: (image_tree(root), save_image(root / "test" / "emu" / "0.png", 1)),
     r"class folder\(s\) emu in .*test.* are not in .*train.*classes: cat, dog"),
    (lambda root: (image_tree(root), (root / "train" / "cat" / "bad.png").write_bytes(b"not a png")),
     r"cannot read image .*bad\.png"),
    (lambda root: (image_tree(root), truncate(root / "train" / "dog" / "03.png")),
     r"cannot read image .*03\.png' \(image file is truncated\)"),
])
def test_a_broken_tree_is_one_data_error_naming_the_path(tmp_path, make, message):
    make(tmp_path / "images")
    with pytest.raises(DataError, match=rf"^data.root: {message}"):
        load(tmp_path / "images")


def test_imagefolder_refuses_download_and_other_datasets_refuse_image_size(tmp_path, ptft):
    with pytest.raises(DataError, match="data.download: imagefolder .*cannot download"):
        DATASETS.get("imagefolder")(tmp_path, True)
    config = write_yaml(tmp_path / "c.yaml", tiny_pretrain_config(tmp_path / "run", data={"image_size": 8}))
    result = ptft("pretrain", config)
    assert result.code == 2 and "data.image_size: only imagefolder resizes images; digits" in result.stderr
    assert not (tmp_path / "run").exists()


def test_pretrain_then_finetune_on_a_folder_of_images_decoded_once(tmp_path, ptft):
    root = image_tree(tmp_path / "images", per_class=12, unlabelled=4)
    data = {"name": "imagefolder", "root": str(root), "batch_size": 8, "val_fraction": 0.25,
            "cache_dir": str(tmp_path / "cache")}
    pre = write_yaml(tmp_path / "pre.yaml", tiny_pretrain_config(tmp_path / "pre", data=data))
    pretrained = ptft("pretrain", pre)
    assert pretrained.code == 0 and "decoded 32 files in" in pretrained.stderr
    meta = json.loads((tmp_path / "pre" / "checkpoints" / "last" / "meta.json").read_text())
    assert meta["data"]["dataset"] == "imagefolder" and meta["data"]["val_size"] == 6
    fine = write_yaml(tmp_path / "fine.yaml", tiny_finetune_config(
        tmp_path / "fine", str(tmp_path / "pre"), data={**data, "labels_per_class": 3, "batch_size": 6}))
    finetuned = ptft("finetune", fine)
    evaluated = ptft("evaluate", finetuned.last_line)
    # Decoded once: the later stages map the cache.
    for later in (finetuned, evaluated):
        assert later.code == 0 and "mapped cache" in later.stderr and "decoded" not in later.stderr
    metrics = json.loads(evaluated.last_line)
    assert metrics["num_examples"] == 4 and metrics["dataset"] == "imagefolder"
    assert list(metrics["per_class"]) == ["cat", "dog"]  # the folder names


def test_shipped_imagefolder_configs_run_on_a_folder_of_colour_images(tmp_path, ptft):
    root = image_tree(tmp_path / "images", per_class=14, unlabelled=2)
    save_image(root / "unlabelled" / "photo.png", 90, size=(20, 12), mode="RGB")  # colour, another size
    shared = [f"data.root={root}", "data.image_size=16", "train.epochs=null", "train.max_steps=4",
              "train.eval_every_steps=2"]
    pretrained = ptft("pretrain", REPO / "configs" / "imagefolder_ae.yaml", *shared, f"run.dir={tmp_path / 'ae'}")
    assert pretrained.code == 0, pretrained.stderr
    meta = json.loads((tmp_path / "ae" / "checkpoints" / "last" / "meta.json").read_text())
    assert meta["data"]["dataset"] == "imagefolder"
    finetuned = ptft("finetune", REPO / "configs" / "imagefolder_finetune.yaml", *shared, "data.batch_size=10",
                     f"init.checkpoint={tmp_path / 'ae'}", f"run.dir={tmp_path / 'fine'}")
    assert finetuned.code == 0, finetuned.stderr
    saved = yaml.safe_load((tmp_path / "fine" / "config.yaml").read_text())
    assert saved["objective"]["flip"] is True and saved["data"]["image_size"] == 16
    metrics = json.loads(ptft("evaluate", finetuned.last_line).last_line)
    assert metrics["num_examples"] == 4 and list(metrics["per_class"]) == ["cat", "dog"]


# ---- what a pixel of each PIL mode means in 0..255 -----------------------------------------------

def decoded(root: Path, image: Image.Image, suffix: str = ".png", **save_options) -> torch.Tensor:
    """The uint8 pixels (C, W) of row 0 that imagefolder makes of `image`, saved alone in a one-class folder."""
    path = root / "train" / "a" / f"image{suffix}"
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **save_options)
    data = load(root)
    assert data.train_x.dtype == torch.uint8
    return data.train_x[0, :, 0, :]


def row_image(mode: str, values: list) -> Image.Image:
    """A one-row image of `mode` holding `values` (numbers, or tuples of band values)."""
    image = Image.new(mode, (len(values), 1))
    image.putdata(values)
    return image


def tiff_tags(low: int | None, high: int) -> TiffImagePlugin.ImageFileDirectory_v2:
    tags = TiffImagePlugin.ImageFileDirectory_v2()
    if low is not None:
        tags[280] = low  # MinSampleValue
    tags[281] = high  # MaxSampleValue
    return tags


SIXTEEN_BIT = [0, 128, 129, 1000, 32896, 65535]
SIXTEEN_BIT_AS_UINT8 = [0, 0, 1, 4, 128, 255]  # round(v * 255 / 65535): 128 -> 0.498, 129 -> 0.502, 1000 -> 3.89


@pytest.mark.parametrize("dtype, suffix", [("<u2", ".png"), ("<u2", ".tif"), (">u2", ".tif")])
def test_16_bit_images_are_scaled_to_the_nearest_8_bit_value_not_clipped(tmp_path, dtype, suffix):
    image = Image.fromarray(np.array([SIXTEEN_BIT], dtype=dtype))
    assert image.mode == ("I;16B" if dtype == ">u2" else "I;16")
    assert decoded(tmp_path, image, suffix).tolist() == [SIXTEEN_BIT_AS_UINT8]


def test_16_bit_png_that_older_pillow_opens_as_32_bit_is_scaled_the_same(tmp_path, monkeypatch):
    # Pillow before 10 opened 16-bit grey PNGs as mode "I"; this is its table entry.
    monkeypatch.setitem(PngImagePlugin._MODES, (16, 0), ("I", "I;16B"))
    path = tmp_path / "images" / "train" / "a" / "old.png"
    path.parent.mkdir(parents=True)
    Image.fromarray(np.array([SIXTEEN_BIT], dtype="<u2")).save(path)
    with Image.open(path) as reopened:
        assert reopened.mode == "I"
    assert load(tmp_path / "images").train_x[0, :, 0, :].tolist() == [SIXTEEN_BIT_AS_UINT8]


def test_integer_images_are_scaled_from_the_sample_range_their_tiff_declares(tmp_path):
    # Declared [1000, 5080]: (v - 1000) / 16, rounded half up.
    wide = Image.fromarray(np.array([[1000, 1008, 1023, 3040, 5080]], dtype=np.int32))
    assert wide.mode == "I"
    assert decoded(tmp_path / "i", wide, ".tif", tiffinfo=tiff_tags(1000, 5080)).tolist() == [[0, 1, 1, 128, 255]]
    # 12-bit samples in a 16-bit file declare 4095: 2048 * 255 / 4095 = 127.5 -> 128.
    twelve_bit = Image.fromarray(np.array([[0, 2047, 2048, 4095]], dtype="<u2"))
    assert decoded(tmp_path / "i16", twelve_bit, ".tif", tiffinfo=tiff_tags(None, 4095)).tolist() == [
        [0, 127, 128, 255]]


@pytest.mark.parametrize("values, tags, message", [
    ([0, 100, 70000], None, r"PIL mode I, 32-bit integer\) declares no value range"),
    ([0, 100, 5000], (0, 4095), r"PIL mode I, 32-bit integer\) has values outside its declared range "
                                r"\[0, 4095\] \(min 0, max 5000\)"),
])
def test_integer_images_without_a_usable_range_are_refused_naming_the_file(tmp_path, values, tags, message):
    image = Image.fromarray(np.array([values], dtype=np.int32))
    options = {"tiffinfo": tiff_tags(*tags)} if tags else {}
    with pytest.raises(DataError, match=rf"^data.root: '.*image\.tif' \({message}"):
        decoded(tmp_path, image, ".tif", **options)


def test_float_images_are_intensities_in_0_to_1(tmp_path):
    image = Image.fromarray(np.array([[0.0, 0.2, 0.5, 0.75, 1.0]], dtype=np.float32))
    assert image.mode == "F"
    assert decoded(tmp_path, image, ".tif").tolist() == [[0, 51, 128, 191, 255]]  # 127.5 -> 128, 191.25 -> 191


@pytest.mark.parametrize("bad, shown", [(1.5, "max 1.5"), (-0.25, "min -0.25"), (float("nan"), "not finite")])
def test_float_images_outside_0_to_1_are_refused_naming_the_file(tmp_path, bad, shown):
    image = Image.fromarray(np.array([[0.0, bad, 1.0]], dtype=np.float32))
    with pytest.raises(DataError, match=rf"^data.root: '.*image\.tif' \(PIL mode F, 32-bit float\) has values "
                                        rf"outside \[0, 1\] \(.*{re.escape(shown)}"):
        decoded(tmp_path, image, ".tif")


def palette_image() -> Image.Image:
    image = row_image("P", [0, 1, 2])
    image.putpalette([10, 20, 30, 40, 50, 60, 70, 80, 90])
    return image


# Transparency is composited over black: v * alpha / 255, rounded half up (200 * 128 / 255 = 100.4 -> 100).
ODD_MODES = [
    ("1", lambda: row_image("1", [0, 1]), {}, [[0, 255]]),
    ("LA", lambda: row_image("LA", [(200, 0), (200, 128), (200, 255)]), {}, [[0, 100, 200]]),
    ("L + transparent value", lambda: row_image("L", [10, 20, 30]), {"transparency": 20}, [[10, 0, 30]]),
    ("P", palette_image, {}, [[10, 40, 70], [20, 50, 80], [30, 60, 90]]),  # the palette expanded
    # Palette entry 1 is transparent, entry 2 half: 70 * 128 / 255 = 35.1, 80 -> 40.2, 90 -> 45.2.
    ("P + transparency", palette_image, {"transparency": bytes([255, 0, 128])}, [[10, 0, 35], [20, 0, 40],
                                                                                 [30, 0, 45]]),
    ("RGBA", lambda: row_image("RGBA", [(200, 100, 50, 0), (200, 100, 50, 128), (200, 100, 50, 255)]), {},
     [[0, 100, 200], [0, 50, 100], [0, 25, 50]]),
    # (255 - C) * (255 - K) / 255: (0, 128, 0, 64) -> 191, 127 * 191 / 255 = 95.1, 191.
    ("CMYK", lambda: row_image("CMYK", [(0, 0, 0, 0), (255, 0, 0, 0), (0, 0, 0, 255), (0, 128, 0, 64)]),
     {"suffix": ".tif"}, [[255, 0, 0, 191], [255, 255, 0, 95], [255, 255, 0, 191]]),
    # JPEG's YCbCr: R = Y + 1.402 (Cr - 128) = 254.05, G = Y - 0.344 (Cb - 128) - 0.714 (Cr - 128) = 0.1,
    # B = Y + 1.772 (Cb - 128) = -0.2 -> 0.
    ("YCbCr", lambda: row_image("YCbCr", [(128, 128, 128), (76, 85, 255)]), {"suffix": ".tif"},
     [[128, 254], [128, 0], [128, 0]]),
]


@pytest.mark.parametrize("name, make, options, expected", ODD_MODES, ids=[m[0] for m in ODD_MODES])
def test_each_pil_mode_decodes_to_the_pixels_it_shows(tmp_path, name, make, options, expected):
    options = dict(options)
    assert decoded(tmp_path, make(), options.pop("suffix", ".png"), **options).tolist() == expected


def test_grey_modes_of_any_depth_keep_a_grey_folder_grey_and_colour_makes_them_rgb(tmp_path):
    root = tmp_path / "images"

    def add(name: str, image: Image.Image) -> None:  # one image per class: the held-out fifth rounds to none
        (root / "train" / name).mkdir(parents=True)
        image.save(root / "train" / name / "image.png")

    add("a_1bit", row_image("1", [1, 0]))
    add("b_la", row_image("LA", [(200, 255), (200, 128)]))
    add("c_16bit", Image.fromarray(np.array([[65535, 32896]], dtype="<u2")))
    grey = load(root).train_x[:, :, 0, :]
    assert grey.shape == (3, 1, 2) and grey.tolist() == [[[255, 0]], [[200, 100]], [[255, 128]]]
    add("d_rgba", row_image("RGBA", [(0, 0, 255, 255), (0, 0, 255, 0)]))
    colour = load(root).train_x[:, :, 0, :]
    assert colour.shape == (4, 3, 2)
    assert colour[:3].tolist() == [[row] * 3 for [row] in grey.tolist()]  # grey replicated in R, G and B
    assert colour[3].tolist() == [[0, 0], [0, 0], [255, 0]]


def test_a_mode_without_a_known_meaning_is_refused_naming_the_file_and_mode(tmp_path):
    with pytest.raises(DataError, match=r"^data.root: '.*image\.tif' is a PIL mode LAB image"):
        decoded(tmp_path, Image.new("LAB", (2, 1)), ".tif")


def test_pretrain_refuses_a_float_image_outside_0_to_1_with_exit_2(tmp_path, ptft):
    root = image_tree(tmp_path / "images", unlabelled=0)
    bad = root / "train" / "dog" / "float.tif"
    Image.fromarray(np.full((8, 8), 3.0, dtype=np.float32)).save(bad)
    data = {"name": "imagefolder", "root": str(root), "batch_size": 8}
    config = write_yaml(tmp_path / "pre.yaml", tiny_pretrain_config(tmp_path / "pre", data=data))
    result = ptft("pretrain", config)
    assert result.code == 2 and "Traceback" not in result.stderr
    assert f"'{bad}' (PIL mode F, 32-bit float) has values outside [0, 1]" in result.stderr


def test_pretrain_on_16_bit_images_learns_from_their_pixels_not_saturated_ones(tmp_path, ptft):
    # Clipped to 255 every image would be the same white square and k-NN would be at chance.
    root = tmp_path / "images"
    for name, base in [("dim", 2000), ("bright", 40000)]:
        for i in range(10):
            path = root / "train" / name / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((8, 8), base + 1000 * i, dtype="<u2")).save(path)
    data = {"name": "imagefolder", "root": str(root), "batch_size": 8, "val_fraction": 0.2}
    config = write_yaml(tmp_path / "pre.yaml", tiny_pretrain_config(tmp_path / "pre", data=data))
    pretrained = ptft("pretrain", config)
    assert pretrained.code == 0, pretrained.stderr
    metrics = json.loads(ptft("evaluate", pretrained.last_line).last_line)
    assert metrics["knn_accuracy"] == 1.0


def test_an_image_larger_than_pil_allows_is_a_data_error_naming_it(tmp_path, monkeypatch):
    root = image_tree(tmp_path / "images", unlabelled=0)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # PIL refuses images over twice this as bombs
    with pytest.raises(DataError, match=r"^data.root: cannot read image '.*00\.png' \(Image size \(64 pixels\)"):
        load(root)


def test_pretrain_on_a_folder_too_small_for_its_val_fraction_exits_2_naming_it(tmp_path, ptft):
    # 4 images per class, one held out for test: 3 * 0.1 rounds to no validation image at all.
    root = image_tree(tmp_path / "images", per_class=4, test_per_class=0, unlabelled=0)
    data = {"name": "imagefolder", "root": str(root), "batch_size": 4, "val_fraction": 0.1}
    config = write_yaml(tmp_path / "pre.yaml", tiny_pretrain_config(tmp_path / "pre", data=data))
    result = ptft("pretrain", config)
    assert result.code == 2 and "Traceback" not in result.stderr
    assert "data.val_fraction: 0.1 takes no validation examples from imagefolder's 6 training examples" in result.stderr
    assert "set data.val_fraction to at least 0.17" in result.stderr


# ---- decoding on every core, once per file ---------------------------------------------------------

def mixed_tree(root: Path) -> Path:
    """Grey, colour, 16-bit and alpha images of two sizes: every decoding rule in one folder."""
    image_tree(root, per_class=6, unlabelled=2)
    save_image(root / "train" / "cat" / "red.png", 77, size=(12, 8), mode="RGB")
    Image.fromarray(np.full((8, 8), 40000, dtype="<u2")).save(root / "train" / "dog" / "wide.png")
    row_image("RGBA", [(200, 100, 50, 128)] * 64).resize((8, 8)).save(root / "test" / "dog" / "alpha.png")
    return root


def test_a_pool_of_processes_decodes_the_same_pixels_as_one_process(tmp_path):
    from ptft.data import sources
    from ptft.data.decoding import DecodeOptions, decode_files

    root = mixed_tree(tmp_path / "images")
    files = sources._image_paths(root)
    options = DecodeOptions(image_size=6)
    alone, pooled = decode_files(files, options, workers=0), decode_files(files, options, workers=2, chunk_files=3)
    assert alone.array().shape == (len(files), 3, 6, 6) and np.array_equal(alone.array(), pooled.array())
    # Both equal the pixel rules applied file by file (ptft.data.images.read_image).
    from ptft.data.images import read_image
    expected = np.stack([read_image(path, 3, (6, 6), "crop").transpose(2, 0, 1) for path in files])
    assert np.array_equal(alone.array(), expected)


def test_each_image_file_is_read_once(tmp_path, monkeypatch):
    root = image_tree(tmp_path / "images")
    read, real_read = [], Path.read_bytes
    opened, real_open = [], Image.open

    def counted_read(path):
        read.append(Path(path))
        return real_read(path)

    def counted_open(source, *args, **kwargs):
        opened.append(source)
        return real_open(source, *args, **kwargs)

    monkeypatch.setattr(Path, "read_bytes", counted_read)
    monkeypatch.setattr(Image, "open", counted_open)
    load(root)
    images = [path for path in read if path.suffix in (".png", ".jpg")]
    assert len(images) == len(set(images)) == 20 + 4 + 3
    assert not any(isinstance(source, (str, Path)) for source in opened)  # PIL decodes the bytes already read


def test_a_corrupt_file_decoded_by_the_pool_is_a_data_error_naming_it(tmp_path):
    from ptft.data import sources
    from ptft.data.decoding import DecodeOptions, decode_files

    root = image_tree(tmp_path / "images")
    truncate(root / "train" / "dog" / "03.png")
    with pytest.raises(DataError, match=r"^data.root: cannot read image '.*dog.03\.png' \(image file is truncated\)"):
        decode_files(sources._image_paths(root), DecodeOptions(), workers=2, chunk_files=4)


def test_skip_bad_files_trains_on_the_rest_and_lists_the_skipped_files_on_stderr(tmp_path, ptft):
    root = image_tree(tmp_path / "images", per_class=12)
    (root / "train" / "cat" / "bad.png").write_bytes(b"not a png")
    truncate(root / "train" / "dog" / "03.png")
    data = {"name": "imagefolder", "root": str(root), "batch_size": 8, "val_fraction": 0.25}
    config = write_yaml(tmp_path / "pre.yaml", tiny_pretrain_config(tmp_path / "pre", data=data))
    refused = ptft("pretrain", config)
    assert refused.code == 2 and "cannot read image" in refused.stderr and "bad.png" in refused.stderr
    skipped = ptft("pretrain", config, "data.skip_bad_files=true", "--overwrite")
    assert skipped.code == 0, skipped.stderr
    assert "skipped 2 unreadable image(s) (data.skip_bad_files)" in skipped.stderr
    assert str(root / "train" / "cat" / "bad.png") in skipped.stderr and "03.png" in skipped.stderr
    meta = json.loads((tmp_path / "pre" / "checkpoints" / "last" / "meta.json").read_text())
    assert meta["data"]["val_size"] == 6  # 11 readable images per class, a quarter of each for validation


def test_skipping_every_image_of_a_class_is_a_data_error_naming_the_class_folder(tmp_path):
    root = image_tree(tmp_path / "images", per_class=2, unlabelled=0)
    for path in (root / "train" / "cat").iterdir():
        path.write_bytes(b"broken")
    with pytest.raises(DataError, match=r"no readable images in '.*train.cat' \(2 skipped"):
        DATASETS.get("imagefolder")(root, False, skip_bad_files=True)


def test_decoding_is_reported_on_stderr_without_a_progress_bar_when_not_a_terminal(tmp_path, ptft):
    root = image_tree(tmp_path / "images")
    data = {"name": "imagefolder", "root": str(root), "batch_size": 8, "val_fraction": 0.25}
    config = write_yaml(tmp_path / "pre.yaml", tiny_pretrain_config(tmp_path / "pre", data=data))
    result = ptft("pretrain", config, "--dry-run")
    assert result.code == 0, result.stderr
    assert re.search(r"decoded 27 files in \d+\.\ds", result.stderr) and "files/s" not in result.stderr


# ---- data.resize: how a photo meets data.image_size ------------------------------------------------

def three_bands(path: Path) -> None:
    """A 24x8 grey image: black, mid-grey and white thirds, left to right."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.repeat(np.array([[0] * 8 + [128] * 8 + [255] * 8], dtype=np.uint8), 8, axis=0)).save(path)


def test_image_size_keeps_the_centre_by_default_and_stretch_keeps_the_whole_image(tmp_path):
    root = image_tree(tmp_path / "images", unlabelled=0)
    three_bands(root / "train" / "dog" / "wide.png")
    cropped, stretched = load(root, image_size=8), DATASETS.get("imagefolder")(root, False, image_size=8,
                                                                               resize="stretch")
    wide = [i for i, v in enumerate(cropped.train_x[:, 0, 0, 0].tolist()) if v == 128]
    assert len(wide) == 1  # the only image whose left edge is mid-grey once cropped
    assert cropped.train_x[wide[0], 0].unique().tolist() == [128]  # the centre square: the middle third
    row = stretched.train_x[wide[0], 0, 0].tolist()  # the same file: decoding order does not depend on resize
    assert row[0] == 0 and row[-1] == 255 and 0 < row[3] < 255  # all three thirds, squeezed


def test_resize_crop_is_torchvisions_resize_of_the_shorter_side_then_centre_crop(tmp_path):
    tvf = pytest.importorskip("torchvision.transforms.v2.functional")
    from ptft.data.images import read_image

    path = tmp_path / "photo.png"
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 48, 3), dtype=np.uint8))  # W 48, H 30
    photo.save(path)
    # Shorter side 30 -> 10 makes it 16 wide; the centre 10 columns start at 3.
    expected = np.asarray(tvf.center_crop(tvf.resize(photo, 10, interpolation=tvf.InterpolationMode.BILINEAR), 10))
    got = read_image(path, 3, (10, 10), "crop")
    assert got.shape == (10, 10, 3) and np.abs(got.astype(int) - expected.astype(int)).max() <= 1


def test_an_unknown_resize_rule_is_refused_by_config_validation(tmp_path, ptft):
    config = write_yaml(tmp_path / "c.yaml", tiny_pretrain_config(tmp_path / "run", data={"resize": "fit"}))
    result = ptft("config", config)
    assert result.code == 2 and "data.resize" in result.stderr and "expected one of 'crop', 'stretch'" in result.stderr


def test_evaluate_of_a_folder_too_small_for_a_test_split_exits_2_naming_the_split(tmp_path, ptft):
    root = tmp_path / "images"
    for name in ("a", "b"):
        (root / "train" / name).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((8, 8), 60 * i + (100 if name == "b" else 0), dtype=np.uint8), mode="L").save(
                root / "train" / name / f"{i}.png")
    cfg = tiny_pretrain_config(tmp_path / "run", data={"name": "imagefolder", "root": str(root), "batch_size": 2,
                                                       "val_fraction": 0.5}, train={"max_steps": 2})
    assert ptft("pretrain", write_yaml(tmp_path / "c.yaml", cfg)).code == 0
    result = ptft("evaluate", tmp_path / "run")
    assert result.code == 2, result.stderr
    assert "test split" in result.stderr and "--split val" in result.stderr and "Traceback" not in result.stderr
