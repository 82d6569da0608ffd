"""The online k-NN monitor: how well the current encoder's features classify the validation split.

Label-free pretraining's own loss says little about the features a finetune will get (a lower
contrastive or VICReg loss is not always a better encoder), but the validation split has labels:
`val/knn_acc`, a k-NN classifier over the labelled train examples' features, does not look at the
test split and can pick the pretraining checkpoint (`checkpoint.monitor: val/knn_acc`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ptft import distributed as dist
from ptft.data.batches import iterate_eval
from ptft.data.tensors import TensorSplit
from ptft.knn import knn_accuracy

# DINO's defaults; the encoder changes, not the classifier, so they need no config keys.
KNN_K = 20
KNN_TEMPERATURE = 0.07
# Labelled examples whose features are recomputed at each validation. All of MNIST's 54,000 took
# 37 s per validation on one loaded CPU thread; an evenly strided 5,000 (every class keeps its
# share) rank checkpoints the same way for a tenth of that.
MAX_BANK = 5000


@torch.inference_mode()
def encoder_features(encoder: torch.nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor | None:
    """(N, D) features of images (N, C, H, W), in eval batches (None when N is 0); the encoder's mode is
    the caller's."""
    labels = torch.zeros(len(x), dtype=torch.long, device=x.device)  # iterate_eval batches pairs
    batches = [encoder(batch) for batch, _ in iterate_eval(x, labels, batch_size)]
    return torch.cat(batches) if batches else None  # None: no rows (a rank's empty slice)


@dataclass
class KnnMonitor:
    """`val/knn_acc` of a model's encoder: its features of `bank` are the k-NN's labelled examples.

    Args:
        bank: labelled train examples on the device (examples labelled -1 are left out, and of more
            than MAX_BANK every k-th is kept, a fixed subset).
        num_classes: C.
    """

    bank: TensorSplit
    num_classes: int

    def __post_init__(self):
        labelled = self.bank.y >= 0  # stl10's extra images carry -1
        if not bool(labelled.all()):
            self.bank = TensorSplit(self.bank.x[labelled], self.bank.y[labelled])
        stride = -(-len(self.bank.y) // MAX_BANK)  # ceil: at most MAX_BANK examples
        if stride > 1:
            self.bank = TensorSplit(self.bank.x[::stride], self.bank.y[::stride])

    def __call__(self, model: torch.nn.Module, split: TensorSplit, batch_size: int) -> dict[str, float]:
        """{"val/knn_acc": accuracy} of `split` (the model already in eval mode).

        Under torchrun it is sharded like the loss: each rank encodes its slice of the bank (every
        rank then holds all of it, gathered in the bank's order) and classifies its slice of
        `split`; the correct counts are summed. The bank's features are the expensive part, so a
        rank-0-only monitor would keep the others waiting for most of a validation.
        """
        rows = dist.shard_rows(len(self.bank.y), batch_size)
        bank_feats = dist.gather_rows(encoder_features(model.encoder, self.bank.x[rows], batch_size))
        rows = dist.shard_rows(len(split.y), batch_size)
        correct = 0
        if rows.stop > rows.start:
            feats = encoder_features(model.encoder, split.x[rows], batch_size).float()
            accuracy = knn_accuracy(bank_feats.to(feats.device).float(), self.bank.y, feats, split.y[rows], k=KNN_K,
                                    temperature=KNN_TEMPERATURE, num_classes=self.num_classes)
            correct = round(accuracy * len(feats))  # knn_accuracy's count over its queries
        return {"val/knn_acc": dist.sum_by_key({"correct": correct})["correct"] / len(split.y)}
