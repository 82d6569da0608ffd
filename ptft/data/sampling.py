"""Which examples a training batch holds when `data.sampler` is balanced.

Balanced sampling draws each batch with replacement so that every class of the labelled subset
is equally likely: example i of class c has weight 1 / n_c. It is drawn in two stages (a class
uniformly, then an example of it uniformly), the same distribution as a multinomial over the
weights but O(batch) per step instead of O(examples). As for shuffled batches (ptft.data.batches),
a batch is a pure function of (labels, seed, step): resuming at step s needs nothing but s, and
every rank draws the same global batch and keeps its own slice of it.
"""

from __future__ import annotations

import hashlib

import torch


def _step_seed(seed: int, step: int) -> int:
    # Hashed apart from the shuffled order's per-epoch seeds and the engine's per-step noise seeds.
    digest = hashlib.sha256(f"ptft-balanced-order:{seed}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class BalancedSampler:
    """Batch indices drawn with replacement, every class present in `labels` equally likely.

    Classes with no example are never drawn (a weight 1 / 0 means nothing); the others each
    make up 1 / (classes present) of a batch in expectation, whatever their counts.

    Args:
        labels: (N,) int64 class of each example, on the device the indices should live on.
        seed: seeds the draws (the run seed).
    """

    def __init__(self, labels: torch.Tensor, seed: int):
        if labels.ndim != 1 or len(labels) == 0:
            raise ValueError(f"need a non-empty (N,) label tensor, got shape {tuple(labels.shape)}")
        self.seed, self.device = seed, labels.device
        cpu_labels = labels.detach().cpu()
        # Examples grouped by class: class k's are by_class[starts[k] : starts[k] + counts[k]].
        self._by_class = torch.argsort(cpu_labels, stable=True)
        classes, counts = torch.unique(cpu_labels, return_counts=True)  # present classes only, sorted
        self._counts = counts
        self._starts = torch.cumsum(counts, 0) - counts
        self.classes = classes

    def indices(self, step: int, batch_size: int) -> torch.Tensor:
        """(batch_size,) int64 example indices of global step `step`, on the labels' device.

        Drawn on the CPU from a generator seeded with (seed, step), so every device and every
        rank gets the same indices.
        """
        generator = torch.Generator().manual_seed(_step_seed(self.seed, step))
        which = torch.randint(len(self._counts), (batch_size,), generator=generator)  # (B,) class slots
        counts = self._counts[which]
        # float64 keeps floor(u * n) uniform on [0, n) for any realistic n; the clamp guards u * n == n.
        within = (torch.rand(batch_size, generator=generator, dtype=torch.float64) * counts).long()
        within = torch.minimum(within, counts - 1)
        return self._by_class[self._starts[which] + within].to(self.device)
