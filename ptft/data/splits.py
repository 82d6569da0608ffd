"""Stratified, seeded index splits: the validation split and the labelled subset.

Pure functions over a label tensor. The seed is `data.split_seed`, not the run seed, so a
pretrain run and every finetune run built on it see exactly the same examples.
"""

from __future__ import annotations

import torch

from ptft.errors import DataError


def train_val_split(labels: torch.Tensor, val_fraction: float, seed: int,
                    per_class: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Split example indices into train and validation, class by class.

    Args:
        labels: (N,) int64 class labels, all >= 0.
        val_fraction: share of each class that goes to validation (rounded half up per class),
            at most all but one of its examples.
        seed: seeds the choice; the same seed and labels give the same indices.
        per_class: when set, this many examples of each class go to validation instead of
            `val_fraction` (at most all but one): a validation split as small as the label budget.

    Returns:
        (train_idx, val_idx): disjoint sorted int64 index tensors that together cover 0..N-1;
        every class of `labels` has an example in train_idx.
    """
    counts = torch.bincount(labels)
    # Half of a 1-example class rounds up to all of it: the class would vanish from training and,
    # silently, from every labelled subset drawn from it.
    wanted = torch.full_like(counts, per_class) if per_class is not None else _share_of_each_class(counts, val_fraction)
    quota = torch.minimum(wanted, (counts - 1).clamp(min=0))
    val_idx, train_idx = _stratified_pick(labels, quota, seed)
    return train_idx, val_idx


def label_subset(labels: torch.Tensor, *, label_fraction: float | None = None,
                 labels_per_class: int | None = None, seed: int) -> torch.Tensor:
    """The labelled examples for finetuning: a seeded, stratified subset of `labels`' indices.

    Args:
        labels: (N,) int64 class labels of the train split.
        label_fraction: keep this share of each class (at least one example per class).
        labels_per_class: keep exactly this many examples of each class.
        seed: seeds the choice.

    Returns:
        Sorted int64 indices into `labels`; all of them when neither budget is set.

    Raises:
        DataError: both budgets set, a budget out of range, or more labels per class than
            the smallest class holds.
    """
    if label_fraction is not None and labels_per_class is not None:
        raise DataError("data.label_fraction and data.labels_per_class: set at most one of them, got "
                        f"{label_fraction!r} and {labels_per_class!r}")
    counts = torch.bincount(labels)
    present = counts > 0  # a class absent from the split asks for nothing
    if label_fraction is not None:
        if not 0.0 < label_fraction <= 1.0:
            raise DataError(f"data.label_fraction: expected a number in (0, 1], got {label_fraction!r}")
        quota = _share_of_each_class(counts, label_fraction).clamp(min=1) * present
    elif labels_per_class is not None:
        _check_labels_per_class(labels_per_class, counts, present)
        quota = torch.full_like(counts, labels_per_class) * present
    else:
        return torch.arange(len(labels))
    return _stratified_pick(labels, quota, seed)[0]


def _share_of_each_class(counts: torch.Tensor, fraction: float) -> torch.Tensor:
    # Half up (not torch.round's half to even): 45 examples at 0.1 give 5, as people expect.
    return torch.floor(counts.double() * fraction + 0.5).long()


def _check_labels_per_class(labels_per_class: int, counts: torch.Tensor, present: torch.Tensor) -> None:
    if labels_per_class < 1:
        raise DataError(f"data.labels_per_class: expected an integer >= 1, got {labels_per_class!r}")
    smallest = int(torch.where(present, counts, counts.max()).argmin())
    if labels_per_class > counts[smallest]:
        raise DataError(f"data.labels_per_class: {labels_per_class} is more than the smallest class of the "
                        f"train split holds (class {smallest} has {int(counts[smallest])} examples)")


def _stratified_pick(labels: torch.Tensor, quota: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(picked, rest): a random `quota[c]` indices of each class c, and all the others, both sorted."""
    generator = torch.Generator().manual_seed(seed)
    labels = labels.cpu()
    shuffled = torch.randperm(len(labels), generator=generator)
    # A stable sort by label keeps the random order within each class: grouped is (N,) indices,
    # class 0's first (in random order), then class 1's, ...
    sorted_labels, order = torch.sort(labels[shuffled], stable=True)
    grouped = shuffled[order]
    counts = torch.bincount(labels, minlength=len(quota))
    class_start = torch.cumsum(counts, 0) - counts
    rank_in_class = torch.arange(len(labels)) - class_start[sorted_labels]
    picked = rank_in_class < quota[sorted_labels]
    return grouped[picked].sort().values, grouped[~picked].sort().values
