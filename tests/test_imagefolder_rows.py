"""An image folder without test/: its held-out test split is rows of the one mapped decode cache, not a copy.

Issue #15: fancy-indexing the mapped cache into train and test copied it into private memory, so
data.placement host bounded nothing for that (common) layout. The expected values below are computed
with the old, copying code path written out inline.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_finetune_config, tiny_pretrain_config, write_yaml
from ptft.config.schema import DataSection
from ptft.data import DATASETS, build_data, cache, fingerprint, sources
from ptft.data.batches import DeviceBatches
from ptft.data.placement import HostRows
from ptft.data.splits import train_val_split
from ptft.data.tensors import DatasetTensors

SPLIT_NAMES = ("unlabelled", "labelled", "val", "test")


def folder_without_test(root: Path, per_class: int = 10, unlabelled: int = 0) -> Path:
    """Grey 6x6 noise images in classes a, b, c under root/train/ (seeded), optional unlabelled/, no test/."""
    rng = np.random.default_rng(0)
    for name in "abc":
        (root / "train" / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (6, 6), dtype=np.uint8)).save(root / "train" / name / f"{i}.png")
    for i in range(unlabelled):
        (root / "unlabelled").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (6, 6), dtype=np.uint8)).save(root / "unlabelled" / f"u{i}.png")
    return root


@pytest.fixture
def mapped(monkeypatch) -> list[np.ndarray]:
    """The arrays the decode cache hands to load_imagefolder, in call order."""
    seen = []
    real = sources.cached_decode

    def recording(*args, **kwargs):
        folder = real(*args, **kwargs)
        seen.append(folder.images)
        return folder

    monkeypatch.setattr(sources, "cached_decode", recording)
    return seen


def old_dataset(images: np.ndarray, train_y: torch.Tensor, n_unlabelled: int) -> DatasetTensors:
    """What load_imagefolder returned before issue #15: the held-out split carved out by copying."""
    x = torch.from_numpy(np.array(images))  # (K, C, H, W) uint8, a private copy
    n_train = len(train_y)
    train_idx, test_idx = train_val_split(train_y, sources.HELD_OUT_TEST_FRACTION, sources.HELD_OUT_TEST_SEED)
    return DatasetTensors(x[:n_train][train_idx], train_y[train_idx], x[:n_train][test_idx], train_y[test_idx],
                          num_classes=3, class_names=list("abc"),
                          unlabelled_x=x[n_train:] if n_unlabelled else None)


def old_content_sha256(x: torch.Tensor, y: torch.Tensor) -> str:
    """The content hash as ptft computed it before issue #15: the whole contiguous train split at once."""
    digest = hashlib.sha256(f"{x.dtype}:{tuple(x.shape)}:{y.dtype}:{tuple(y.shape)}".encode())
    digest.update(x.contiguous().numpy().tobytes())
    digest.update(y.contiguous().numpy().astype("<i8").tobytes())
    return digest.hexdigest()


def data_section(root: Path, cache: Path, placement: str) -> DataSection:
    return DataSection(name="imagefolder", root=str(root), cache_dir=str(cache), placement=placement, batch_size=4,
                       labels_per_class=3, normalize="dataset")


def load(root: Path, cache: Path) -> DatasetTensors:
    return DATASETS.get("imagefolder")(root, False, cache_dir=str(cache))


