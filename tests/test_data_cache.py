"""The decode cache: decoded once, mapped by every later stage, run and process; never stale, never half-written."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO
from ptft.data import DATASETS, cache, decoding, images
from ptft.data.decoding import DecodeOptions
from ptft.errors import DataError


def save_image(path: Path, value: int, size: tuple[int, int] = (8, 8)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0]), value, dtype=np.uint8)).save(path)


def image_tree(root: Path, per_class: int = 6) -> Path:
    for name, base in [("cat", 10), ("dog", 100)]:
        for i in range(per_class):
            save_image(root / "train" / name / f"{i:02d}.png", base + i)
        save_image(root / "test" / name / "t.png", base + 50)
    return root


def load(root: Path, cache_dir: Path, **options):
    return DATASETS.get("imagefolder")(root, False, cache_dir=str(cache_dir), **options)


@pytest.fixture
def count_decodes(monkeypatch):
    """How many times files were decoded (rather than mapped from the cache)."""
    calls = []
    real = decoding.decode_files

    def counted(files, options, **kwargs):
        calls.append(len(files))
        return real(files, options, **kwargs)

    monkeypatch.setattr(cache, "decode_files", counted)
    return calls


def entries(cache_dir: Path) -> list[str]:
    """The cache's pixel files (each entry's row digests and sums, KEY.rows.npy and KEY.sums.npy, not counted)."""
    return sorted(path.name for path in (cache_dir / "images").glob("*.npy")
                  if not path.name.endswith((".rows.npy", ".sums.npy")))


def test_a_second_load_maps_the_cache_instead_of_decoding(tmp_path, count_decodes, capsys):
    root, cache_dir = image_tree(tmp_path / "images"), tmp_path / "cache"
    first = load(root, cache_dir)
    assert "decoded 14 files in" in capsys.readouterr().err and count_decodes == [14]
    again = load(root, cache_dir)
    assert "mapped cache" in capsys.readouterr().err and count_decodes == [14]
    assert torch.equal(first.train_x, again.train_x) and torch.equal(first.test_x, again.test_x)
    assert torch.equal(first.train_y, again.train_y) and len(entries(cache_dir)) == 1


@pytest.mark.parametrize("change", ["edit", "add", "remove"])
def test_a_changed_folder_is_decoded_again_and_replaces_its_old_entry(tmp_path, count_decodes, change):
    root, cache_dir = image_tree(tmp_path / "images"), tmp_path / "cache"
    before = load(root, cache_dir)
    target = root / "train" / "dog" / "02.png"
    if change == "edit":
        save_image(target, 222)
        os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 10**9))  # coarse clocks
    elif change == "add":
        save_image(root / "train" / "dog" / "new.png", 222)
    else:
        target.unlink()
    after = load(root, cache_dir)
    assert count_decodes == [14, {"edit": 14, "add": 15, "remove": 13}[change]]
    assert (222 in after.train_x[:, 0, 0, 0].tolist()) == (change != "remove")
    assert len(after.train_x) == len(before.train_x) + {"edit": 0, "add": 1, "remove": -1}[change]
    assert len(entries(cache_dir)) == 1  # the old state's entry is gone


def test_decode_options_are_part_of_the_key(tmp_path, count_decodes):
    root, cache_dir = image_tree(tmp_path / "images"), tmp_path / "cache"
    save_image(root / "train" / "cat" / "wide.png", 30, size=(16, 8))
    assert load(root, cache_dir, image_size=4).train_x.shape[-2:] == (4, 4)
    assert load(root, cache_dir, image_size=6).train_x.shape[-2:] == (6, 6)
    load(root, cache_dir, image_size=6, resize="stretch")
    load(root, cache_dir, image_size=6)
    assert count_decodes == [15, 15, 15] and len(entries(cache_dir)) == 3


def test_a_moved_folder_maps_the_same_entry(tmp_path, count_decodes):
    root, cache_dir = image_tree(tmp_path / "images"), tmp_path / "cache"
    first = load(root, cache_dir)
    moved = root.rename(tmp_path / "moved")
    assert torch.equal(load(moved, cache_dir).train_x, first.train_x) and count_decodes == [14]


def test_a_half_written_or_damaged_entry_is_never_used(tmp_path, count_decodes):
    root, cache_dir = image_tree(tmp_path / "images"), tmp_path / "cache"
    good = load(root, cache_dir).train_x.clone()
    (name,) = entries(cache_dir)
    npy = cache_dir / "images" / name
    data = npy.read_bytes()
    # A killed writer leaves a temporary file only; a damaged entry is shorter than its header says.
    npy.rename(npy.with_name(f".{npy.name}.123.abcd.tmp"))
    assert torch.equal(load(root, cache_dir).train_x, good)
    npy.write_bytes(data[: len(data) // 2])
    assert torch.equal(load(root, cache_dir).train_x, good)
    assert count_decodes == [14, 14, 14] and npy.stat().st_size == len(data)


def test_a_failed_write_leaves_no_entry_and_no_temporary_file(tmp_path, monkeypatch, capsys):
    root, cache_dir = image_tree(tmp_path / "images"), tmp_path / "cache"

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache.os, "replace", full_disk)
    data = load(root, cache_dir)
    assert len(data.train_x) == 12 and "could not cache them" in capsys.readouterr().err
    assert [p.name for p in (cache_dir / "images").iterdir() if not p.name.endswith(".lock")] == []


def test_the_cache_remembers_unreadable_files(tmp_path, count_decodes, capsys):
    root, cache_dir = image_tree(tmp_path / "images"), tmp_path / "cache"
    (root / "train" / "cat" / "bad.png").write_bytes(b"not a png")
    assert len(load(root, cache_dir, skip_bad_files=True).train_x) == 12
    assert "skipped 1 unreadable image(s)" in capsys.readouterr().err
    with pytest.raises(DataError, match=r"^data.root: cannot read image '.*bad\.png'"):
        load(root, cache_dir)
    assert count_decodes == [15]  # refused from the cache's record, not by decoding again


CONCURRENT_LOAD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from ptft.data.cache import cached_decode
    from ptft.data.decoding import DecodeOptions
    root, cache_dir, start = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])
    files = sorted(root.rglob("*.png"))
    time.sleep(max(0.0, start - time.time()))
    images = cached_decode(files, root, DecodeOptions(), cache_dir).images
    print(int(images.sum(dtype="int64")), images.shape)
""")


