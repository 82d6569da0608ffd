"""How good are an encoder's features? k-NN and linear-probe accuracy on frozen features.

Both fit on the labelled train features and score on a held-out split. `encode` gathers an
encoder's features batch by batch into half precision on the CPU (a 200k-image split of 512-d
features is 200 MB there, not gigabytes on the device); the probes hand them to scikit-learn
as float64.
"""

from __future__ import annotations

import numpy as np
import torch

from ptft.data.batches import to_float

# scikit-learn is imported inside the probes: importing it costs about a second, which
# predict / embed / export (importing ptft.evaluation, which imports this module) never need.

# Features are stored in this dtype: half the bytes of float32; 11 significant bits are plenty
# for nearest neighbours and a standardised linear probe.
FEATURE_DTYPE = torch.float16
# Larger than this magnitude, float16 would turn a feature into inf: kept finite instead.
_FP16_MAX = torch.finfo(torch.float16).max

# lbfgs on standardised features converges well within this on the datasets ptft ships; a fixed
# cap keeps the probe's cost and its result independent of how hard a given run is to fit.
PROBE_MAX_ITER = 1000


@torch.inference_mode()
def encode(encoder: torch.nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(N, D) features of the images `x` (N, C, H, W), float16 on the CPU, one batch at a time.

    The result is allocated once at its final size: no per-batch list to concatenate, whose
    copy would hold the features twice.
    """
    features = None
    for start in range(0, len(x), batch_size):
        batch = encoder(to_float(x[start:start + batch_size])).float().flatten(1)  # (B, D)
        if features is None:
            features = torch.empty(len(x), batch.shape[1], dtype=FEATURE_DTYPE)
        features[start:start + len(batch)] = batch.clamp_(-_FP16_MAX, _FP16_MAX).cpu()
    if features is None:
        raise ValueError("no examples to encode")
    return features


def knn_accuracy(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, k: int = 20) -> float:
    """Accuracy of a cosine k-nearest-neighbour classifier on frozen features.

    Neighbours vote weighted by 1 / cosine distance, so that when k is close to the number of
    labelled examples (a few labels per class) the vote is not a tie between whole classes.
    k is capped at the number of train examples.

    Args:
        train_feats: (N, D) features of the labelled examples; train_labels: (N,) class indices.
        test_feats: (M, D) features to classify; test_labels: (M,) their classes.
        k: neighbours consulted per test example.
    Returns:
        Fraction of test examples classified correctly, rounded to 6 digits.
    """
    from sklearn.neighbors import KNeighborsClassifier

    x_train, y_train, x_test, y_test = _to_numpy(train_feats, train_labels, test_feats, test_labels)
    knn = KNeighborsClassifier(n_neighbors=min(k, len(x_train)), metric="cosine", weights="distance",
                               algorithm="brute")
    knn.fit(x_train, y_train)
    return round(float(np.mean(knn.predict(x_test) == y_test)), 6)


def linear_probe_accuracy(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                          test_labels: torch.Tensor, seed: int) -> float:
    """Accuracy of a logistic-regression probe on standardised frozen features.

    Deterministic: lbfgs has no randomness, and the seed is passed on for completeness.
    A train set holding a single class predicts that class everywhere (nothing to separate).

    Args:
        train_feats: (N, D) features of the labelled examples; train_labels: (N,) class indices.
        test_feats: (M, D) features to classify; test_labels: (M,) their classes.
        seed: the run's seed.
    Returns:
        Fraction of test examples classified correctly, rounded to 6 digits.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x_train, y_train, x_test, y_test = _to_numpy(train_feats, train_labels, test_feats, test_labels)
    classes = np.unique(y_train)
    if len(classes) == 1:
        return round(float(np.mean(y_test == classes[0])), 6)
    probe = make_pipeline(StandardScaler(),
                          LogisticRegression(max_iter=PROBE_MAX_ITER, random_state=seed))
    probe.fit(x_train, y_train)
    return round(float(np.mean(probe.predict(x_test) == y_test)), 6)


def _to_numpy(train_feats, train_labels, test_feats, test_labels) -> tuple[np.ndarray, ...]:
    if len(train_feats) != len(train_labels) or len(test_feats) != len(test_labels):
        raise ValueError(f"features and labels differ in length: train {len(train_feats)} vs {len(train_labels)}, "
                         f"test {len(test_feats)} vs {len(test_labels)}")
    if len(train_feats) == 0 or len(test_feats) == 0:
        raise ValueError("a probe needs at least one train and one test example")
    feats = [t.detach().to("cpu", torch.float64).flatten(1).numpy() for t in (train_feats, test_feats)]
    labels = [t.detach().to("cpu", torch.int64).numpy() for t in (train_labels, test_labels)]
    return feats[0], labels[0], feats[1], labels[1]
