"""data.placement and which splits a stage places: device vs host batches, memory held, the CLI path."""

from __future__ import annotations

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

from conftest import REPO, tiny_finetune_config, tiny_pretrain_config, write_yaml
from ptft.data import DATASETS, build_data
from ptft.data import placement as placement_module
from ptft.data.batches import DeviceBatches, iterate_eval
from ptft.data.mixed import MixedBatches
from ptft.data.placement import HostRows, host_rows, resolve_placement
from ptft.config.schema import DataSection
from ptft.data.tensors import TensorSplit


def data_cfg(**changes) -> DataSection:
    return DataSection(**{"name": "digits", **changes})


def uint8_split(n: int = 200, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(base images (n, 1, 6, 6) uint8, labels (n,), rows: a seeded 70% subset of them in random order)."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 256, (n, 1, 6, 6), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 5, (n,), generator=generator)
    return base, labels, torch.randperm(n, generator=generator)[: int(0.7 * n)]


# ---- batches --------------------------------------------------------------------------------------

def test_host_batches_equal_device_batches_bitwise_across_epochs_shards_and_a_resume():
    base, labels, rows = uint8_split()
    device = DeviceBatches(base[rows], labels[rows], 32, seed=3)
    host = DeviceBatches(host_rows([base], rows, "cpu"), labels[rows], 32, seed=3)
    steps = range(3 * device.steps_per_epoch + 1)  # three epochs and into the fourth
    for step in steps:
        (dx, dy), (hx, hy) = device.batch(step), host.batch(step)
        assert torch.equal(dx, hx) and torch.equal(dy, hy), step
    # A resumed run builds fresh batches and starts mid-epoch: the prefetcher has nothing queued.
    resumed = DeviceBatches(host_rows([base], rows, "cpu"), labels[rows], 32, seed=3)
    for step in (7, 8, 2, 9):  # out of order too: each batch is a pure function of its step
        assert torch.equal(resumed.batch(step)[0], device.batch(step)[0])
    for rank in range(2):
        shard_d, shard_h = device.shard(rank, 2), host.shard(rank, 2)
        for step in (0, 5, 6):
            assert torch.equal(shard_d.batch(step)[0], shard_h.batch(step)[0])


def test_mixed_and_balanced_host_batches_equal_their_device_batches():
    base, labels, rows = uint8_split(seed=1)
    on_device = TensorSplit(base[rows], labels[rows])
    on_host = TensorSplit(host_rows([base], rows, "cpu"), labels[rows])
    mixed_d = MixedBatches.from_splits(on_device, on_device, 8, 2, seed=0)
    mixed_h = MixedBatches.from_splits(on_host, on_host, 8, 2, seed=0)
    balanced_d = DeviceBatches(on_device.x, on_device.y, 16, seed=0, sampler="balanced")
    balanced_h = DeviceBatches(on_host.x, on_host.y, 16, seed=0, sampler="balanced")
    for step in range(12):
        assert all(torch.equal(a, b) for a, b in zip(mixed_d.batch(step), mixed_h.batch(step)))
        assert all(torch.equal(a, b) for a, b in zip(balanced_d.batch(step), balanced_h.batch(step)))


def test_host_rows_over_several_arrays_read_the_rows_of_their_concatenation():
    first, second = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1), torch.arange(100, 105, dtype=torch.uint8)
    rows = torch.tensor([12, 0, 9, 14, 3])
    x = host_rows([first, second.view(5, 1, 1, 1)], rows, "cpu")
    assert x.read().flatten().tolist() == [102, 0, 9, 104, 3]
    assert x[1:4].read().flatten().tolist() == [0, 9, 104]  # selecting rows reads nothing until read
    assert torch.cat([chunk for chunk in x.split(2)]).flatten().tolist() == [102, 0, 9, 104, 3]
    xb, yb = next(iterate_eval(x, torch.arange(5), 5))
    assert xb.dtype == torch.float32 and torch.equal(xb.flatten(), x.read().flatten().float() / 255)


# ---- which splits a stage places ------------------------------------------------------------------

