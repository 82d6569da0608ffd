"""Evaluation metrics, probes, pictures and metrics.json: exact answers on hand-made inputs."""

from __future__ import annotations

import json
import sys
import warnings

import matplotlib
import matplotlib.image
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ptft import report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def one_hot_logits(predictions: list[int], num_classes: int) -> torch.Tensor:
    """(N, K) logits whose argmax is `predictions`, with distinct non-trivial values for the loss."""
    logits = torch.linspace(-1.0, 1.0, num_classes).repeat(len(predictions), 1)
    logits[torch.arange(len(predictions)), predictions] = 3.0
    return logits


def read_png(path) -> np.ndarray:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)  # (H, W, 3|4) floats in [0, 1]
    assert image.ndim == 3 and image.shape[0] > 0 and image.shape[1] > 0
    return image


# ---- classification ------------------------------------------------------------------------------

def test_classification_metrics_known_answers():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    logits = one_hot_logits([0, 1, 1, 1, 2, 0], 3)
    metrics = report.classification_metrics(logits, labels, ["a", "b", "c"])

    assert metrics["num_examples"] == 6
    assert metrics["accuracy"] == pytest.approx(4 / 6, abs=1e-6)
    assert metrics["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert metrics["per_class"]["a"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert metrics["per_class"]["b"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2},
                                                      abs=1e-6)
    assert metrics["per_class"]["c"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2},
                                                      abs=1e-6)
    assert metrics["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3, abs=1e-6)
    assert metrics["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), abs=1e-6)
    assert "top5_accuracy" not in metrics
    assert json.loads(json.dumps(metrics)) == metrics  # plain Python types only


def test_top5_only_above_five_classes():
    five_classes = report.classification_metrics(one_hot_logits([0], 5), torch.tensor([0]), list("abcde"))
    assert "top5_accuracy" not in five_classes
    # Every row ranks class 0 first and class 6 last; true classes at ranks 0, 4, 5, 6.
    logits = -torch.arange(7.0).repeat(4, 1)
    metrics = report.classification_metrics(logits, torch.tensor([0, 4, 5, 6]), list("abcdefg"))
    assert metrics["accuracy"] == 0.25
    assert metrics["top5_accuracy"] == 0.5


def test_classes_absent_from_split_neither_warn_nor_count():
    labels = torch.tensor([0, 1, 2, 2])
    logits = one_hot_logits([0, 1, 3, 2], 5)  # class 3 predicted but absent; class 4 never seen at all
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metrics = report.classification_metrics(logits.requires_grad_(), labels, list("abcde"))
    assert metrics["per_class"]["d"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert metrics["per_class"]["e"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert metrics["confusion_matrix"][2] == [0, 0, 1, 1, 0]
    assert metrics["confusion_matrix"][4] == [0, 0, 0, 0, 0]
    # Macro over the classes seen in labels or predictions (a, b, c, d), not the unseen e.
    assert metrics["macro_f1"] == pytest.approx((1 + 1 + 2 / 3 + 0) / 4, abs=1e-6)


def test_classification_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="class names"):
        report.classification_metrics(torch.zeros(2, 3), torch.tensor([0, 1]), ["a", "b"])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        report.classification_metrics(torch.zeros(2, 3), torch.tensor([0, 3]), ["a", "b", "c"])


def test_classification_tally_over_batches_equals_sklearn_on_the_whole_split():
    from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

    generator = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(103, 7, generator=generator), torch.randint(0, 6, (103,), generator=generator)
    tally = report.ClassificationTally(list("abcdefg"))
    for start in range(0, 103, 10):  # ragged last batch
        tally.add(logits[start:start + 10], labels[start:start + 10])
    metrics = tally.metrics()
    y_true, y_pred = labels.numpy(), logits.argmax(1).numpy()
    precision, recall, f1, _ = precision_recall_fscore_support(y_true, y_pred, labels=range(7), zero_division=0)
    assert metrics["confusion_matrix"] == confusion_matrix(y_true, y_pred, labels=range(7)).tolist()
    assert metrics["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro", zero_division=0), abs=1e-6)
    assert [metrics["per_class"][c]["f1"] for c in "abcdefg"] == pytest.approx(f1, abs=1e-6)
    assert [metrics["per_class"][c]["precision"] for c in "abcdefg"] == pytest.approx(precision, abs=1e-6)
    assert [metrics["per_class"][c]["recall"] for c in "abcdefg"] == pytest.approx(recall, abs=1e-6)
    assert metrics["loss"] == pytest.approx(F.cross_entropy(logits.double(), labels).item(), abs=1e-6)
    assert metrics == report.classification_metrics(logits, labels, list("abcdefg"))


def test_reconstruction_tally_over_batches_equals_the_whole_split_and_keeps_only_the_pictured():
    generator = torch.Generator().manual_seed(0)
    inputs, recon = torch.rand(50, 1, 4, 4, generator=generator), torch.rand(50, 1, 4, 4, generator=generator)
    tally = report.ReconstructionTally(keep=16)
    for start in range(0, 50, 7):
        tally.add(inputs[start:start + 7], recon[start:start + 7])
    assert tally.metrics() == pytest.approx(report.reconstruction_metrics(inputs, recon), abs=1e-6)
    assert sum(len(x) for x in tally.inputs) == 16 and torch.equal(torch.cat(tally.inputs), inputs[:16])


# ---- reconstruction ------------------------------------------------------------------------------

def test_psnr_of_known_mse():
    inputs = torch.zeros(3, 1, 4, 4)
    metrics = report.reconstruction_metrics(inputs, torch.full_like(inputs, 0.1))
    assert metrics == {"mse": pytest.approx(0.01, abs=1e-9), "psnr": pytest.approx(20.0, abs=1e-6),
                       "num_examples": 3}


def test_psnr_is_averaged_per_image_and_capped():
    inputs = torch.zeros(2, 3, 2, 2)
    recon = torch.stack([torch.full((3, 2, 2), 0.1), torch.full((3, 2, 2), 0.01)])  # 20 dB and 40 dB
    metrics = report.reconstruction_metrics(inputs, recon)
    assert metrics["psnr"] == pytest.approx(30.0, abs=1e-6)
    assert metrics["mse"] == pytest.approx((0.01 + 0.0001) / 2, abs=1e-9)
    assert report.reconstruction_metrics(inputs, inputs)["psnr"] == pytest.approx(100.0)  # finite, JSON-safe


# ---- probes --------------------------------------------------------------------------------------

def clusters(per_class: int, num_classes: int = 4, dim: int = 16, seed: int = 0):
    """Well-separated Gaussian clusters, pointing in different directions (for cosine k-NN)."""
    generator = torch.Generator().manual_seed(seed)
    centres = 10 * torch.randn(num_classes, dim, generator=generator)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    return centres[labels] + torch.randn(len(labels), dim, generator=generator), labels


@pytest.mark.parametrize("probe", ["knn", "linear"])
def test_probes_separate_clusters_and_are_deterministic(probe):
    def accuracy(*args):
        if probe == "knn":
            return report.knn_accuracy(*args)
        return report.linear_probe_accuracy(*args, seed=0)

    train, test = clusters(20, seed=1), clusters(20, seed=1)
    test = (test[0] + 0.1 * torch.randn(test[0].shape, generator=torch.Generator().manual_seed(2)), test[1])
    assert accuracy(*train, *test) == 1.0

    # Shuffled labels on pure noise: chance (0.25) within sampling error, and the same every time.
    generator = torch.Generator().manual_seed(3)
    noise = [torch.randn(400, 16, generator=generator) for _ in range(2)]
    noise_labels = [torch.randint(0, 4, (400,), generator=generator) for _ in range(2)]
    args = (noise[0], noise_labels[0], noise[1], noise_labels[1])
    chance = accuracy(*args)
    assert 0.15 < chance < 0.35
    assert accuracy(*args) == chance


def test_knn_with_fewer_examples_than_k_votes_by_distance():
    # One label per class, k=20 > 4 examples: a majority vote would tie everywhere.
    (train_x, train_y), (test_x, test_y) = clusters(1, seed=1), clusters(10, seed=1)
    assert report.knn_accuracy(train_x, train_y, test_x, test_y, k=20) == 1.0


def test_linear_probe_with_a_single_train_class_predicts_it():
    feats = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    accuracy = report.linear_probe_accuracy(feats, torch.zeros(4, dtype=torch.long), feats,
                                            torch.tensor([0, 0, 0, 1]), seed=0)
    assert accuracy == 0.75


# ---- pictures ------------------------------------------------------------------------------------

@pytest.fixture
def no_pyplot_no_backend_change():
    backend, had_pyplot = matplotlib.get_backend(), "matplotlib.pyplot" in sys.modules
    yield
    assert matplotlib.get_backend() == backend
    assert ("matplotlib.pyplot" in sys.modules) == had_pyplot


@pytest.mark.parametrize("num_classes", [10, 100])
def test_confusion_matrix_png(tmp_path, num_classes, no_pyplot_no_backend_change):
    generator = torch.Generator().manual_seed(0)
    matrix = torch.randint(0, 50, (num_classes, num_classes), generator=generator).tolist()
    matrix[0] = [0] * num_classes  # a class absent from the split
    path = tmp_path / "sub" / "confusion.png"
    report.save_confusion_matrix_png(matrix, [f"class_{i}" for i in range(num_classes)], path, title="cm")
    read_png(path)


@pytest.mark.parametrize("channels", [1, 3])
def test_reconstruction_grid_png_inputs_above_reconstructions(tmp_path, channels, no_pyplot_no_backend_change):
    inputs, recon = torch.zeros(5, channels, 8, 8), torch.ones(5, channels, 8, 8)  # black above white
    path = tmp_path / "grid.png"
    report.save_reconstruction_grid_png(inputs, recon, path, n=16)  # n above N: all 5 shown
    image = read_png(path)[..., :3].mean(axis=2)  # (H, W) grey levels
    black_rows = np.flatnonzero((image < 0.1).mean(axis=1) > 0.5)
    assert len(black_rows) > 0 and black_rows.max() < image.shape[0] / 2


# ---- metrics.json --------------------------------------------------------------------------------

def test_write_metrics_json_round_trip_is_atomic(tmp_path):
    path = tmp_path / "eval" / "test" / "metrics.json"
    metrics = {"zeta": 1, "accuracy": 0.5, "per_class": {"b": {"f1": 0.25}, "a": {"f1": 1.0}}}
    report.write_metrics_json(metrics, path)
    text = path.read_text()
    assert json.loads(text) == metrics
    assert text.index('"accuracy"') < text.index('"per_class"') < text.index('"zeta"')  # sorted keys
    assert '\n  "accuracy": 0.5' in text  # indent 2
    assert sorted(p.name for p in path.parent.iterdir()) == ["metrics.json"]

    with pytest.raises(TypeError):
        report.write_metrics_json({"bad": object()}, path)
    assert json.loads(path.read_text()) == metrics  # the old file survives a failed write
    assert sorted(p.name for p in path.parent.iterdir()) == ["metrics.json"]