def test_processes_started_together_decode_once_and_see_the_same_pixels(tmp_path):
    # Another stage, another run or a torchrun rank: whichever takes the key's lock decodes, the others map.
    import time

    root, cache_dir = image_tree(tmp_path / "images", per_class=40), tmp_path / "cache"
    start = time.time() + 1.0  # both past their imports (no torch), then at once
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT_LOAD, str(root), str(cache_dir), str(start)],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [proc.communicate(timeout=120) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), results
    assert results[0][0] == results[1][0]
    stderr = "".join(err for _, err in results)
    assert stderr.count("decoded 82 files") == 1 and stderr.count("mapped cache") == 1
    assert len(entries(cache_dir)) == 1 and not list((cache_dir / "images").glob(".*.tmp"))


def test_the_default_cache_is_per_user_outside_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.default_cache_dir() == tmp_path / "xdg" / "ptft"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.default_cache_dir() == tmp_path / "home" / ".cache" / "ptft"
    root = image_tree(tmp_path / "images")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    DATASETS.get("imagefolder")(root, False)
    assert len(entries(tmp_path / "xdg" / "ptft")) == 1


def test_cache_key_names_relative_paths_sizes_mtimes_and_pixel_rules(tmp_path):
    root = image_tree(tmp_path / "images")
    files = sorted(root.rglob("*.png"))
    key = cache.folder_key(files, root, DecodeOptions())
    assert key == cache.folder_key(files, root, DecodeOptions(skip_bad_files=True))  # what is kept, not how
    assert key != cache.folder_key(files, root, DecodeOptions(image_size=8))
    assert key != cache.folder_key(files[:-1], root, DecodeOptions())


def test_a_broken_link_is_an_unreadable_file_like_any_other(tmp_path):
    root, cache_dir = image_tree(tmp_path / "images"), tmp_path / "cache"
    (root / "train" / "cat" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(DataError, match=r"^data.root: cannot read image '.*gone\.png'"):
        load(root, cache_dir)
    assert len(load(root, cache_dir, skip_bad_files=True).train_x) == 12


def test_each_entry_keeps_a_digest_and_sums_per_image_and_an_old_entry_gets_them_once(tmp_path, count_decodes):
    root, cache_dir = image_tree(tmp_path / "images"), tmp_path / "cache"
    files = sorted(map(str, root.rglob("*.png")))
    first = cache.cached_decode(files, root, DecodeOptions(), cache_dir)
    expected = [hashlib.blake2b(np.ascontiguousarray(row).data, digest_size=16).digest() for row in first.images]
    assert [bytes(row) for row in first.row_digests] == expected
    pixels = np.asarray(first.images, dtype=np.int64)
    assert np.array_equal(first.row_sums, np.stack([pixels.sum(axis=(2, 3)), (pixels ** 2).sum(axis=(2, 3))], -1))
    (digests,), (sums,) = (cache_dir / "images").glob("*.rows.npy"), (cache_dir / "images").glob("*.sums.npy")
    assert np.array_equal(np.load(digests), first.row_digests) and np.array_equal(np.load(sums), first.row_sums)
    digests.unlink()  # an entry written before row digests and sums existed
    sums.unlink()
    again = cache.cached_decode(files, root, DecodeOptions(), cache_dir)
    assert np.array_equal(again.row_digests, first.row_digests) and np.array_equal(again.row_sums, first.row_sums)
    assert digests.exists() and sums.exists() and count_decodes == [14]


def test_an_entry_decoded_by_older_pixel_rules_is_replaced_not_kept(tmp_path, monkeypatch, count_decodes):
    root, cache_dir = image_tree(tmp_path / "images"), tmp_path / "cache"
    today = images.RULES_VERSION
    monkeypatch.setattr(images, "RULES_VERSION", today - 1)  # as an older ptft decoded it
    load(root, cache_dir)
    monkeypatch.setattr(images, "RULES_VERSION", today)
    load(root, cache_dir, image_size=6)  # other options: a second entry, kept beside it
    assert len(entries(cache_dir)) == 2
    load(root, cache_dir)  # today's rules decode again, and the older rules' entry goes
    assert count_decodes == [14, 14, 14] and len(entries(cache_dir)) == 2
    kept = [json.loads(path.read_text())["pixel_rules"] for path in (cache_dir / "images").glob("*.json")]
    assert {rules["rules_version"] for rules in kept} == {images.RULES_VERSION}