@pytest.fixture
def placed(monkeypatch) -> list[int]:
    """Sizes of the splits moved whole to the device (data.placement device), as stages place them."""
    sizes: list[int] = []
    real = placement_module.to_device

    def recording(x, device):
        sizes.append(len(x))
        return real(x, device)

    monkeypatch.setattr(placement_module, "to_device", recording)
    return sizes


def test_finetune_places_only_the_labelled_subset_and_val_never_test_or_the_unlabelled_pool(tmp_path, ptft, placed):
    sizes = build_data(data_cfg(labels_per_class=2), "cpu", reads=())
    pretrain = ptft("pretrain", write_yaml(tmp_path / "pre.yaml", tiny_pretrain_config(tmp_path / "pre")))
    assert pretrain.code == 0, pretrain.stderr
    assert placed == [len(sizes.unlabelled.y), len(sizes.val.y)]  # pretrain: the train split and val
    placed.clear()
    cfg = tiny_finetune_config(tmp_path / "ft", pretrain.last_line)
    finetune = ptft("finetune", write_yaml(tmp_path / "ft.yaml", cfg))
    assert finetune.code == 0, finetune.stderr
    assert placed == [len(sizes.labelled.y), len(sizes.val.y)] == [20, len(sizes.val.y)]
    placed.clear()
    evaluated = ptft("evaluate", tmp_path / "ft")
    assert evaluated.code == 0, evaluated.stderr
    assert placed == []  # evaluate reads its split batch by batch
    assert json.loads(evaluated.stdout)["confusion_matrix"]  # and still sees all of it
    meta = json.loads(next((tmp_path / "ft" / "checkpoints").glob("step-*/meta.json")).read_text())
    assert meta["memory"]["device"] == "cpu" and meta["memory"]["peak_host_bytes"] > 0
    assert meta["memory"]["peak_device_bytes"] is None  # not measured off CUDA


def test_semi_supervised_finetune_places_the_unlabelled_pool_too(tmp_path, ptft, placed):
    sizes = build_data(data_cfg(labels_per_class=2), "cpu", reads=())
    cfg = tiny_finetune_config(tmp_path / "ft", None, finetune={"unlabelled": "pseudo_label"},
                               train={"max_steps": 2, "eval_every_steps": 2})
    result = ptft("finetune", write_yaml(tmp_path / "ft.yaml", cfg))
    assert result.code == 0, result.stderr
    assert sorted(placed) == sorted([len(sizes.unlabelled.y), 20, len(sizes.val.y)])


# ---- data.placement -------------------------------------------------------------------------------

def test_auto_placement_on_the_cpu_is_device_and_says_so(capsys):
    assert resolve_placement("auto", torch.device("cpu"), 10 ** 15) == "device"
    bundle = build_data(data_cfg(placement="auto"), "cpu", reads=("labelled", "val"))
    assert isinstance(bundle.labelled.x, torch.Tensor) and isinstance(bundle.val.x, torch.Tensor)
    assert isinstance(bundle.test.x, HostRows)  # not read, not placed
    said = capsys.readouterr().err
    assert "labelled, val" in said and "on cpu (data.placement auto)" in said


def test_host_placement_keeps_rows_of_the_dataset_arrays_and_labels_on_the_device():
    bundle = build_data(data_cfg(placement="host"), "cpu")
    assert isinstance(bundle.unlabelled.x, HostRows) and isinstance(bundle.unlabelled.y, torch.Tensor)
    assert bundle.labelled is bundle.unlabelled  # no label budget: one split, shared
    device = build_data(data_cfg(placement="device"), "cpu")
    assert torch.equal(bundle.val.x.read(), device.val.x) and torch.equal(bundle.val.y, device.val.y)


@pytest.mark.parametrize("stage", ["pretrain", "semi_supervised", "linear_probe"])
def test_training_with_host_placement_ends_with_weights_bitwise_equal_to_device(tmp_path, ptft, stage):
    def weights(placement: str) -> bytes:
        run = tmp_path / f"{stage}-{placement}"
        if stage == "pretrain":
            cfg = tiny_pretrain_config(run, data={"placement": placement}, train={"max_steps": 12})
        else:  # finetunes: labelled + unlabelled batches; a probe on features computed once
            finetune = {"unlabelled": "pseudo_label"} if stage == "semi_supervised" else {"mode": "linear_probe"}
            cfg = tiny_finetune_config(run, None, data={"placement": placement}, finetune=finetune,
                                       train={"max_steps": 6})
        result = ptft("pretrain" if stage == "pretrain" else "finetune", write_yaml(tmp_path / f"{run.name}.yaml", cfg))
        assert result.code == 0, result.stderr
        return (run / "checkpoints" / "last" / "model.safetensors").read_bytes()

    assert weights("host") == weights("device")


