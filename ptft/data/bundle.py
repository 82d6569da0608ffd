"""`build_data`: a dataset from the registry, split by `data.split_seed`, the splits a stage reads placed once."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import torch

from ptft.data import DATASETS
from ptft.data.fingerprint import data_fingerprint, pixels_content_sha256, rows_content_sha256
from ptft.data.normalize import normalization_stats
from ptft.data.placement import SPLITS, host_rows, place_splits
from ptft.data.splits import label_subset, train_val_split
from ptft.data.tensors import DataBundle, DatasetTensors, TensorSplit
from ptft.errors import DataError


def build_data(data_cfg, device: torch.device | str, *, reads: Iterable[str] = SPLITS) -> DataBundle:
    """Load `data_cfg.name`, split it and place the splits named in `reads` for `device`.

    The validation split and the labelled subset are drawn with `data_cfg.split_seed`, not
    the run seed, so pretraining and every finetune on top of it see the same examples.
    Images keep their stored dtype (uint8 stays uint8); batches convert them to float. Splits
    in `reads` go where data.placement says (ptft.data.placement); the others are not moved
    at all: they stay as rows of the dataset's own arrays (a mapped cache is not even read),
    read onto `device` batch by batch if something does read them.

    Args:
        data_cfg: the `data` config section (name, root, download, val_fraction,
            split_seed, label_fraction, labels_per_class, placement).
        device: the training device.
        reads: the splits the caller reads: "unlabelled", "labelled", "val", "test" (all by default).

    Returns:
        DataBundle with unlabelled / labelled / val / test splits, a fingerprint of them and
        data.normalize's numbers.

    Raises:
        UserError: unknown dataset name. DataError: missing files, a label budget the data
            cannot meet, or a validation fraction that rounds to no validation examples.
    """
    name = data_cfg.name
    tensors: DatasetTensors = DATASETS.get(name)(Path(data_cfg.root).expanduser(), data_cfg.download,
                                                 **_image_options(name, data_cfg))
    train_idx, val_idx, labelled_idx = _split_indices(name, tensors.train_y, data_cfg)
    unlabelled = _unlabelled_examples(tensors, train_idx, device)
    # Without a budget the labelled split is the train split: share its rows, not a copy.
    shares_unlabelled = tensors.unlabelled_x is None and torch.equal(labelled_idx, train_idx)
    bundle = DataBundle(
        unlabelled=unlabelled,
        labelled=unlabelled if shares_unlabelled else _examples(tensors, labelled_idx, device),
        val=_examples(tensors, val_idx, device),
        test=TensorSplit(host_rows([tensors.test_array], tensors.test_rows, device), tensors.test_y),
        num_classes=tensors.num_classes, class_names=list(tensors.class_names),
        **_shapes(tensors, data_cfg),
        fingerprint=data_fingerprint(data_cfg, _train_content_sha256(tensors), val_idx, labelled_idx),
        # On the train split (and unlabelled images): what pretraining sees, whatever the label budget,
        # so a finetune on the same data computes the same numbers.
        normalization=normalization_stats(data_cfg.normalize, unlabelled.x, _unlabelled_row_sums(tensors, train_idx)),
    )
    return place_splits(bundle, reads, device, data_cfg.placement)


def _split_indices(name: str, train_y: torch.Tensor, data_cfg) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train, val, labelled) indices into the dataset's train set, drawn with data.split_seed."""
    train_idx, val_idx = train_val_split(train_y, data_cfg.val_fraction, data_cfg.split_seed,
                                         per_class=data_cfg.val_labels_per_class)
    if len(val_idx) == 0:
        raise _no_validation_examples(name, data_cfg.val_fraction, train_y)
    # (L,) with L <= len(train_idx).
    labelled_idx = train_idx[label_subset(train_y[train_idx], label_fraction=data_cfg.label_fraction,
                                          labels_per_class=data_cfg.labels_per_class, seed=data_cfg.split_seed)]
    return train_idx, val_idx, labelled_idx


