"""ptft.data: datasets, seeded stratified splits, build_data and device batching."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ptft.data import DATASETS, DatasetTensors, build_data, sources
from ptft.data.batches import DeviceBatches, iterate_eval, to_float
from ptft.data.fingerprint import val_overlap_problem
from ptft.data.splits import label_subset, train_val_split
from ptft.errors import DataError

REPO = Path(__file__).resolve().parents[1]


def data_cfg(**changes) -> SimpleNamespace:
    base = dict(name="synthetic", root="data", download=False, batch_size=32, eval_batch_size=100, val_fraction=0.1,
                split_seed=0, label_fraction=None, labels_per_class=None, image_size=None)
    # The schema's defaults for every other data.* key (resize, normalize, ...).
    from ptft.config.schema import DataSection

    return SimpleNamespace(**{**DataSection().model_dump(), **base, **changes})


@pytest.fixture(scope="module")
def digits() -> DatasetTensors:
    return DATASETS.get("digits")(Path("unused"), False)


def rows(x: torch.Tensor) -> set[bytes]:
    """Each image as bytes, to compare splits as sets of examples."""
    return {r.numpy().tobytes() for r in x.flatten(1)}


def skewed_labels() -> torch.Tensor:
    # 40 of class 0, 20 of class 1, 5 of class 2, shuffled.
    labels = torch.cat([torch.zeros(40), torch.ones(20), torch.full((5,), 2)]).long()
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(7))]


# ---- import discipline -------------------------------------------------------------------------

def test_import_ptft_data_and_its_fingerprint_imports_no_torch():
    code = ("import sys, ptft.data as d, ptft.data.fingerprint; names = d.DATASETS.names(); "
            "heavy = [m for m in ('torch', 'torchvision', 'sklearn') if m in sys.modules]; print(names, heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert out.strip() == ("['cifar10', 'cifar100', 'digits', 'fashion_mnist', 'imagefolder', 'kmnist', 'mnist', "
                           "'stl10', 'svhn', 'synthetic'] []")


# ---- sources -----------------------------------------------------------------------------------

def test_digits_shapes_range_and_fixed_stratified_test_split(digits):
    assert digits.train_x.shape == (1438, 1, 8, 8) and digits.test_x.shape == (359, 1, 8, 8)
    assert digits.train_x.dtype == torch.float32 and digits.train_y.dtype == torch.int64
    everything = torch.cat([digits.train_x, digits.test_x])
    assert everything.min() == 0.0 and everything.max() == 1.0
    assert torch.equal(everything * 16, (everything * 16).round())  # pixel values were 0..16
    counts = torch.bincount(torch.cat([digits.train_y, digits.test_y]))
    assert torch.equal(torch.bincount(digits.test_y), torch.round(counts * 0.2).long())
    again = DATASETS.get("digits")(Path("elsewhere"), True)
    assert torch.equal(again.test_x, digits.test_x) and torch.equal(again.test_y, digits.test_y)
    assert digits.num_classes == 10 and digits.class_names == [str(d) for d in range(10)]


def test_digits_test_split_does_not_depend_on_split_seed():
    first = build_data(data_cfg(name="digits", split_seed=0), "cpu")
    second = build_data(data_cfg(name="digits", split_seed=1), "cpu")
    assert torch.equal(first.test.x, second.test.x)
    assert first.fingerprint["val_sha256"] != second.fingerprint["val_sha256"]


def test_synthetic_is_deterministic_balanced_and_linearly_learnable():
    a, b = DATASETS.get("synthetic")(Path("x"), False), DATASETS.get("synthetic")(Path("y"), False)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert a.train_x.shape == (500, 1, 8, 8) and a.test_x.shape == (200, 1, 8, 8)
    assert a.train_x.dtype == torch.float32 and 0 <= a.train_x.min() and a.train_x.max() <= 1
    assert torch.bincount(a.train_y).tolist() == [50] * 10 and torch.bincount(a.test_y).tolist() == [20] * 10

    def features(x: torch.Tensor) -> torch.Tensor:  # (N, 64 pixels + 1 bias)
        return torch.cat([x.flatten(1), torch.ones(len(x), 1)], 1).double()

    # A least-squares linear classifier on one-hot targets separates the classes.
    weights = torch.linalg.lstsq(features(a.train_x), torch.eye(10, dtype=torch.float64)[a.train_y]).solution
    accuracy = (features(a.test_x) @ weights).argmax(1).eq(a.test_y).float().mean().item()
    assert accuracy > 0.95


MISSING = [
    ("mnist", "MNIST/raw", "train-images-idx3-ubyte"),
    ("fashion_mnist", "FashionMNIST/raw", "t10k-labels-idx1-ubyte"),
    ("kmnist", "KMNIST/raw", "train-labels-idx1-ubyte"),
    ("cifar10", "cifar-10-batches-py", "data_batch_5"),
    ("cifar100", "cifar-100-python", "meta"),
    ("svhn", "", "test_32x32.mat"),
    ("stl10", "stl10_binary", "unlabeled_X.bin"),
]


@pytest.mark.parametrize("name, folder, a_file", MISSING)
def test_missing_files_raise_data_error_naming_folder_and_files(tmp_path, name, folder, a_file):
    with pytest.raises(DataError) as caught:
        DATASETS.get(name)(tmp_path, False)
    message = str(caught.value)
    assert f"'{tmp_path / folder}'" in message and a_file in message
    assert message.startswith("data.root: no ") and "data.download=true" in message


def test_mnist_message_lists_every_expected_file_and_which_are_missing(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "train-images-idx3-ubyte").write_bytes(b"")
    (raw / "train-labels-idx1-ubyte").write_bytes(b"")
    with pytest.raises(DataError, match="MNIST files missing") as caught:
        DATASETS.get("mnist")(tmp_path, False)
    assert "(t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte)" in str(caught.value)
    assert ("expected train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
            "t10k-labels-idx1-ubyte") in str(caught.value)


def test_unreadable_mnist_files_raise_data_error(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (raw / name).write_bytes(b"not an idx file")
    with pytest.raises(DataError, match=r"cannot read MNIST files in '.*MNIST/raw'"):
        DATASETS.get("mnist")(tmp_path, False)


class FakeTorchvision:
    """Stands in for a torchvision dataset class: numpy arrays in torchvision's own layouts."""

    base_folder, filename, classes = "fake_folder", "fake.tar.gz", ["a", "b", "c"]

    def __init__(self, root, download, train=True, split="train"):
        n = 4 if train and split != "test" else 2
        self.targets = [i % 3 for i in range(n)]  # CIFAR: a list
        self.labels = np.arange(n) % 3  # SVHN int64, STL10 uint8 (labels of 'unlabeled' unused)
        hwc = np.arange(n * 5 * 6 * 3, dtype=np.uint8).reshape(n, 5, 6, 3)
        self.data = hwc if self.layout == "NHWC" else hwc.transpose(0, 3, 1, 2)  # the latter non-contiguous


