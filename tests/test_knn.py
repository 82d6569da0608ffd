"""ptft.knn.knn_accuracy: DINO's temperature-weighted cosine k-NN, chunked, against a NumPy brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ptft.knn import knn_accuracy

NUM_CLASSES = 5


def brute_force_accuracy(train_feats, train_labels, feats, labels, k, temperature, num_classes) -> float:
    """Every query against every train row, one at a time, in float64."""
    bank = train_feats / np.linalg.norm(train_feats, axis=1, keepdims=True)
    correct = 0
    for query, label in zip(feats, labels):
        similarity = bank @ (query / np.linalg.norm(query))
        nearest = np.argsort(-similarity, kind="stable")[:min(k, len(bank))]
        votes = np.zeros(num_classes)
        for i in nearest:
            votes[train_labels[i]] += np.exp(similarity[i] / temperature)
        correct += int(np.argmax(votes) == label)
    return correct / len(feats)


def clustered_features(n: int, seed: int, dim: int = 16, spread: float = 1.5):
    """Noisy points around one random centre per class: a k-NN gets most, not all, right."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(0).normal(size=(NUM_CLASSES, dim))
    labels = rng.integers(0, NUM_CLASSES, size=n)
    return centres[labels] + spread * rng.normal(size=(n, dim)), labels


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 97, 1000])
@pytest.mark.parametrize("k, temperature", [(20, 0.07), (5, 0.5), (400, 0.07)])
def test_knn_accuracy_equals_brute_force_for_any_chunk_size(chunk_size, k, temperature):
    train_x, train_y = clustered_features(300, seed=1)
    x, y = clustered_features(97, seed=2)  # 97: most chunk sizes above do not divide it
    expected = brute_force_accuracy(train_x, train_y, x, y, k, temperature, NUM_CLASSES)
    got = knn_accuracy(torch.from_numpy(train_x), torch.from_numpy(train_y), torch.from_numpy(x),
                       torch.from_numpy(y), k=k, temperature=temperature, num_classes=NUM_CLASSES,
                       chunk_size=chunk_size)
    assert isinstance(got, float)
    assert got == expected
    assert 0.3 < expected < 0.95  # a test set the classifier neither aces nor guesses on


def test_float32_features_give_the_float64_answer():
    train_x, train_y = clustered_features(300, seed=3)
    x, y = clustered_features(200, seed=4)
    as_float32 = [torch.from_numpy(a).float() for a in (train_x, x)]
    got = knn_accuracy(as_float32[0], torch.from_numpy(train_y), as_float32[1], torch.from_numpy(y),
                       num_classes=NUM_CLASSES, chunk_size=33)
    assert got == brute_force_accuracy(train_x, train_y, x, y, 20, 0.07, NUM_CLASSES)


def test_votes_are_weighted_by_similarity_not_counted():
    # One neighbour almost on the query (class 0) and two at ~60 degrees (class 1): a plain
    # majority of k=3 says 1; exp(sim / 0.07) makes the close one outweigh both.
    train = torch.tensor([[1.0, 0.05], [0.5, 0.87], [0.5, -0.87]])
    train_labels = torch.tensor([0, 1, 1])
    query, label = torch.tensor([[1.0, 0.0]]), torch.tensor([0])
    assert knn_accuracy(train, train_labels, query, label, k=3, temperature=0.07, num_classes=2) == 1.0
    # A hot temperature flattens the weights towards a count: the majority wins again.
    assert knn_accuracy(train, train_labels, query, label, k=3, temperature=100.0, num_classes=2) == 0.0


def test_features_may_be_unflattened_maps():
    train_x, train_y = clustered_features(120, seed=5)
    x, y = clustered_features(40, seed=6)
    flat = knn_accuracy(torch.from_numpy(train_x), torch.from_numpy(train_y), torch.from_numpy(x),
                        torch.from_numpy(y), num_classes=NUM_CLASSES)
    maps = knn_accuracy(torch.from_numpy(train_x).view(120, 4, 2, 2), torch.from_numpy(train_y),
                        torch.from_numpy(x).view(40, 4, 2, 2), torch.from_numpy(y), num_classes=NUM_CLASSES)
    assert maps == flat


@pytest.mark.parametrize("bad, message", [
    (dict(k=0), "must be positive"),
    (dict(chunk_size=0), "must be positive"),
    (dict(num_classes=2), r"train labels must lie in \[0, 2\)"),
    (dict(feats=torch.zeros(3, 7)), "expected"),
    (dict(labels=torch.zeros(2, dtype=torch.int64)), "one label per feature row"),
])
def test_bad_arguments_raise_value_error_saying_what_was_expected(bad, message):
    args = dict(train_feats=torch.randn(10, 4), train_labels=torch.arange(10) % 5, feats=torch.randn(3, 4),
                labels=torch.zeros(3, dtype=torch.int64), num_classes=5)
    with pytest.raises(ValueError, match=message):
        knn_accuracy(**{**args, **bad})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_features_give_the_cpu_answer():
    train_x, train_y = clustered_features(300, seed=7)
    x, y = clustered_features(150, seed=8)
    tensors = [torch.from_numpy(a) for a in (train_x, train_y, x, y)]
    cpu = knn_accuracy(*tensors, num_classes=NUM_CLASSES, chunk_size=40)
    assert knn_accuracy(*(t.cuda() for t in tensors), num_classes=NUM_CLASSES, chunk_size=40) == cpu
