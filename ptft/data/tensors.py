"""Plain containers for dataset tensors; importing this module does not import torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor


class DatasetTensors:
    """What a DATASETS builder returns: the dataset's own train/test split as CPU tensors.

    Images are (N, C, H, W), uint8 in [0, 255] or float32 in [0, 1]; labels are (N,) int64.

    A split may be rows of an array instead of an array of its own: with `train_rows` given, the
    train split is `train_x[train_rows]` (likewise test). An imagefolder without test/ holds its
    test split out of train that way, both splits rows of the one memory-mapped decode cache:
    gathering them would copy the whole cache into private memory (issue #15). build_data places
    splits as rows of `train_array` / `test_array` (`train_rows_of`) without reading them;
    `.train_x` / `.test_x` read a split's images (a copy when it is rows), for everyone else.

    Args:
        train_x, test_x: the splits' images, or (with rows) the arrays their rows are taken from.
        train_y, test_y: the splits' labels, one per row.
        train_rows, test_rows: (N,) int64 rows of `train_x` / `test_x`; None: all of it, in order.
        row_digests: (len(train_x), 16) uint8, a digest of each row of `train_x` (the decode cache's),
            or None: the data fingerprint then hashes the train split's pixels themselves.
        row_sums, unlabelled_row_sums: (len(train_x) / len(unlabelled_x), C, 2) int64, each uint8 row's
            per-channel sum and sum of squares, or None: data.normalize dataset then reads the pixels.
    """

    def __init__(self, train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, num_classes: int,
                 class_names: list[str], unlabelled_x: Tensor | None = None, *, train_rows: Tensor | None = None,
                 test_rows: Tensor | None = None, row_digests: Tensor | None = None,
                 row_sums: Tensor | None = None, unlabelled_row_sums: Tensor | None = None):
        self.train_array, self.train_rows, self.train_y = train_x, train_rows, train_y
        self.test_array, self.test_rows, self.test_y = test_x, test_rows, test_y
        self.num_classes, self.class_names = num_classes, class_names
        self.unlabelled_x = unlabelled_x  # extra images without labels (stl10's 'unlabeled' split)
        self.row_digests, self.row_sums, self.unlabelled_row_sums = row_digests, row_sums, unlabelled_row_sums

    @property
    def train_x(self) -> Tensor:
        """The train split's images (N, C, H, W), gathered (a copy) when it is rows of `train_array`."""
        return self.train_array if self.train_rows is None else self.train_array[self.train_rows]

    @property
    def test_x(self) -> Tensor:
        """The test split's images, gathered (a copy) when it is rows of `test_array`."""
        return self.test_array if self.test_rows is None else self.test_array[self.test_rows]

    def train_rows_of(self, index: Tensor | None = None) -> Tensor | None:
        """Rows of `train_array` holding the train split's examples `index` (all, in order, when None;
        None again when that is the whole array)."""
        if self.train_rows is None:
            return index
        return self.train_rows if index is None else self.train_rows[index]


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
    # (H, W) of the splits' images when they are kept larger than input_shape (data.decode_size), else None:
    # the model fits its inputs to input_shape itself (ptft.data.resize)
    stored_size: tuple[int, int] | None = None