def test_placement_is_a_checked_config_key(tmp_path, ptft):
    result = ptft("config", write_yaml(tmp_path / "c.yaml", tiny_pretrain_config(tmp_path / "r")), "data.placement=gpu")
    assert result.code == 2 and "data.placement" in result.stderr and "Traceback" not in result.stderr


# ---- bounded memory --------------------------------------------------------------------------------

def image_folder(root: Path, per_class: int, size: int) -> Path:
    """RGB PNGs in train/<class>/ and a test/ folder (no held-out copy), smooth so they decode fast."""
    ramp = np.add.outer(np.arange(size), np.arange(size)).astype(np.uint8)
    for split, count in (("train", per_class), ("test", 2)):
        for label in range(2):
            folder = root / split / f"c{label}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.stack([ramp + i, ramp + 60 * label, ramp[::-1]], axis=-1)
                Image.fromarray(pixels, "RGB").save(folder / f"{i}.png", compress_level=1)
    return root


MEASURE = textwrap.dedent("""
    import sys
    from ptft.config.schema import DataSection
    from ptft.data import build_data
    from ptft.data.batches import DeviceBatches

    def anonymous_bytes():  # private memory only: pages of the mapped cache are file pages
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024

    def growth(placement):
        cfg = DataSection(name="imagefolder", root=sys.argv[1], placement=placement, batch_size=16)
        before = anonymous_bytes()
        split = build_data(cfg, "cpu", reads=("unlabelled", "val")).unlabelled
        batches = DeviceBatches(split.x, split.y, 16, seed=0)
        for step in range(3 * batches.steps_per_epoch):  # every image read, three times over
            batches.batch(step)
        kept.append(split)  # alive: memory it frees would hide the next measure's allocations
        return anonymous_bytes() - before, split.x.nbytes

    kept = []
    growth("host")  # warm-up: the first batches' thread pools and allocator arenas are not the data
    host, nbytes = growth("host")
    device, _ = growth("device")
    print(host, device, nbytes)
""")


@pytest.mark.slow  # a subprocess: its own torch import
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="measures RssAnon in /proc")
def test_host_placement_trains_from_the_mapped_cache_without_copying_it(tmp_path):
    root = image_folder(tmp_path / "folder", per_class=60, size=160)  # ~9 MiB of decoded train images
    DATASETS.get("imagefolder")(root, False)  # decode and cache it once, here
    # glibc otherwise keeps freed batches in its heap, and they would read as growth: every large
    # allocation is its own mapping, returned when freed.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(root)], capture_output=True, text=True, cwd=REPO,
                          timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    host, device, nbytes = map(int, proc.stdout.split())
    assert device > 0.8 * nbytes  # the measure sees a copy of the train split ...
    assert host < 0.25 * nbytes  # ... and host placement makes none: a few batches at most


def test_host_placement_reads_an_image_folder_a_batch_at_a_time(tmp_path, monkeypatch):
    root = image_folder(tmp_path / "folder", per_class=20, size=8)
    reads: list[int] = []
    real_read = HostRows.read
    monkeypatch.setattr(HostRows, "read", lambda self: reads.append(len(self)) or real_read(self))
    cfg = DataSection(name="imagefolder", root=str(root), placement="host", batch_size=8, eval_batch_size=4)
    bundle = build_data(cfg, "cpu")
    assert reads == []  # placing reads nothing: the splits are rows of the mapped cache
    batches = DeviceBatches(bundle.unlabelled.x, bundle.unlabelled.y, 8, seed=0)
    for step in range(2 * batches.steps_per_epoch):
        batches.batch(step)
    assert sum(1 for _ in iterate_eval(bundle.val.x, bundle.val.y, 4)) == -(-len(bundle.val.y) // 4)
    assert reads and max(reads) <= 8
