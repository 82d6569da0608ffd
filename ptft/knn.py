"""k-NN accuracy of features, on their own device in chunks: the online monitor of label-free pretraining.

The classifier is DINO's weighted k-NN (Wu et al. 2018, as `eval_knn.py` in facebookresearch/dino
runs it): cosine similarity to the labelled features, the k most similar vote for their class with
weight exp(similarity / T), and the class with the largest summed weight wins. Queries go in chunks
of `chunk_size`, so memory is bounded by chunk_size x N similarities (plus chunk_size x k x C votes)
whatever the size of the query set, and nothing leaves the device but the final count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# 1024 queries x 60,000 MNIST train features x 4 bytes: a 245 MB similarity block at most.
DEFAULT_CHUNK_SIZE = 1024


@torch.no_grad()
def knn_accuracy(train_feats: torch.Tensor, train_labels: torch.Tensor, feats: torch.Tensor, labels: torch.Tensor,
                 *, k: int = 20, temperature: float = 0.07, num_classes: int,
                 chunk_size: int = DEFAULT_CHUNK_SIZE) -> float:
    """Fraction of `feats` that a temperature-weighted cosine k-NN over `train_feats` classifies right.

    Args:
        train_feats: (N, D) features of the labelled examples; train_labels: (N,) class indices.
        feats: (M, D) features to classify, on the same device; labels: (M,) their classes.
        k: neighbours consulted per query, capped at N.
        temperature: T in the vote weight exp(cosine similarity / T); smaller trusts the nearest more.
        num_classes: C, the number of classes (labels lie in [0, C)).
        chunk_size: queries scored at once.
    Returns:
        The accuracy as a Python float (a tie between classes goes to the lowest class index).
    Raises:
        ValueError: mismatched shapes, labels outside [0, C), empty sets or non-positive k, T, chunk_size.
    """
    _check(train_feats, train_labels, feats, labels, k, temperature, num_classes, chunk_size)
    # Compute in fp32 at least: bf16 similarities would tie neighbours that differ.
    dtype = torch.promote_types(train_feats.dtype, torch.float32)
    bank = F.normalize(train_feats.to(dtype).flatten(1), dim=1)  # (N, D)
    k = min(k, len(bank))
    correct = torch.zeros((), dtype=torch.int64, device=feats.device)
    for start in range(0, len(feats), chunk_size):
        queries = F.normalize(feats[start:start + chunk_size].to(dtype).flatten(1), dim=1)  # (B, D)
        similarity, neighbours = (queries @ bank.T).topk(k, dim=1)  # (B, k) each
        votes = torch.zeros(len(queries), num_classes, dtype=dtype, device=queries.device)  # (B, C)
        votes.scatter_add_(1, train_labels[neighbours], (similarity / temperature).exp())
        correct += (votes.argmax(dim=1) == labels[start:start + chunk_size]).sum()
    return correct.item() / len(feats)


def _check(train_feats, train_labels, feats, labels, k, temperature, num_classes, chunk_size) -> None:
    if train_feats.ndim < 2 or feats.ndim < 2 or train_feats.shape[1:] != feats.shape[1:]:
        raise ValueError(f"expected (N, D) and (M, D) features, got {tuple(train_feats.shape)} and "
                         f"{tuple(feats.shape)}")
    if train_labels.shape != (len(train_feats),) or labels.shape != (len(feats),):
        raise ValueError(f"expected one label per feature row, got {tuple(train_labels.shape)} labels for "
                         f"{len(train_feats)} train rows and {tuple(labels.shape)} for {len(feats)} rows")
    if len(train_feats) == 0 or len(feats) == 0:
        raise ValueError("k-NN needs at least one train and one query feature")
    if min(k, temperature, num_classes, chunk_size) <= 0:
        raise ValueError(f"k, temperature, num_classes and chunk_size must be positive, got "
                         f"{k}, {temperature}, {num_classes}, {chunk_size}")
    low, high = int(train_labels.min()), int(train_labels.max())
    if low < 0 or high >= num_classes:
        raise ValueError(f"train labels must lie in [0, {num_classes}), got [{low}, {high}]")
