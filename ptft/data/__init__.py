"""The DATASETS registry and `build_data`, the one entry point stages use.

A builder is `fn(root: Path, download: bool) -> DatasetTensors` (CPU tensors); one registered
with `image_size=True` decodes image files and also takes data.image_size, data.resize,
data.skip_bad_files, data.cache_dir and data.decoder as keywords. Builders
import torch, torchvision and scikit-learn inside their body, and `build_data` is imported
on first use, so listing datasets never imports torch.
"""

from __future__ import annotations

from pathlib import Path

from ptft.data.tensors import DatasetTensors, DataBundle, TensorSplit
from ptft.errors import DataError
from ptft.registry import Registry

DATASETS = Registry("dataset")

__all__ = ["DATASETS", "DataBundle", "DatasetTensors", "TensorSplit", "build_data"]


def __getattr__(name: str):
    # build_data needs torch: importing it lazily keeps `import ptft.data` torch-free.
    if name == "build_data":
        from ptft.data.bundle import build_data

        return build_data
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# pixel_levels: sklearn's digits count pixels 0..16 (sources.load_digits divides by 16), so
# predict quantises a user's 8-bit image to the same 17 levels the model was trained on.
@DATASETS.register(description="scikit-learn's 1,797 8x8 handwritten digits (offline; fixed 20% test split)",
                   pixel_levels=16)
def digits(root: Path, download: bool) -> DatasetTensors:
    from ptft.data import sources

    return sources.load_digits()


@DATASETS.register(description="10 classes of noisy 8x8 prototypes, 500 train / 200 test (for tests)")
def synthetic(root: Path, download: bool) -> DatasetTensors:
    from ptft.data import sources

    return sources.make_synthetic()


@DATASETS.register(description="MNIST handwritten digits, 28x28 grey (torchvision)")
def mnist(root: Path, download: bool) -> DatasetTensors:
    from ptft.data import sources

    return sources.load_mnist_family("MNIST", root, download)


@DATASETS.register(description="Fashion-MNIST clothing, 28x28 grey (torchvision)")
def fashion_mnist(root: Path, download: bool) -> DatasetTensors:
    from ptft.data import sources

    return sources.load_mnist_family("FashionMNIST", root, download)


@DATASETS.register(description="Kuzushiji-MNIST cursive Japanese, 28x28 grey (torchvision)")
def kmnist(root: Path, download: bool) -> DatasetTensors:
    from ptft.data import sources

    return sources.load_mnist_family("KMNIST", root, download)


@DATASETS.register(description="CIFAR-10 objects, 32x32 colour (torchvision)")
def cifar10(root: Path, download: bool) -> DatasetTensors:
    from ptft.data import sources

    return sources.load_cifar("CIFAR10", root, download)


@DATASETS.register(description="CIFAR-100 objects, 32x32 colour, 100 classes (torchvision)")
def cifar100(root: Path, download: bool) -> DatasetTensors:
    from ptft.data import sources

    return sources.load_cifar("CIFAR100", root, download)


@DATASETS.register(description="SVHN house-number digits, 32x32 colour (torchvision)")
def svhn(root: Path, download: bool) -> DatasetTensors:
    from ptft.data import sources

    return sources.load_svhn(root, download)


@DATASETS.register(description="STL-10 objects, 96x96 colour, plus 100,000 unlabelled images (torchvision)")
def stl10(root: Path, download: bool) -> DatasetTensors:
    from ptft.data import sources

    return sources.load_stl10(root, download)


@DATASETS.register(description="your own images: ROOT/train/<class>/*, optional test/<class>/* and unlabelled/*",
                   image_size=True)
def imagefolder(root: Path, download: bool, image_size: int | None = None, resize: str = "crop",
                skip_bad_files: bool = False, cache_dir: str | None = None, decoder: str = "auto") -> DatasetTensors:
    from ptft.data import sources

    if download:
        raise DataError(f"data.download: imagefolder reads your own files in '{root}' and cannot download them; "
                        "set data.download=false")
    return sources.load_imagefolder(root, image_size, resize=resize, skip_bad_files=skip_bad_files,
                                    cache_dir=cache_dir, decoder=decoder)
