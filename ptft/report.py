"""Evaluation metrics and pictures: classification and reconstruction metrics, PNGs, metrics.json.

Metrics stream: a tally takes batches from any device, keeps sums and counts on the CPU (never
the whole split) and returns plain Python numbers (JSON-ready, floats rounded to 6 digits). Pictures are drawn on a
`matplotlib.figure.Figure` with the Agg canvas, so no pyplot and no global backend change.
The encoder probes live in `ptft.probes` and are re-exported here.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from ptft import distributed as dist
from ptft.probes import knn_accuracy, linear_probe_accuracy

if TYPE_CHECKING:
    from matplotlib.figure import Figure
# matplotlib and torchvision are imported inside the functions that draw: ptft.evaluation imports
# this module, and predict / embed / export (which draw nothing) should not pay seconds for them.

__all__ = [
    "ClassificationTally", "ReconstructionTally", "classification_metrics", "reconstruction_metrics", "knn_accuracy", "linear_probe_accuracy",
    "save_confusion_matrix_png", "save_reconstruction_grid_png",
    "write_metrics_json",
]

DIGITS = 6
# Per-image MSE floor: a perfect reconstruction reports 100 dB instead of infinity (not valid JSON).
MIN_MSE = 1e-10
# Above this many classes the confusion-matrix cells are too small for printed counts.
MAX_ANNOTATED_CLASSES = 30


class ClassificationTally:
    """Classification metrics streamed over batches: sums and a confusion matrix, never the logits.

    Holds O(K^2) numbers whatever the split's size, so evaluate runs in bounded memory; the
    figures equal those computed on all logits at once (sums in float64).
    """

    def __init__(self, class_names: list[str]):
        self.class_names = list(class_names)
        num_classes = len(self.class_names)
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)  # rows true, columns predicted
        self.loss_sum = 0.0
        self.top5_hits = 0
        self.count = 0

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Count one batch: logits (B, K) scores, labels (B,) class indices in [0, K)."""
        logits = logits.detach().to("cpu", torch.float64)
        labels = labels.detach().to("cpu", torch.int64)
        num_classes = _check_classification_inputs(logits, labels, self.class_names)
        predictions = logits.argmax(dim=1)
        self.confusion += torch.bincount(labels * num_classes + predictions,
                                         minlength=num_classes * num_classes).view(num_classes, num_classes)
        self.loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        if num_classes > 5:
            top5 = logits.topk(5, dim=1).indices  # (B, 5)
            self.top5_hits += int((top5 == labels[:, None]).any(dim=1).sum())
        self.count += len(labels)

    def all_reduce(self) -> None:
        """Under torchrun: sum this rank's tally with the others', so every rank holds the split's (in place)."""
        sums = dist.sum_over_ranks(torch.tensor([self.loss_sum, self.top5_hits, self.count], dtype=torch.float64))
        self.confusion = dist.sum_over_ranks(self.confusion)
        self.loss_sum, self.top5_hits, self.count = sums[0].item(), int(sums[1]), int(sums[2])

    def metrics(self) -> dict:
        """Loss, accuracy, top-5 (K > 5), per-class precision/recall/F1, macro-F1, confusion matrix.

        Classes absent from the labels still get a per-class entry (all zeros when never
        predicted) and a confusion-matrix row; macro-F1 averages over the classes that occur in
        the labels or the predictions, so a class missing from the split does not count as a failure.
        """
        if self.count == 0:
            raise ValueError("no examples to compute classification metrics on")
        counts = self.confusion.double()
        hits, support, predicted = counts.diagonal(), counts.sum(dim=1), counts.sum(dim=0)
        precision, recall = _ratio(hits, predicted), _ratio(hits, support)
        f1 = _ratio(2 * hits, support + predicted)  # = 2PR / (P + R), and 0 where both are 0
        seen = (support + predicted) > 0
        metrics = {
            "loss": _rounded(self.loss_sum / self.count),
            "accuracy": _rounded(hits.sum() / self.count),
            "macro_f1": _rounded(f1[seen].mean()),
            "per_class": {
                name: {"precision": _rounded(precision[i]), "recall": _rounded(recall[i]),
                       "f1": _rounded(f1[i]), "support": int(support[i])}
                for i, name in enumerate(self.class_names)
            },
            "confusion_matrix": self.confusion.tolist(),
            "num_examples": self.count,
        }
        if len(self.class_names) > 5:
            metrics["top5_accuracy"] = _rounded(self.top5_hits / self.count)
        return metrics


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, class_names: list[str]) -> dict:
    """`ClassificationTally.metrics` of one batch holding the whole split.

    Args:
        logits: (N, K) scores; labels: (N,) class indices in [0, K); class_names: K names.
    Returns:
        A JSON-ready dict; `confusion_matrix` rows are true classes, columns predictions.
    """
    if len(labels) == 0:
        raise ValueError("no examples to compute classification metrics on")
    tally = ClassificationTally(class_names)
    tally.add(logits, labels)
    return tally.metrics()


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    # 0 where the denominator is 0: sklearn's zero_division=0, without its warning.
    return torch.where(denominator > 0, numerator / denominator.clamp(min=1), torch.zeros_like(numerator))


