"""Dataset loaders: whole datasets as CPU tensors, no per-sample Python in training.

`digits` and `synthetic` need no files. `imagefolder` decodes a user's image files once, at
load time, into one uint8 tensor. The torchvision datasets are read from
`data.root` in torchvision's own layout; their files are checked here first, so a missing
file is one `DataError` naming the folder and the files expected rather than torchvision's
generic RuntimeError.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ptft.console import note
from ptft.data.cache import cached_decode
from ptft.data.decoding import DecodeOptions
from ptft.data.images import JPEG_EXTRA, simplejpeg_installed
from ptft.data.splits import train_val_split
from ptft.data.tensors import DatasetTensors
from ptft.errors import DataError, UserError

# digits (and an imagefolder without test/) has no test split of its own: a fixed stratified
# 20%, independent of any run seed, so every run is compared on the same test images.
HELD_OUT_TEST_FRACTION = 0.2
HELD_OUT_TEST_SEED = 0

SYNTHETIC_SEED = 0
SYNTHETIC_TRAIN_SIZE, SYNTHETIC_TEST_SIZE = 500, 200
SYNTHETIC_NOISE = 0.3  # std of the pixel noise around each class prototype (pixels in [0, 1])

MNIST_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
               "t10k-labels-idx1-ubyte"]
CIFAR10_FILES = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch",
                 "batches.meta"]
CIFAR100_FILES = ["train", "test", "meta"]
SVHN_FILES = ["train_32x32.mat", "test_32x32.mat"]
STL10_FILES = ["train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin", "unlabeled_X.bin", "class_names.txt"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
IMAGEFOLDER_LAYOUT = "train/<class>/<image>, optionally test/<class>/<image> and unlabelled/<image>"


def load_digits() -> DatasetTensors:
    """scikit-learn's bundled 1,797 8x8 digits as float32 (N, 1, 8, 8) in [0, 1]."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    x = torch.from_numpy(bunch.images).float().div_(16).unsqueeze(1)  # pixel values are 0..16
    y = torch.from_numpy(bunch.target).long()
    train_idx, test_idx = train_val_split(y, HELD_OUT_TEST_FRACTION, HELD_OUT_TEST_SEED)
    return DatasetTensors(x[train_idx], y[train_idx], x[test_idx], y[test_idx], num_classes=10,
                          class_names=[str(d) for d in range(10)])


def make_synthetic() -> DatasetTensors:
    """10 classes of 1x8x8 float images: a random prototype per class plus noise. Deterministic."""
    generator = torch.Generator().manual_seed(SYNTHETIC_SEED)
    prototypes = torch.rand(10, 1, 8, 8, generator=generator)

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randperm(n, generator=generator) % 10  # balanced classes in random order
        noise = SYNTHETIC_NOISE * torch.randn(n, 1, 8, 8, generator=generator)
        return (prototypes[y] + noise).clamp_(0, 1), y

    train_x, train_y = sample(SYNTHETIC_TRAIN_SIZE)
    test_x, test_y = sample(SYNTHETIC_TEST_SIZE)
    return DatasetTensors(train_x, train_y, test_x, test_y, num_classes=10,
                          class_names=[f"class_{c}" for c in range(10)])


def require_files(dataset: str, folder: Path, files: list[str], archive: str | None = None) -> None:
    """Raise a DataError naming `folder` and the files expected unless all of `files` are in it."""
    missing = [name for name in files if not (folder / name).is_file()]
    if not missing:
        return
    what = f"no {dataset} files" if len(missing) == len(files) else f"{dataset} files missing ({', '.join(missing)})"
    source = f", as extracted from {archive}" if archive else ""
    raise DataError(f"data.root: {what} in '{folder}' (expected {', '.join(files)}{source}); "
                    "set data.download=true or point data.root at a folder holding them")


def _images(data) -> torch.Tensor:
    # SVHN and STL10 keep .data as a transposed (non-contiguous) numpy view (N, C, H, W).
    return torch.from_numpy(data).contiguous()


def read_torchvision(dataset_class: type, folder: Path, root: Path, download: bool, **split):
    """`dataset_class(root, download=download, **split)`; a failed download or unreadable files become a DataError."""
    # torchvision checks the MNIST file format with bare asserts, hence AssertionError.
    try:
        return dataset_class(root, download=download, **split)
    except (RuntimeError, OSError, ValueError, AssertionError) as exc:
        detail = str(exc) or "not in the expected format"
        raise DataError(f"data.root: cannot read {dataset_class.__name__} files in '{folder}' ({detail}); point "
                        "data.root at intact files, or delete them and set data.download=true") from None


def load_mnist_family(class_name: str, root: Path, download: bool) -> DatasetTensors:
    """MNIST, FashionMNIST or KMNIST (torchvision class name) from `root/<class_name>/raw`: uint8 (N, 1, 28, 28)."""
    import torchvision.datasets

    dataset_class = getattr(torchvision.datasets, class_name)
    folder = root / class_name / "raw"
    if not download:
        require_files(class_name, folder, MNIST_FILES)
    train = read_torchvision(dataset_class, folder, root, download, train=True)
    test = read_torchvision(dataset_class, folder, root, download, train=False)
    # .data is uint8 (N, 28, 28) and .targets int64 (N,): taken whole, never per sample.
    return DatasetTensors(train.data.unsqueeze(1), train.targets.long(), test.data.unsqueeze(1), test.targets.long(),
                          num_classes=len(train.classes), class_names=list(train.classes))