@pytest.mark.parametrize("name, class_name, files, layout", [
    ("cifar10", "CIFAR10", [f"fake_folder/{f}" for f in sources.CIFAR10_FILES], "NHWC"),
    ("svhn", "SVHN", sources.SVHN_FILES, "NCHW"),
    ("stl10", "STL10", [f"fake_folder/{f}" for f in sources.STL10_FILES], "NCHW"),
])
def test_torchvision_arrays_become_nchw_uint8_tensors(tmp_path, monkeypatch, name, class_name, files, layout):
    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, class_name, type(class_name, (FakeTorchvision,), {"layout": layout}))
    (tmp_path / "fake_folder").mkdir()
    for file in files:
        (tmp_path / file).write_bytes(b"")
    loaded = DATASETS.get(name)(tmp_path, False)
    hwc = torch.arange(4 * 5 * 6 * 3, dtype=torch.uint8).view(4, 5, 6, 3)
    assert loaded.train_x.dtype == torch.uint8 and loaded.train_x.is_contiguous()
    assert torch.equal(loaded.train_x, hwc.permute(0, 3, 1, 2)) and loaded.test_x.shape == (2, 3, 5, 6)
    assert loaded.train_y.dtype == torch.int64 and loaded.train_y.tolist() == [0, 1, 2, 0]
    assert (loaded.unlabelled_x is not None) == (name == "stl10")


