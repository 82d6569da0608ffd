"""Plain containers for dataset tensors; importing this module does not import torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor


@dataclass
class DatasetTensors:
    """What a DATASETS builder returns: the dataset's own train/test split as CPU tensors.

    Images are (N, C, H, W), uint8 in [0, 255] or float32 in [0, 1]; labels are (N,) int64.
    """

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    class_names: list[str]
    unlabelled_x: Tensor | None = None  # extra images without labels (stl10's 'unlabeled' split)


@dataclass
class TensorSplit:
    """Images x (N, C, H, W) and labels y (N,) int64, on the training device; -1 marks no label."""

    x: Tensor
    y: Tensor


@dataclass
class DataBundle:
    """Every split of the dataset, plus the facts recorded in checkpoints. The splits a stage reads are
    placed (ptft.data.placement: on the device, or host rows batched over); the others stay host rows."""

    unlabelled: TensorSplit  # all train-split examples (labels kept, for k-NN / probes) + unlabelled_x
    labelled: TensorSplit  # the labelled subset of the train split (all of it when no budget is set)
    val: TensorSplit  # seeded stratified split of the dataset's train set (by data.split_seed)
    test: TensorSplit  # the dataset's own test split (digits: a fixed stratified 20%)
    num_classes: int
    class_names: list[str]
    input_shape: tuple[int, int, int]  # (C, H, W)
    fingerprint: dict  # see ptft.data.fingerprint: dataset identity, split settings, index-set hashes
    # data.normalize's numbers, {"mean": [C], "std": [C]} for pixels in [0, 1], or None (ptft.data.normalize)
    normalization: dict | None = None