def load_cifar(class_name: str, root: Path, download: bool) -> DatasetTensors:
    """CIFAR10 or CIFAR100 (torchvision class name) from their extracted folder: uint8 (N, 3, 32, 32)."""
    import torchvision.datasets

    dataset_class = getattr(torchvision.datasets, class_name)
    folder = root / dataset_class.base_folder
    if not download:
        require_files(class_name, folder, CIFAR10_FILES if class_name == "CIFAR10" else CIFAR100_FILES,
                      archive=dataset_class.filename)
    train = read_torchvision(dataset_class, folder, root, download, train=True)
    test = read_torchvision(dataset_class, folder, root, download, train=False)

    def images(data) -> torch.Tensor:  # torchvision keeps CIFAR as numpy (N, H, W, C)
        return torch.from_numpy(data).permute(0, 3, 1, 2).contiguous()

    return DatasetTensors(images(train.data), torch.tensor(train.targets), images(test.data),
                          torch.tensor(test.targets), num_classes=len(train.classes), class_names=list(train.classes))


def load_svhn(root: Path, download: bool) -> DatasetTensors:
    """SVHN's train and test splits from `root/{train,test}_32x32.mat`: uint8 (N, 3, 32, 32)."""
    from torchvision.datasets import SVHN

    if not download:
        require_files("SVHN", root, SVHN_FILES)
    train = read_torchvision(SVHN, root, root, download, split="train")
    test = read_torchvision(SVHN, root, root, download, split="test")
    return DatasetTensors(_images(train.data), torch.from_numpy(train.labels), _images(test.data),
                          torch.from_numpy(test.labels), num_classes=10, class_names=[str(d) for d in range(10)])


def load_stl10(root: Path, download: bool) -> DatasetTensors:
    """STL-10 from `root/stl10_binary`: uint8 (N, 3, 96, 96), plus its 100,000 unlabelled images."""
    from torchvision.datasets import STL10

    folder = root / STL10.base_folder
    if not download:
        require_files("STL10", folder, STL10_FILES, archive=STL10.filename)
    train, test, unlabelled = (read_torchvision(STL10, folder, root, download, split=split)
                               for split in ("train", "test", "unlabeled"))
    return DatasetTensors(_images(train.data), torch.from_numpy(train.labels).long(), _images(test.data),
                          torch.from_numpy(test.labels).long(), num_classes=10, class_names=list(train.classes),
                          unlabelled_x=_images(unlabelled.data))


def load_imagefolder(root: Path, image_size: int | None = None, *, resize: str = "crop", skip_bad_files: bool = False,
                     cache_dir: Path | None = None, decoder: str = "auto") -> DatasetTensors:
    """A user's images, uint8 (N, C, H, W): classes are the sorted folder names under `root/train`.

    `root/test/<class>/` is the test split when present, otherwise a fixed stratified 20% of
    train (as for digits). Images anywhere under `root/unlabelled/` join pretraining without
    labels. Images are grey (C = 1) when every one is greyscale, RGB (C = 3) otherwise, and are
    fitted to `image_size` squared by `resize` when it is set; without it they must all share one
    size. `ptft.data.images` says what a pixel of each PIL mode becomes (16-bit, float, alpha, ...).
    Files are decoded on every core once, then mapped from the decode cache in `cache_dir`
    (`ptft.data.cache`) by every later stage, run and torchrun rank.

    Raises:
        DataError: a missing train folder, a class without (readable) images, a test class unknown
            to train, an unreadable image (unless `skip_bad_files`), a mode or pixel values with no
            meaning in 0..255, or mixed sizes without `image_size` (each names the path).
        UserError: `decoder` simplejpeg without simplejpeg installed.
    """
    if decoder == "simplejpeg" and not simplejpeg_installed():
        raise UserError(f"data.decoder: simplejpeg is not installed; install it with {JPEG_EXTRA}, or set "
                        "data.decoder to auto (simplejpeg where installed) or pil")
    classes, (train_files, train_y), (test_files, test_y), unlabelled_files = _folder_listing(root)
    files = train_files + test_files + unlabelled_files
    options = DecodeOptions(image_size, resize, skip_bad_files, decoder)
    images, bad, digests, sums = _decoded_folder(files, root, options, cache_dir)
    _require_readable_classes(root / "train", classes, train_y, bad)
    # `images` holds the readable files alone, in file order: keep their labels.
    train_y = [label for i, label in enumerate(train_y) if i not in bad]
    test_y = [label for i, label in enumerate(test_y, start=len(train_files)) if i not in bad]
    n_train, n_test = len(train_y), len(test_y)
    train_x, test_x = images[:n_train], images[n_train:n_train + n_test]
    unlabelled_x = images[n_train + n_test:] if len(images) > n_train + n_test else None
    train_y, test_y = torch.tensor(train_y, dtype=torch.long), torch.tensor(test_y, dtype=torch.long)
    # The fingerprint's content hash and data.normalize dataset read these, not the pixels.
    facts = {"row_digests": digests[:n_train], "row_sums": sums[:n_train],
             "unlabelled_row_sums": sums[n_train + n_test:] if unlabelled_x is not None else None}
    if n_test:
        return DatasetTensors(train_x, train_y, test_x, test_y, num_classes=len(classes), class_names=classes,
                              unlabelled_x=unlabelled_x, **facts)
    # Both splits stay rows of the mapped cache: gathering them would copy all of it into private memory.
    train_idx, test_idx = train_val_split(train_y, HELD_OUT_TEST_FRACTION, HELD_OUT_TEST_SEED)
    return DatasetTensors(train_x, train_y[train_idx], train_x, train_y[test_idx], num_classes=len(classes),
                          class_names=classes, unlabelled_x=unlabelled_x, train_rows=train_idx, test_rows=test_idx,
                          **facts)