def test_real_mnist_loads_whole_tensors(shared_data):
    mnist = DATASETS.get("mnist")(shared_data, False)
    assert mnist.train_x.shape == (60000, 1, 28, 28) and mnist.test_x.shape == (10000, 1, 28, 28)
    assert mnist.train_x.dtype == torch.uint8 and mnist.train_y.dtype == torch.int64
    assert torch.bincount(mnist.test_y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert mnist.num_classes == 10 and len(mnist.class_names) == 10


# ---- splits ------------------------------------------------------------------------------------

def test_train_val_split_is_stratified_disjoint_and_seeded():
    labels = skewed_labels()
    train, val = train_val_split(labels, 0.2, seed=3)
    assert torch.bincount(labels[val]).tolist() == [8, 4, 1]
    assert torch.equal(torch.sort(torch.cat([train, val])).values, torch.arange(len(labels)))
    assert torch.equal(train, train.sort().values)
    same_train, same_val = train_val_split(labels, 0.2, seed=3)
    assert torch.equal(same_train, train) and torch.equal(same_val, val)
    assert not torch.equal(train_val_split(labels, 0.2, seed=4)[1], val)


def test_train_val_split_leaves_every_class_a_training_example():
    # Half of 1 example rounds up to 1 and of 2 examples to 1: validation takes at most all but one.
    labels = torch.tensor([2] * 10 + [0] + [1] * 2)
    train, val = train_val_split(labels, 0.5, seed=0)
    assert torch.bincount(labels[val], minlength=3).tolist() == [0, 1, 5]
    assert torch.bincount(labels[train], minlength=3).tolist() == [1, 1, 5]


def test_label_subset_per_class_budget_is_exact_and_seeded():
    labels = skewed_labels()
    chosen = label_subset(labels, labels_per_class=5, seed=0)
    assert torch.bincount(labels[chosen]).tolist() == [5, 5, 5]
    assert torch.equal(label_subset(labels, labels_per_class=5, seed=0), chosen)
    assert not torch.equal(label_subset(labels, labels_per_class=5, seed=1), chosen)


def test_label_subset_fraction_keeps_at_least_one_per_class():
    chosen = label_subset(skewed_labels(), label_fraction=0.05, seed=0)
    assert torch.bincount(skewed_labels()[chosen]).tolist() == [2, 1, 1]  # class 2: 5 * 0.05 rounds to 0 -> 1
    chosen = label_subset(skewed_labels(), label_fraction=0.1, seed=0)
    assert torch.bincount(skewed_labels()[chosen]).tolist() == [4, 2, 1]  # class 2: 0.5 rounds half up


def test_label_subset_without_budget_is_everything():
    assert torch.equal(label_subset(skewed_labels(), seed=0), torch.arange(65))


@pytest.mark.parametrize("budget, words", [
    (dict(labels_per_class=6), ["data.labels_per_class", "6", "class 2 has 5 examples"]),
    (dict(labels_per_class=0), ["data.labels_per_class", "0"]),
    (dict(label_fraction=1.5), ["data.label_fraction", "1.5"]),
    (dict(label_fraction=0.5, labels_per_class=2), ["data.label_fraction", "data.labels_per_class", "at most one"]),
])
def test_label_subset_rejects_impossible_budgets(budget, words):
    with pytest.raises(DataError) as caught:
        label_subset(skewed_labels(), seed=0, **budget)
    assert all(word in str(caught.value) for word in words)


# ---- build_data --------------------------------------------------------------------------------

def test_build_data_sizes_subsets_and_fingerprint():
    bundle = build_data(data_cfg(labels_per_class=3), "cpu")
    assert len(bundle.unlabelled.x) == 450 and len(bundle.val.x) == 50 and len(bundle.test.x) == 200
    assert torch.bincount(bundle.labelled.y).tolist() == [3] * 10
    assert torch.bincount(bundle.val.y).tolist() == [5] * 10
    labelled, train, val = rows(bundle.labelled.x), rows(bundle.unlabelled.x), rows(bundle.val.x)
    assert len(labelled) == 30 and labelled <= train and not (train & val)
    assert bundle.num_classes == 10 and bundle.input_shape == (1, 8, 8)
    assert bundle.fingerprint == build_data(data_cfg(labels_per_class=3), "cpu").fingerprint
    assert {k: bundle.fingerprint[k] for k in ("dataset", "split_seed", "val_size", "labelled_size")} == {
        "dataset": "synthetic", "split_seed": 0, "val_size": 50, "labelled_size": 30}


def test_build_data_val_is_shared_by_pretrain_and_finetune_budgets():
    pretrain, finetune = build_data(data_cfg(), "cpu"), build_data(data_cfg(label_fraction=0.1), "cpu")
    assert pretrain.fingerprint["val_sha256"] == finetune.fingerprint["val_sha256"]
    assert torch.equal(pretrain.val.x, finetune.val.x) and torch.equal(pretrain.unlabelled.x, finetune.unlabelled.x)
    assert pretrain.labelled is pretrain.unlabelled  # no budget: the whole train split, not a copy
    assert pretrain.fingerprint["labelled_size"] == 450 and len(finetune.labelled.x) == 50  # 45 * 0.1 -> 5
    other_seed = build_data(data_cfg(label_fraction=0.1, split_seed=1), "cpu")
    assert other_seed.fingerprint["val_sha256"] != pretrain.fingerprint["val_sha256"]
    assert other_seed.fingerprint["labelled_sha256"] != finetune.fingerprint["labelled_sha256"]


def test_build_data_on_digits(digits):
    bundle = build_data(data_cfg(name="digits", labels_per_class=2), "cpu")
    assert len(bundle.unlabelled.x) + len(bundle.val.x) == len(digits.train_x)
    assert len(bundle.labelled.x) == 20 and torch.equal(bundle.test.y, digits.test_y)
    assert bundle.class_names == [str(d) for d in range(10)]


def test_build_data_errors_name_the_key():
    with pytest.raises(DataError, match="data.labels_per_class: 51 "):
        build_data(data_cfg(labels_per_class=51), "cpu")


def fake_dataset(monkeypatch, labels: list[int]) -> None:
    """Make every dataset name load 4x4 uint8 images with these train labels (and a tiny test split)."""
    y = torch.tensor(labels)
    fake = DatasetTensors(train_x=torch.arange(len(y), dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 4, 4),
                          train_y=y, test_x=torch.zeros(2, 1, 4, 4, dtype=torch.uint8), test_y=torch.tensor([0, 1]),
                          num_classes=int(y.max()) + 1, class_names=[str(c) for c in range(int(y.max()) + 1)])
    monkeypatch.setattr(DATASETS, "get", lambda name: lambda root, download: fake)


def test_a_class_with_one_example_is_still_in_the_labelled_subset(monkeypatch):
    fake_dataset(monkeypatch, [0] * 6 + [1] * 6 + [2])
    bundle = build_data(data_cfg(name="fake", val_fraction=0.5, labels_per_class=1), "cpu")
    assert torch.bincount(bundle.labelled.y).tolist() == [1, 1, 1]  # class 2's one example is not moved to val
    assert torch.bincount(bundle.val.y, minlength=3).tolist() == [3, 3, 0]


@pytest.mark.parametrize("labels, val_fraction, message", [
    ([0, 0, 0, 1, 1, 1], 0.1, "data.val_fraction: 0.1 takes no validation examples from fake's 6 training examples "
                              "(each class gives round(0.1 x its size), at most all but one, and the largest class "
                              "has 3); set data.val_fraction to at least 0.17"),
    ([0, 1, 2], 0.5, "data.val_fraction: fake's train split holds one example per class, and each class keeps one "
                     "for training: none is left for validation; add examples"),
])
def test_a_val_fraction_that_rounds_to_no_validation_examples_is_refused(monkeypatch, labels, val_fraction, message):
    fake_dataset(monkeypatch, labels)
    with pytest.raises(DataError) as caught:
        build_data(data_cfg(name="fake", val_fraction=val_fraction), "cpu")
    assert str(caught.value) == message


def test_build_data_keeps_uint8_and_appends_unlabelled_images(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    fake = DatasetTensors(
        train_x=torch.randint(0, 256, (40, 3, 4, 4), dtype=torch.uint8, generator=generator),
        train_y=torch.arange(40) % 4, test_x=torch.zeros(8, 3, 4, 4, dtype=torch.uint8), test_y=torch.arange(8) % 4,
        num_classes=4, class_names=list("abcd"),
        unlabelled_x=torch.full((6, 3, 4, 4), 7, dtype=torch.uint8))
    monkeypatch.setattr(DATASETS, "get", lambda name: lambda root, download: fake)
    bundle = build_data(data_cfg(name="fake", val_fraction=0.25), "cpu")  # 10 * 0.25 -> 3 per class
    assert bundle.unlabelled.x.dtype == torch.uint8 and bundle.val.x.dtype == torch.uint8
    assert len(bundle.unlabelled.x) == 28 + 6 and bundle.unlabelled.y[-6:].tolist() == [-1] * 6
    assert torch.equal(bundle.unlabelled.x[-6:], fake.unlabelled_x)
    assert len(bundle.labelled.x) == 28 and bool((bundle.labelled.y >= 0).all())
    assert bundle.input_shape == (3, 4, 4)


# ---- fingerprint: what checkpoints record about the data ---------------------------------------

def small_image_folder(root: Path, brightness: int = 0) -> Path:
    from PIL import Image

    for label, name in enumerate(["ant", "bee"]):
        for i in range(5):
            (root / "train" / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((4, 4), brightness + 40 * label + i, dtype=np.uint8)).save(
                root / "train" / name / f"{i}.png")
    return root


def test_fingerprint_identifies_the_data_by_content_wherever_its_root_is(tmp_path):
    here = small_image_folder(tmp_path / "here")
    there = shutil.copytree(here, tmp_path / "elsewhere" / "there")
    first = build_data(data_cfg(name="imagefolder", root=str(here), val_fraction=0.25), "cpu").fingerprint
    moved = build_data(data_cfg(name="imagefolder", root=str(there), val_fraction=0.25), "cpu").fingerprint
    assert moved == first and str(here) not in str(first)
    other = small_image_folder(tmp_path / "other", brightness=1)  # same names and labels, other pixels
    changed = build_data(data_cfg(name="imagefolder", root=str(other), val_fraction=0.25), "cpu").fingerprint
    assert changed["content_sha256"] != first["content_sha256"] and changed["val_sha256"] == first["val_sha256"]
    # 5 images per class: one held out for test, one of the other 4 for validation, 6 labelled in all.
    assert {k: first[k] for k in ("dataset", "split_seed", "val_fraction", "val_size", "labelled_size")} == {
        "dataset": "imagefolder", "split_seed": 0, "val_fraction": 0.25, "val_size": 2, "labelled_size": 6}


def fingerprint(**changes) -> dict:
    return build_data(data_cfg(**changes), "cpu").fingerprint


def test_a_child_validating_on_its_parents_validation_split_has_no_problem():
    parent = fingerprint()
    assert val_overlap_problem(parent, fingerprint(labels_per_class=3)) is None  # label budgets do not move val
    assert val_overlap_problem(parent, fingerprint(label_fraction=0.1, batch_size=7)) is None


@pytest.mark.parametrize("changes, expected", [
    (dict(split_seed=1), "data.split_seed: this run's validation split of synthetic (split_seed 1, val_fraction 0.1) "
                         "differs from its parent checkpoint's (split_seed 0, val_fraction 0.1), so it may hold "
                         "examples the parent trained on; set data.split_seed=0 to validate on the parent's "
                         "validation split"),
    (dict(val_fraction=0.2), "data.val_fraction: this run's validation split of synthetic (split_seed 0, "
                             "val_fraction 0.2) differs from its parent checkpoint's (split_seed 0, val_fraction "
                             "0.1), so it may hold examples the parent trained on; set data.val_fraction=0.1 to "
                             "validate on the parent's validation split"),
    (dict(split_seed=3, val_fraction=0.3), "data.split_seed and data.val_fraction: this run's validation split of "
                                           "synthetic (split_seed 3, val_fraction 0.3) differs from its parent "
                                           "checkpoint's (split_seed 0, val_fraction 0.1), so it may hold examples "
                                           "the parent trained on; set data.split_seed=0 data.val_fraction=0.1 to "
                                           "validate on the parent's validation split"),
])
def test_a_child_validating_on_another_split_is_a_problem_naming_the_keys_and_both_values(changes, expected):
    assert val_overlap_problem(fingerprint(), fingerprint(**changes)) == expected


def test_the_same_split_settings_drawing_other_examples_are_still_a_problem():
    parent = {**fingerprint(), "val_sha256": "0" * 64}  # as if another ptft version drew the split
    problem = val_overlap_problem(parent, fingerprint())
    assert problem.startswith("data.split_seed and data.val_fraction: this run's validation split of synthetic "
                              "(split_seed 0, val_fraction 0.1) differs from its parent checkpoint's (split_seed 0, "
                              "val_fraction 0.1)")
    assert "set data." not in problem  # no setting would fix it


def test_parents_on_other_data_or_without_a_recorded_split_are_not_compared(digits):
    child = fingerprint(split_seed=1)
    assert val_overlap_problem(build_data(data_cfg(name="digits"), "cpu").fingerprint, child) is None
    assert val_overlap_problem({**fingerprint(), "content_sha256": "0" * 64}, child) is None  # other content
    assert val_overlap_problem(None, child) is None and val_overlap_problem({}, child) is None  # foreign weights
    before_fingerprints = {k: v for k, v in fingerprint().items() if k not in ("content_sha256", "val_fraction")}
    assert val_overlap_problem(before_fingerprints, child) == (
        "data.split_seed: this run's validation split of synthetic (split_seed 1, val_fraction 0.1) differs from its "
        "parent checkpoint's (split_seed 0, val_fraction not recorded), so it may hold examples the parent trained "
        "on; set data.split_seed=0 to validate on the parent's validation split")


# ---- batching ----------------------------------------------------------------------------------

def indexed_data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Image i is filled with value i (uint8), label i: a batch reveals which examples it holds."""
    return torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous(), torch.arange(n)


def test_device_batches_cover_each_example_once_per_epoch():
    x, y = indexed_data(10)
    batches = DeviceBatches(x, y, batch_size=3, seed=0)
    assert batches.steps_per_epoch == 3
    for epoch in range(2):
        seen = torch.cat([batches.batch(epoch * 3 + p)[1] for p in range(3)])
        assert len(seen) == 9 and len(set(seen.tolist())) == 9  # the last partial batch is dropped
        assert torch.equal(torch.sort(batches.permutation(epoch)).values, torch.arange(10))
    assert not torch.equal(batches.permutation(0), batches.permutation(1))


def test_device_batches_convert_uint8_and_keep_pairs_aligned():
    x, y = indexed_data(10)
    xb, yb = DeviceBatches(x, y, batch_size=4, seed=1).batch(5)
    assert xb.dtype == torch.float32 and xb.shape == (4, 1, 2, 2)
    assert torch.equal(xb, (yb.float() / 255).view(4, 1, 1, 1).expand(4, 1, 2, 2))


def test_device_batches_are_seeded_and_resume_from_the_step_alone():
    x, y = indexed_data(20)
    walked = DeviceBatches(x, y, batch_size=6, seed=5)
    history = [walked.batch(step)[1] for step in range(11)]
    fresh = DeviceBatches(x, y, batch_size=6, seed=5)
    assert torch.equal(fresh.batch(10)[1], history[10]) and torch.equal(fresh.batch(4)[1], history[4])
    other = DeviceBatches(x, y, batch_size=6, seed=6)
    assert not all(torch.equal(other.batch(s)[1], history[s]) for s in range(3))


def test_device_batches_draw_one_permutation_per_epoch(monkeypatch):
    x, y = indexed_data(12)
    batches = DeviceBatches(x, y, batch_size=4, seed=0)
    calls = []
    real_randperm = torch.randperm
    monkeypatch.setattr(torch, "randperm", lambda *a, **k: calls.append(1) or real_randperm(*a, **k))
    for step in range(6):
        batches.batch(step)
    assert len(calls) == 2


def test_device_batches_smaller_than_one_batch_use_everything():
    x, y = indexed_data(5)
    batches = DeviceBatches(x, y, batch_size=8, seed=0)
    assert batches.steps_per_epoch == 1
    first, second = batches.batch(0)[1], batches.batch(1)[1]
    assert sorted(first.tolist()) == sorted(second.tolist()) == [0, 1, 2, 3, 4]


def test_rank_shards_make_up_the_global_batch_at_every_step():
    x, y = indexed_data(50)
    whole = DeviceBatches(x, y, batch_size=12, seed=3)
    shards = [whole.shard(rank, 3) for rank in range(3)]
    assert all(shard.steps_per_epoch == whole.steps_per_epoch == 4 for shard in shards)
    for step in (0, 3, 4, 9):  # 4 steps an epoch: crosses epoch boundaries
        parts = [shard.batch(step) for shard in shards]
        assert all(len(ys) == 4 for _, ys in parts)
        assert torch.equal(torch.cat([xs for xs, _ in parts]), whole.batch(step)[0])
        assert torch.equal(torch.cat([ys for _, ys in parts]), whole.batch(step)[1])


def test_one_process_shard_is_the_whole_batch_source():
    x, y = indexed_data(10)
    whole = DeviceBatches(x, y, batch_size=4, seed=0)
    assert whole.shard(0, 1) is whole
    with pytest.raises(ValueError, match="global batch 4 does not split over 3 processes"):
        whole.shard(0, 3)


def test_iterate_eval_is_sequential_with_last_partial_batch():
    x, y = indexed_data(10)
    batches = list(iterate_eval(x, y, 4))
    assert [len(b[1]) for b in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([b[0] for b in batches]), x.float() / 255)
    assert torch.equal(torch.cat([b[1] for b in batches]), y)


def test_to_float():
    assert torch.equal(to_float(torch.tensor([0, 51, 255], dtype=torch.uint8)), torch.tensor([0.0, 0.2, 1.0]))
    halves = to_float(torch.tensor([0.5], dtype=torch.float64))
    assert halves.dtype == torch.float32 and halves.item() == 0.5
    with pytest.raises(TypeError, match="uint8 or floating point"):
        to_float(torch.tensor([1, 2]))