def _check_classification_inputs(logits: torch.Tensor, labels: torch.Tensor, class_names: list[str]) -> int:
    if logits.ndim != 2 or labels.shape != (len(logits),):
        raise ValueError(f"expected logits (N, K) and labels (N,), got {tuple(logits.shape)} and {tuple(labels.shape)}")
    num_classes = logits.shape[1]
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for {num_classes} logits per example")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{labels.min().item()}, {labels.max().item()}]")
    return num_classes


class ReconstructionTally:
    """Reconstruction MSE and PSNR streamed over batches; keeps only the images the picture shows.

    PSNR is computed per image (data range 1.0, MSE floored at 1e-10, i.e. at most 100 dB) and
    then averaged over images, so one bad image cannot hide behind many good ones as it would
    in the PSNR of the pooled MSE.
    """

    def __init__(self, keep: int = 16):
        self.keep = keep
        self.mse_sum = self.psnr_sum = 0.0
        self.count = 0
        self.inputs: list[torch.Tensor] = []  # the first `keep` images, on the CPU, for the grid
        self.reconstructions: list[torch.Tensor] = []

    def add(self, inputs: torch.Tensor, reconstructions: torch.Tensor) -> None:
        """Count one batch of (B, C, H, W) images in [0, 1] and their reconstructions."""
        if inputs.shape != reconstructions.shape:
            raise ValueError(f"need same-shape inputs and reconstructions, got "
                             f"{tuple(inputs.shape)} and {tuple(reconstructions.shape)}")
        inputs = inputs.detach().to("cpu", torch.float64)
        reconstructions = reconstructions.detach().to("cpu", torch.float64)
        per_image_mse = (inputs - reconstructions).square().flatten(1).mean(dim=1)  # (B,)
        self.mse_sum += per_image_mse.sum().item()
        self.psnr_sum += (10 * torch.log10(1.0 / per_image_mse.clamp(min=MIN_MSE))).sum().item()
        wanted = self.keep - sum(len(x) for x in self.inputs)
        if wanted > 0:
            self.inputs.append(inputs[:wanted].float().clone())
            self.reconstructions.append(reconstructions[:wanted].float().clone())
        self.count += len(inputs)

    def all_reduce(self) -> None:
        """Under torchrun: sum this rank's sums and count with the others' (in place); the kept images stay
        this rank's own (rank 0's slice starts the split: its first images are the split's)."""
        sums = dist.sum_over_ranks(torch.tensor([self.mse_sum, self.psnr_sum, self.count], dtype=torch.float64))
        self.mse_sum, self.psnr_sum, self.count = sums[0].item(), sums[1].item(), int(sums[2])

    def metrics(self) -> dict:
        """{"mse", "psnr", "num_examples"}."""
        if self.count == 0:
            raise ValueError("need non-empty inputs and reconstructions")
        return {"mse": _rounded(self.mse_sum / self.count), "psnr": _rounded(self.psnr_sum / self.count),
                "num_examples": self.count}

    def save_grid_png(self, path: str | Path) -> None:
        """The kept inputs above their reconstructions (`save_reconstruction_grid_png`)."""
        save_reconstruction_grid_png(torch.cat(self.inputs), torch.cat(self.reconstructions), path, n=self.keep)


def reconstruction_metrics(inputs: torch.Tensor, reconstructions: torch.Tensor) -> dict:
    """`ReconstructionTally.metrics` of one batch holding the whole split.

    Args:
        inputs, reconstructions: (N, C, H, W) tensors of the same shape, images in [0, 1].
    Returns:
        {"mse", "psnr", "num_examples"}.
    """
    if inputs.shape != reconstructions.shape or len(inputs) == 0:
        raise ValueError(f"need same-shape, non-empty inputs and reconstructions, got "
                         f"{tuple(inputs.shape)} and {tuple(reconstructions.shape)}")
    tally = ReconstructionTally(keep=0)
    tally.add(inputs, reconstructions)
    return tally.metrics()


def save_confusion_matrix_png(matrix: list[list[int]], class_names: list[str], path: str | Path,
                              title: str = "confusion matrix") -> None:
    """Draw a confusion matrix (rows true, columns predicted) as a PNG.

    Cells are coloured by the row-normalised rate (recall on the diagonal), so the picture reads
    the same under class imbalance; counts are printed in the cells up to 30 classes.
    """
    counts = np.asarray(matrix, dtype=np.int64)  # (K, K)
    num_classes = len(class_names)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    from matplotlib.figure import Figure

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
    from matplotlib.figure import Figure
    from torchvision.utils import make_grid

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
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)  # attaches itself to fig
    fig.savefig(path, format="png", dpi=dpi, bbox_inches="tight")


def _rounded(value) -> float:
    return round(float(value), DIGITS)
