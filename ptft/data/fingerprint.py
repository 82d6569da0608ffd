"""The data fingerprint every checkpoint records (meta.json "data"), and what later stages check with it.

One owner for its keys: `data_fingerprint` writes them (build_data), `val_overlap_problem` reads
them. Torch-free at import, so a stage can compare fingerprints without loading any data.

    dataset          data.name
    content_sha256   the dataset's train split (images and labels) that the indices below point
                     into: the data's identity wherever data.root is. An image folder's is
                     computed from its decode cache's per-image digests (`rows_content_sha256`),
                     so a stage never reads every pixel to fingerprint them
    split_seed       data.split_seed
    val_fraction     data.val_fraction
    val_size, val_sha256              the validation split: its size and the sha256 of its index set
    labelled_size, labelled_sha256    the labelled subset, likewise
"""

from __future__ import annotations

import hashlib
import itertools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor

SPLIT_KEYS = ("split_seed", "val_fraction")  # the data.* settings that choose the validation split
BYTES_PER_CHUNK = 1 << 26  # image bytes hashed at a time: bounded memory for any dataset size


def data_fingerprint(data_cfg, content_sha256: str, val_idx: Tensor, labelled_idx: Tensor) -> dict:
    """What checkpoints record so a later stage can tell whether it sees the same examples.

    Args:
        data_cfg: the `data` config section (name, split_seed, val_fraction).
        content_sha256: the dataset's own train split's `pixels_content_sha256` or `rows_content_sha256`.
        val_idx, labelled_idx: indices into it of the validation split and the labelled subset.
    """
    return {
        "dataset": data_cfg.name,
        "content_sha256": content_sha256,
        "split_seed": data_cfg.split_seed,
        "val_fraction": data_cfg.val_fraction,
        "val_size": len(val_idx),
        "val_sha256": _index_sha256(val_idx),
        "labelled_size": len(labelled_idx),
        "labelled_sha256": _index_sha256(labelled_idx),
    }


def val_overlap_problem(parent: dict | None, child: dict) -> str | None:
    """Why a run's validation split may hold examples its parent checkpoint trained on, or None.

    Both arguments are `data` fingerprints from meta.json. Only the same data can be compared: a
    parent trained on another dataset (another name, or other content) gives None, as does one
    that recorded no validation split (foreign weights, or a ptft before fingerprints).

    Returns:
        None when the child validates on exactly the parent's validation examples; otherwise one
        message naming `data.split_seed` / `data.val_fraction`, both runs' values and, where
        a setting differs, the override that restores the parent's split.
    """
    if not parent or "val_sha256" not in parent or not _same_data(parent, child):
        return None
    if parent["val_sha256"] == child["val_sha256"]:
        return None
    # A key the parent did not record is unknown, not different.
    differing = [key for key in SPLIT_KEYS if key in parent and parent[key] != child.get(key)]
    named = " and ".join(f"data.{key}" for key in differing or SPLIT_KEYS)
    message = (f"{named}: this run's validation split of {child['dataset']} ({_split_settings(child)}) differs "
               f"from its parent checkpoint's ({_split_settings(parent)}), so it may hold examples the parent "
               "trained on")
    if not differing:  # same settings, other indices: the parent's ptft drew splits differently
        return message + "; no setting restores the parent's split (it was drawn by another ptft version)"
    fix = " ".join(f"data.{key}={parent[key]}" for key in differing)
    return f"{message}; set {fix} to validate on the parent's validation split"


def _same_data(parent: dict, child: dict) -> bool:
    if parent.get("dataset") != child.get("dataset"):
        return False
    # Fingerprints written before content_sha256 existed can only be matched by name.
    return "content_sha256" not in parent or parent["content_sha256"] == child.get("content_sha256")


def _split_settings(fingerprint: dict) -> str:
    return ", ".join(f"{key} {fingerprint.get(key, 'not recorded')}" for key in SPLIT_KEYS)


def pixels_content_sha256(x: Tensor, y: Tensor) -> str:
    """sha256 hex of images `x` (a tensor, or HostRows: anything whose `.split(n)` yields its rows in order)
    and labels `y`, on the CPU."""
    # dtype and shape first, so equal bytes of another layout do not collide; little-endian bytes,
    # so the digest is the same on every machine. Images are hashed a chunk of rows at a time: the
    # same digest as all at once, without gathering rows of a mapped cache into one copy.
    digest = hashlib.sha256(f"{x.dtype}:{tuple(x.shape)}:{y.dtype}:{tuple(y.shape)}".encode())
    row_bytes = max(1, x.shape[1:].numel() * x.dtype.itemsize)
    for tensor in itertools.chain(x.split(max(1, BYTES_PER_CHUNK // row_bytes)), [y]):  # one chunk read at a time
        array = tensor.contiguous().numpy()
        digest.update(array.astype(array.dtype.newbyteorder("<"), copy=False).data)
    return digest.hexdigest()


def rows_content_sha256(row_digests: Tensor, shape: tuple[int, ...], y: Tensor) -> str:
    """sha256 hex of images of `shape` (N, C, H, W) given as their (N, 16) uint8 row digests, and labels `y`."""
    # A prefix of its own: never equal to a pixels_content_sha256 of other data.
    digest = hashlib.sha256(f"ptft-row-digests:{tuple(shape)}:{y.dtype}:{tuple(y.shape)}".encode())
    digest.update(row_digests.contiguous().numpy().tobytes())
    digest.update(y.contiguous().numpy().astype("<i8").tobytes())
    return digest.hexdigest()


def _index_sha256(index: Tensor) -> str:
    # The set, not the order: sorted int64 little-endian bytes.
    return hashlib.sha256(index.sort().values.long().numpy().astype("<i8").tobytes()).hexdigest()
