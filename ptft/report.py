"""Evaluation metrics and pictures: classification and reconstruction metrics, PNGs, metrics.json.

Metric functions take tensors from any device, move them to the CPU once and return plain
Python numbers (JSON-ready, floats rounded to 6 digits). Pictures are drawn on a
`matplotlib.figure.Figure` with the Agg canvas, so no pyplot and no global backend change.
The encoder probes live in `ptft.probes` and are re-exported here.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support
from torchvision.utils import make_grid

from ptft.probes import knn_accuracy, linear_probe_accuracy

__all__ = [
    "classification_metrics", "reconstruction_metrics", "knn_accuracy", "linear_probe_accuracy",
    "save_confusion_matrix_png", "save_reconstruction_grid_png",
    "write_metrics_json",
]

DIGITS = 6
# Per-image MSE floor: a perfect reconstruction reports 100 dB instead of infinity (not valid JSON).
MIN_MSE = 1e-10
# Above this many classes the confusion-matrix cells are too small for printed counts.
MAX_ANNOTATED_CLASSES = 30


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, class_names: list[str]) -> dict:
    """Loss, accuracy, top-5 (K > 5), per-class precision/recall/F1, macro-F1, confusion matrix.

    Classes absent from `labels` still get a per-class entry (all zeros when never predicted)
    and a confusion-matrix row; macro-F1 averages over the classes that occur in the labels or
    the predictions, so a class missing from the split does not count as a failure.

    Args:
        logits: (N, K) scores; labels: (N,) class indices in [0, K); class_names: K names.
    Returns:
        A JSON-ready dict; `confusion_matrix` rows are true classes, columns predictions.
    """
    logits = logits.detach().to("cpu", torch.float64)
    labels = labels.detach().to("cpu", torch.int64)
    num_classes = _check_classification_inputs(logits, labels, class_names)
    predictions = logits.argmax(dim=1)
    y_true, y_pred = labels.numpy(), predictions.numpy()
    all_classes = list(range(num_classes))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=all_classes, zero_division=0)
    metrics = {
        "loss": _rounded(F.cross_entropy(logits, labels)),
        "accuracy": _rounded((predictions == labels).double().mean()),
        "macro_f1": _rounded(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "per_class": {
            name: {"precision": _rounded(precision[i]), "recall": _rounded(recall[i]),
                   "f1": _rounded(f1[i]), "support": int(support[i])}
            for i, name in enumerate(class_names)
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=all_classes).tolist(),
        "num_examples": len(labels),
    }
    if num_classes > 5:
        top5 = logits.topk(5, dim=1).indices  # (N, 5)
        metrics["top5_accuracy"] = _rounded((top5 == labels[:, None]).any(dim=1).double().mean())
    return metrics


def _check_classification_inputs(logits: torch.Tensor, labels: torch.Tensor, class_names: list[str]) -> int:
    if logits.ndim != 2 or labels.shape != (len(logits),):
        raise ValueError(f"expected logits (N, K) and labels (N,), got {tuple(logits.shape)} and {tuple(labels.shape)}")
    if len(labels) == 0:
        raise ValueError("no examples to compute classification metrics on")
    num_classes = logits.shape[1]
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for {num_classes} logits per example")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{labels.min().item()}, {labels.max().item()}]")
    return num_classes


def reconstruction_metrics(inputs: torch.Tensor, reconstructions: torch.Tensor) -> dict:
    """Mean squared error and PSNR of reconstructions, images in [0, 1].

    PSNR is computed per image (data range 1.0, MSE floored at 1e-10, i.e. at most 100 dB) and
    then averaged over images, so one bad image cannot hide behind many good ones as it would
    in the PSNR of the pooled MSE.

    Args:
        inputs, reconstructions: (N, C, H, W) tensors of the same shape.
    Returns:
        {"mse", "psnr", "num_examples"}.
    """
    if inputs.shape != reconstructions.shape or len(inputs) == 0:
        raise ValueError(f"need same-shape, non-empty inputs and reconstructions, got "
                         f"{tuple(inputs.shape)} and {tuple(reconstructions.shape)}")
    inputs = inputs.detach().to("cpu", torch.float64)
    reconstructions = reconstructions.detach().to("cpu", torch.float64)
    per_image_mse = (inputs - reconstructions).square().flatten(1).mean(dim=1)  # (N,)
    per_image_psnr = 10 * torch.log10(1.0 / per_image_mse.clamp(min=MIN_MSE))
    return {"mse": _rounded(per_image_mse.mean()), "psnr": _rounded(per_image_psnr.mean()),
            "num_examples": len(inputs)}


def save_confusion_matrix_png(matrix: list[list[int]], class_names: list[str], path: str | Path,
                              title: str = "confusion matrix") -> None:
    """Draw a confusion matrix (rows true, columns predicted) as a PNG.

    Cells are coloured by the row-normalised rate (recall on the diagonal), so the picture reads
    the same under class imbalance; counts are printed in the cells up to 30 classes.
    """
    counts = np.asarray(matrix, dtype=np.int64)  # (K, K)
    num_classes = len(class_names)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    side = min(max(4.0, 0.5 * num_classes + 2.0), 16.0)
    fig = Figure(figsize=(side + 1.0, side))
    ax = fig.add_subplot()
    image = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    tick_size = 8 if num_classes <= MAX_ANNOTATED_CLASSES else 5
    ax.set_xticks(range(num_classes), class_names, rotation=90, fontsize=tick_size)
    ax.set_yticks(range(num_classes), class_names, fontsize=tick_size)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    if num_classes <= MAX_ANNOTATED_CLASSES:
        for (row, col), count in np.ndenumerate(counts):
            ax.text(col, row, str(count), ha="center", va="center", fontsize=7,
                    color="white" if rates[row, col] > 0.5 else "black")
    # Many classes: tiny tick labels need the higher resolution to stay legible.
    _save(fig, path, dpi=100 if num_classes <= MAX_ANNOTATED_CLASSES else 150)


def save_reconstruction_grid_png(inputs: torch.Tensor, reconstructions: torch.Tensor, path: str | Path,
                                 n: int = 16) -> None:
    """Save the first `n` inputs (top row) above their reconstructions (bottom row).

    Args:
        inputs, reconstructions: (N, C, H, W) with C = 1 or 3, values in [0, 1].
    """
    if inputs.shape != reconstructions.shape or inputs.ndim != 4 or inputs.shape[1] not in (1, 3):
        raise ValueError(f"expected two (N, 1|3, H, W) tensors of one shape, got "
                         f"{tuple(inputs.shape)} and {tuple(reconstructions.shape)}")
    n = min(n, len(inputs))
    pairs = torch.cat([inputs[:n], reconstructions[:n]]).detach().to("cpu", torch.float32).clamp(0, 1)
    grid = make_grid(pairs, nrow=n, padding=1, pad_value=1.0)  # (3, 2 * (H + 1) + 1, n * (W + 1) + 1)
    _, height, width = grid.shape
    fig = Figure(figsize=(min(max(width / 24, 4.0), 16.0), min(max(height / 24, 2.0), 8.0)))
    ax = fig.add_subplot()
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([height / 4, 3 * height / 4], ["input", "reconstruction"])
    ax.spines[:].set_visible(False)
    _save(fig, path)


def write_metrics_json(metrics: dict, path: str | Path) -> None:
    """Write `metrics` as indented, key-sorted JSON, atomically (temp file + rename), making parents."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as tmp:
            json.dump(metrics, tmp, indent=2, sort_keys=True)
            tmp.write("\n")
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def _save(fig: Figure, path: str | Path, dpi: int = 100) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)  # attaches itself to fig
    fig.savefig(path, format="png", dpi=dpi, bbox_inches="tight")


def _rounded(value) -> float:
    return round(float(value), DIGITS)
