"""The imagefolder dataset: a user's own image files, decoded once into one uint8 tensor."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

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


def test_pretrain_then_finetune_on_a_folder_of_images(tmp_path, ptft):
    root = image_tree(tmp_path / "images", per_class=12, unlabelled=4)
    data = {"name": "imagefolder", "root": str(root), "batch_size": 8, "val_fraction": 0.25}
    pre = write_yaml(tmp_path / "pre.yaml", tiny_pretrain_config(tmp_path / "pre", data=data))
    assert ptft("pretrain", pre).code == 0
    meta = json.loads((tmp_path / "pre" / "checkpoints" / "last" / "meta.json").read_text())
    assert meta["data"]["dataset"] == "imagefolder" and meta["data"]["val_size"] == 6
    fine = write_yaml(tmp_path / "fine.yaml", tiny_finetune_config(
        tmp_path / "fine", str(tmp_path / "pre"), data={**data, "labels_per_class": 3, "batch_size": 6}))
    best = ptft("finetune", fine).last_line
    metrics = json.loads(ptft("evaluate", best).last_line)
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