def _no_validation_examples(name: str, val_fraction: float, train_y: torch.Tensor) -> DataError:
    largest = int(torch.bincount(train_y).max())
    if largest < 2:
        return DataError(f"data.val_fraction: {name}'s train split holds one example per class, and each class keeps "
                         "one for training: none is left for validation; add examples")
    # The largest class gives one example once largest * f rounds half up to 1: f >= 0.5 / largest.
    at_least = math.ceil(50 / largest) / 100
    return DataError(f"data.val_fraction: {val_fraction} takes no validation examples from {name}'s {len(train_y)} "
                     f"training examples (each class gives round({val_fraction} x its size), at most all but one, "
                     f"and the largest class has {largest}); set data.val_fraction to at least {at_least}")


def _image_options(name: str, data_cfg) -> dict:
    """The data.* keys of the builders that decode image files (registered with image_size=True;
    config validation refuses image_size for the rest)."""
    if not DATASETS.meta(name).get("image_size"):
        return {}
    return {"image_size": data_cfg.decode_size or data_cfg.image_size, "resize": data_cfg.resize,
            "skip_bad_files": data_cfg.skip_bad_files,
            "cache_dir": data_cfg.cache_dir, "decoder": data_cfg.decoder}


def _shapes(tensors: DatasetTensors, data_cfg) -> dict:
    """DataBundle's input_shape, the (C, H, W) the model takes (the stored images', or data.image_size squared
    below a data.decode_size), and stored_size, the images' (H, W) when larger than that, else None."""
    channels, *stored = tensors.train_array.shape[1:]
    if data_cfg.decode_size is None or data_cfg.decode_size == data_cfg.image_size:
        return {"input_shape": (channels, *stored), "stored_size": None}
    return {"input_shape": (channels, data_cfg.image_size, data_cfg.image_size), "stored_size": tuple(stored)}


def _unlabelled_row_sums(tensors: DatasetTensors, train_idx: torch.Tensor) -> torch.Tensor | None:
    """The unlabelled split's row sums (as `_unlabelled_examples` orders its rows), or None without them."""
    if tensors.row_sums is None or (tensors.unlabelled_x is not None and tensors.unlabelled_row_sums is None):
        return None
    sums = tensors.row_sums[tensors.train_rows_of(train_idx)]
    return sums if tensors.unlabelled_x is None else torch.cat([sums, tensors.unlabelled_row_sums])


def _train_content_sha256(tensors: DatasetTensors) -> str:
    """The train split's content hash: from its row digests when the builder has them (an image folder's
    decode cache: no pixel is read), else from its pixels, a chunk at a time (HostRows over its rows)."""
    rows = tensors.train_rows_of()
    if tensors.row_digests is not None:
        digests = tensors.row_digests if rows is None else tensors.row_digests[rows]
        return rows_content_sha256(digests, (len(digests), *tensors.train_array.shape[1:]), tensors.train_y)
    images = tensors.train_array if rows is None else host_rows([tensors.train_array], rows, "cpu")
    return pixels_content_sha256(images, tensors.train_y)


def _examples(tensors: DatasetTensors, index: torch.Tensor, device) -> TensorSplit:
    """Examples `index` of the train split, not read: HostRows bound for `device`, labels on the CPU."""
    return TensorSplit(host_rows([tensors.train_array], tensors.train_rows_of(index), device), tensors.train_y[index])


def _unlabelled_examples(tensors: DatasetTensors, train_idx: torch.Tensor, device) -> TensorSplit:
    """The train split followed by the dataset's extra unlabelled images (labelled -1), not read."""
    if tensors.unlabelled_x is None:
        return _examples(tensors, train_idx, device)
    start = len(tensors.train_array)  # the extra images' rows follow the train array's in the concatenation
    extra = torch.arange(start, start + len(tensors.unlabelled_x))
    no_label = torch.full((len(tensors.unlabelled_x),), -1, dtype=torch.long)
    rows = torch.cat([tensors.train_rows_of(train_idx), extra])
    return TensorSplit(host_rows([tensors.train_array, tensors.unlabelled_x], rows, device),
                       torch.cat([tensors.train_y[train_idx], no_label]))
