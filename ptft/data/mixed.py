"""Training batches of labelled and unlabelled examples together, for semi-supervised finetuning.

A mixed batch is a labelled batch followed by `ratio` times as many unlabelled examples, whose
labels are -1: the objective tells them apart by the label alone, and the engine needs no new
concept. Both halves come from their own seeded stream and are pure functions of the step, so
exact resume and sharding work as for `DeviceBatches`.
"""

from __future__ import annotations

import hashlib

import torch

from ptft.data.batches import Batches, DeviceBatches

NO_LABEL = -1


def unlabelled_seed(seed: int) -> int:
    """Seed of the unlabelled stream: apart from every run seed's labelled stream."""
    digest = hashlib.sha256(f"ptft-unlabelled-order:{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**62 - 1)


class MixedBatches:
    """Labelled batch + unlabelled batch of `ratio` times its size, addressed by global step.

    An epoch is an epoch of the labelled stream (the few labels set the pace, as in FixMatch);
    the unlabelled stream runs through its own epochs at its own rate.

    Args:
        labelled: the labelled batches (labels >= 0).
        unlabelled: the unlabelled batches; their labels are replaced by -1.
    """

    def __init__(self, labelled: Batches, unlabelled: Batches):
        self.labelled, self.unlabelled = labelled, unlabelled
        self.steps_per_epoch = labelled.steps_per_epoch

    @classmethod
    def from_splits(cls, labelled, unlabelled, batch_size: int, ratio: int, seed: int,
                    sampler: str = "random") -> MixedBatches:
        """Mixed batches over two TensorSplits: `batch_size` labelled (drawn by `sampler`, data.sampler) +
        `ratio * batch_size` unlabelled (always shuffled: their labels are unknown)."""
        return cls(DeviceBatches(labelled.x, labelled.y, batch_size, seed, sampler=sampler),
                   DeviceBatches(unlabelled.x, unlabelled.y, ratio * batch_size, unlabelled_seed(seed)))

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of global step `step`: (B + U, C, H, W) float32 in [0, 1]; y (B + U,), the last U are -1."""
        x_l, y_l = self.labelled.batch(step)
        x_u, _ = self.unlabelled.batch(step)  # true labels, if any, are never seen
        no_label = torch.full((len(x_u),), NO_LABEL, dtype=y_l.dtype, device=y_l.device)
        return torch.cat([x_l, x_u]), torch.cat([y_l, no_label])

    def shard(self, rank: int, world_size: int) -> MixedBatches:
        """Rank `rank`'s share: its slice of the labelled batch and of the unlabelled batch.

        Raises:
            ValueError: either batch does not split into `world_size` equal slices.
        """
        if world_size == 1:
            return self
        return MixedBatches(self.labelled.shard(rank, world_size), self.unlabelled.shard(rank, world_size))
