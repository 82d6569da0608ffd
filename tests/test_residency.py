"""Reading a mapped decode cache keeps few of its pages resident, and fingerprinting it reads none (issue #15)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ptft.config.schema import DataSection
from ptft.data import build_data, bundle, normalize, residency
from ptft.data.batches import DeviceBatches

pytestmark = pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads a mapping's Rss in /proc")


def noise_folder(root: Path, per_class: int = 60, size: int = 32) -> Path:
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("test", 2)):
        for label in ("a", "b"):
            (root / split / label).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels, "RGB").save(root / split / label / f"{i}.png", compress_level=0)
    return root


def resident_bytes(cache_dir: Path) -> int:
    """Resident bytes of this process's mappings of the decode cache's pixel files (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:  # a mapping's header line
            inside = len(fields) == 6 and fields[5].startswith(str(cache_dir)) and not fields[5].endswith(".rows.npy")
        elif inside and fields[0] == "Rss:":
            total += int(fields[1]) * 1024
    return total


def epoch_of_host_batches(root: Path, cache_dir: Path) -> tuple[int, int]:
    """(peak resident bytes of the cache's mapping during an epoch with placement host, the split's bytes)."""
    cfg = DataSection(name="imagefolder", root=str(root), cache_dir=str(cache_dir), placement="host", batch_size=4)
    split = build_data(cfg, "cpu", reads=["unlabelled"]).unlabelled
    batches = DeviceBatches(split.x, split.y, 4, seed=0)
    peak = 0
    for step in range(batches.steps_per_epoch):
        batches.batch(step)
        peak = max(peak, resident_bytes(cache_dir))
    return peak, split.x.nbytes


def test_an_epoch_from_the_mapped_cache_makes_none_of_it_resident(tmp_path, monkeypatch):
    # 48 KiB images: the kernel maps at least 64 KiB around each page fault (a whole page-cache folio, up
    # to 2 MiB, on current kernels), so reading rows through the mapping makes far more of it resident.
    root, cache_dir = noise_folder(tmp_path / "images", size=128), tmp_path / "cache"
    build_data(DataSection(name="imagefolder", root=str(root), cache_dir=str(cache_dir)), "cpu", reads=[])
    read, _ = epoch_of_host_batches(root, cache_dir)
    monkeypatch.setattr(residency, "read_rows", lambda *args: False)  # gathered through the mapping instead
    mapped, nbytes = epoch_of_host_batches(root, cache_dir)
    assert mapped > 0.9 * nbytes  # the measure sees the pages an epoch touches through the mapping ...
    assert read < 0.02 * nbytes  # ... and reading the file touches none of them


def test_rows_read_from_the_file_equal_rows_indexed_in_memory(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, (40, 3, 5, 7), dtype=np.uint8)
    np.save(tmp_path / "a.npy", array)
    mapped = np.load(tmp_path / "a.npy", mmap_mode="c")
    residency.track(mapped)
    whole = torch.from_numpy(mapped)
    for part in (whole, whole[10:], whole[3:30]):  # the array, and rows of it further into the file
        rows = torch.tensor([5, 0, 17, 5, len(part) - 1])
        out = torch.empty((5, 3, 5, 7), dtype=torch.uint8)
        assert residency.read_rows(part, rows, out) and torch.equal(out, part[rows])
    assert not residency.read_rows(torch.from_numpy(array), rows, out)  # not a mapping: the caller indexes


def test_a_folders_fingerprint_and_statistics_read_no_pixels_and_follow_its_content(tmp_path, monkeypatch):
    root, cache_dir = noise_folder(tmp_path / "images", per_class=6, size=8), tmp_path / "cache"
    cfg = DataSection(name="imagefolder", root=str(root), cache_dir=str(cache_dir), normalize="dataset")
    built = build_data(cfg, "cpu", reads=[])
    first = built.fingerprint
    monkeypatch.setattr(bundle, "pixels_content_sha256", lambda *args: pytest.fail("read the pixels"))
    monkeypatch.setattr(normalize, "_from_pixels", lambda *args: pytest.fail("read the pixels"))
    again = build_data(cfg, "cpu", reads=[])
    assert again.fingerprint == first  # from the cache's row digests ...
    assert again.normalization == built.normalization  # ... and the statistics from its row sums
    edited = root / "train" / "b" / "3.png"
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8), "RGB").save(edited)
    changed = build_data(cfg, "cpu", reads=[]).fingerprint
    assert changed["content_sha256"] != first["content_sha256"] and changed["val_sha256"] == first["val_sha256"]


def test_without_preadv_rows_are_gathered_through_the_mapping(tmp_path, monkeypatch):
    root, cache_dir = noise_folder(tmp_path / "images", per_class=6, size=8), tmp_path / "cache"
    cfg = DataSection(name="imagefolder", root=str(root), cache_dir=str(cache_dir), placement="host")
    x = build_data(cfg, "cpu", reads=["unlabelled"]).unlabelled.x
    rows = torch.tensor([3, 0, 7])
    read = x[rows].read()
    monkeypatch.delattr(os, "preadv")  # macOS and Windows Pythons have none
    assert not residency.read_rows(x.parts[0], x.rows[rows], torch.empty_like(read))
    assert torch.equal(x[rows].read(), read)


def test_a_cache_file_deleted_before_it_is_registered_is_read_through_its_mapping(tmp_path):
    array = np.arange(2 * 3 * 4 * 4, dtype=np.uint8).reshape(2, 3, 4, 4)
    np.save(tmp_path / "gone.npy", array)
    mapped = np.load(tmp_path / "gone.npy", mmap_mode="c")
    (tmp_path / "gone.npy").unlink()  # as another process replacing an older state of the folder does
    residency.track(mapped)
    part, rows = torch.from_numpy(mapped), torch.tensor([1, 0])
    assert not residency.read_rows(part, rows, torch.empty((2, 3, 4, 4), dtype=torch.uint8))