def _folder_listing(root: Path) -> tuple[list[str], tuple, tuple, list[str]]:
    """(classes, (train files, labels), (test files, labels), unlabelled files) of an imagefolder root."""
    train_dir, test_dir, unlabelled_dir = root / "train", root / "test", root / "unlabelled"
    if not train_dir.is_dir():
        raise DataError(f"data.root: no 'train' folder in '{root}' (imagefolder expects {IMAGEFOLDER_LAYOUT})")
    classes = sorted(folder.name for folder in train_dir.iterdir() if folder.is_dir())
    if not classes:
        raise DataError(f"data.root: no class folders in '{train_dir}' (imagefolder expects {IMAGEFOLDER_LAYOUT})")
    test = _class_images(test_dir, classes) if test_dir.is_dir() else ([], [])
    unlabelled_files = _image_paths(unlabelled_dir) if unlabelled_dir.is_dir() else []
    return classes, _class_images(train_dir, classes), test, unlabelled_files


def _decoded_folder(files: list[str], root: Path, options: DecodeOptions,
                    cache_dir: Path | None) -> tuple[torch.Tensor, dict[int, str], torch.Tensor, torch.Tensor]:
    """(images (K, C, H, W) uint8 of the K readable files, {file index: why unreadable}, (K, 16) uint8 row
    digests, (K, C, 2) int64 row sums); skipped files listed."""
    folder = cached_decode(files, root, options, cache_dir)
    if folder.bad:
        listed = "\n".join(f"  {reason.removeprefix('data.root: ')}" for reason in folder.bad.values())
        note(f"skipped {len(folder.bad)} unreadable image(s) (data.skip_bad_files):\n{listed}")
    return (torch.from_numpy(folder.images), folder.bad, torch.from_numpy(folder.row_digests),
            torch.from_numpy(folder.row_sums))


def _require_readable_classes(train_dir: Path, classes: list[str], train_y: list[int], bad: dict) -> None:
    """Every class keeps a readable training image once the unreadable ones are skipped."""
    # Train files come first among the decoded files: index i of train_y is file i.
    readable = {label for i, label in enumerate(train_y) if i not in bad}
    for label, name in enumerate(classes):
        if label not in readable:
            raise DataError(f"data.root: no readable images in '{train_dir / name}' ({train_y.count(label)} skipped "
                            "as unreadable, data.skip_bad_files); fix or remove them")


def _image_paths(folder: Path) -> list[str]:
    """Image files under `folder`, at any depth, in sorted order (so the dataset order is stable).

    A broken link is listed too: decoding names it as unreadable (or skips it).
    """
    # os.walk reads each directory once and tells files from folders without a stat per file, and
    # plain strings skip building a Path per file: listing a large folder on a cache hit is cheap.
    found = []
    for directory, _, names in os.walk(folder, followlinks=True):
        found += [os.path.join(directory, name) for name in names
                  if os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES]
    return sorted(found, key=lambda path: path.split(os.sep))  # part by part, as Paths sort: 'a/x' < 'a-b/x'



def _class_images(split_dir: Path, classes: list[str]) -> tuple[list[str], list[int]]:
    """(files, labels) of `split_dir/<class>/...` for each of `classes`."""
    unknown = sorted({folder.name for folder in split_dir.iterdir() if folder.is_dir()} - set(classes))
    if unknown:
        raise DataError(f"data.root: class folder(s) {', '.join(unknown)} in '{split_dir}' are not in "
                        f"'{split_dir.parent / 'train'}' (classes: {', '.join(classes)})")
    files, labels = [], []
    for label, name in enumerate(classes):
        found = _image_paths(split_dir / name) if (split_dir / name).is_dir() else []
        if not found and split_dir.name == "train":
            raise DataError(f"data.root: no images in '{split_dir / name}' (expected files ending in "
                            f"{', '.join(IMAGE_SUFFIXES)})")
        files += found
        labels += [label] * len(found)
    return files, labels