def test_a_folder_without_test_holds_out_rows_of_the_one_mapped_array(tmp_path, mapped):
    root = folder_without_test(tmp_path / "images")
    load(root, tmp_path / "cache")  # decodes and writes the cache
    data = load(root, tmp_path / "cache")  # maps it
    cache = mapped[-1]
    assert isinstance(cache, np.memmap)
    # train and test are row numbers into the mapping itself, not arrays of their own.
    assert np.shares_memory(data.train_array.numpy(), cache) and np.shares_memory(data.test_array.numpy(), cache)
    assert len(data.train_rows) == 24 and len(data.test_rows) == 6
    assert sorted(torch.cat([data.train_rows, data.test_rows]).tolist()) == list(range(30))
    # What reading them gives is what the copying loader gave.
    old = old_dataset(cache, torch.arange(30) // 10, 0)
    assert torch.equal(data.train_x, old.train_x) and torch.equal(data.test_x, old.test_x)
    assert torch.equal(data.train_y, old.train_y) and torch.equal(data.test_y, old.test_y)


def test_host_placement_of_a_folder_without_test_keeps_every_split_in_the_mapping(tmp_path, mapped):
    root = folder_without_test(tmp_path / "images")
    load(root, tmp_path / "cache")
    bundle = build_data(data_section(root, tmp_path / "cache", "host"), "cpu")
    cache = mapped[-1]
    for name in SPLIT_NAMES:
        x = getattr(bundle, name).x
        assert isinstance(x, HostRows) and np.shares_memory(x.parts[0].numpy(), cache), name


@pytest.mark.parametrize("unlabelled", [0, 5])
def test_splits_fingerprint_statistics_and_batches_equal_the_copying_loaders(tmp_path, mapped, monkeypatch,
                                                                             unlabelled):
    root = folder_without_test(tmp_path / "images", unlabelled=unlabelled)
    load(root, tmp_path / "cache")
    monkeypatch.setattr(fingerprint, "BYTES_PER_CHUNK", 100)  # the content hash read in chunks of 2 images
    new = {placement: build_data(data_section(root, tmp_path / "cache", placement), "cpu")
           for placement in ("host", "device")}
    old_tensors = old_dataset(mapped[-1], torch.arange(30) // 10, unlabelled)
    monkeypatch.setattr(DATASETS, "get", lambda name: lambda root, download, **options: old_tensors)
    old = build_data(data_section(root, tmp_path / "cache", "device"), "cpu")
    assert old.fingerprint["content_sha256"] == old_content_sha256(old_tensors.train_x, old_tensors.train_y)
    # The folder's content hash comes from the cache's row digests (no pixel read): the digests of
    # exactly the copied train split's images.
    copied_digests = torch.from_numpy(cache.row_digests(old_tensors.train_x.numpy()))
    content = fingerprint.rows_content_sha256(copied_digests, tuple(old_tensors.train_x.shape), old_tensors.train_y)
    for bundle in new.values():
        assert bundle.fingerprint == {**old.fingerprint, "content_sha256": content}
        assert bundle.normalization == old.normalization
        assert bundle.input_shape == old.input_shape == (1, 6, 6)
        for name in SPLIT_NAMES:
            split, expected = getattr(bundle, name), getattr(old, name)
            x = split.x.read() if isinstance(split.x, HostRows) else split.x
            assert torch.equal(x, expected.x) and torch.equal(split.y, expected.y), name
        for name in ("unlabelled", "labelled"):
            split, expected = getattr(bundle, name), getattr(old, name)
            got = DeviceBatches(split.x, split.y, 4, seed=3)
            want = DeviceBatches(expected.x, expected.y, 4, seed=3)
            for step in (0, 1, got.steps_per_epoch + 2):
                assert all(torch.equal(a, b) for a, b in zip(got.batch(step), want.batch(step))), (name, step)


def test_pretrain_finetune_evaluate_on_a_folder_without_test_host_equals_device_bitwise(tmp_path, ptft):
    root = folder_without_test(tmp_path / "images", per_class=12, unlabelled=4)

    def stages(placement: str) -> tuple[bytes, bytes, dict]:
        data = {"name": "imagefolder", "root": str(root), "batch_size": 8, "val_fraction": 0.25,
                "cache_dir": str(tmp_path / "cache"), "placement": placement}
        pre_dir, fine_dir = tmp_path / f"pre-{placement}", tmp_path / f"fine-{placement}"
        pre = write_yaml(tmp_path / f"pre-{placement}.yaml",
                         tiny_pretrain_config(pre_dir, data=data, train={"max_steps": 4, "eval_every_steps": 2}))
        assert ptft("pretrain", pre).code == 0
        fine = write_yaml(tmp_path / f"fine-{placement}.yaml", tiny_finetune_config(
            fine_dir, str(pre_dir), data={**data, "labels_per_class": 3, "batch_size": 6},
            train={"max_steps": 4, "eval_every_steps": 2, "log_every_steps": 2}))
        finetuned = ptft("finetune", fine)
        assert finetuned.code == 0, finetuned.stderr
        evaluated = ptft("evaluate", finetuned.last_line)
        assert evaluated.code == 0, evaluated.stderr
        weights = [(run / "checkpoints" / "last" / "model.safetensors").read_bytes() for run in (pre_dir, fine_dir)]
        metrics = json.loads(evaluated.last_line)
        for names_the_run in ("checkpoint", "config_hash", "files", "lineage"):  # paths, and hashes of the config
            metrics.pop(names_the_run)
        return *weights, metrics

    host, device = stages("host"), stages("device")
    assert host[2]["num_examples"] == 6  # round(0.2 x 12) = 2 held out of each class's 12 images
    assert host == device
