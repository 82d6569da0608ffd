"""Semi-supervised finetuning: the supervised loss on labelled examples plus a loss on unlabelled ones.

The training batch carries unlabelled examples with label -1 (ptft/data/mixed.py). On them:
- FixMatch (Sohn et al. 2020): the model's prediction on a weakly augmented view becomes a
  pseudo-label where its confidence reaches the threshold, and the model learns to predict it on
  a strongly augmented view of the same image;
- pseudo-labelling (Lee 2013), the simple baseline: the same on the weak view alone.
A pseudo-label counts where the teacher's confidence reaches a fixed threshold, or, with
`finetune.confidence_threshold: adaptive`, FreeMatch's self-adaptive per-class one (AdaptiveThreshold).
Validation batches hold no -1 labels, so val/loss is the supervised objective's own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ptft import distributed as dist
from ptft.objectives.augment import Augment


# Colour jitter of the strong view of RGB images: RandAugment's brightness, contrast and colour
# ops at about half their largest magnitude, on 80% of the images.
RGB_STRONG_COLOUR = {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1, "jitter_p": 0.8}


@dataclass(frozen=True)
class Views:
    """The weak and strong augmentations of unlabelled images."""

    weak: Augment
    strong: Augment


def unlabelled_views(input_shape: tuple[int, int, int]) -> Views:
    """FixMatch's weak and strong views for images of `input_shape` (C, H, W).

    Weak: a shift of up to 1/8 of the image (and a left-right flip for colour photos, which a
    mirror does not change; a mirrored digit or letter may be another one). Strong: larger crops,
    shifts and rotations, then a cutout of 3/8 of the side, FixMatch's RandAugment + Cutout in
    the ops that ptft's batched augmentations have; colour photos also get colour jitter.
    """
    channels, side = input_shape[0], min(input_shape[1:])
    flip_p = 0.5 if channels == 3 else 0.0
    colour = RGB_STRONG_COLOUR if channels == 3 else {}
    size = tuple(input_shape[1:])  # the model's: views of larger images (data.decode_size) are cropped to it
    weak = Augment(max_shift=0.125, flip_p=flip_p, output_size=size)
    strong = Augment(crop_scale=(0.6, 1.0), crop_ratio=(3 / 4, 4 / 3), max_rotation=25.0, max_shift=0.15,
                     flip_p=flip_p, cutout=max(1, side * 3 // 8), output_size=size, **colour)
    return Views(weak, strong)


def masked_pseudo_label_loss(teacher_probs: torch.Tensor, student_logits: torch.Tensor,
                             threshold: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of the student on the teacher's confident argmax classes.

    Args:
        teacher_probs: (U, C) class probabilities that give the pseudo-labels (no gradient flows back).
        student_logits: (U, C) logits that learn to predict them.
        threshold: a pseudo-label counts where the teacher's largest probability is >= this: one
            number, or a (C,) tensor, one per class (the pseudo-label's).
    Returns:
        (loss, mask_rate): the cross-entropy summed over confident examples divided by U (so a
        confident few weigh little, as in FixMatch), and the fraction of confident examples.
    """
    confidence, pseudo = teacher_probs.detach().max(1)  # (U,) each
    bar = threshold[pseudo] if isinstance(threshold, torch.Tensor) else threshold
    mask = (confidence >= bar).float()
    per_example = F.cross_entropy(student_logits.float(), pseudo, reduction="none")  # (U,)
    return (per_example * mask).mean(), mask.mean()


# FreeMatch's momentum for its running confidence estimates (lambda in Wang et al. 2023).
ADAPTIVE_MOMENTUM = 0.999


class AdaptiveThreshold(nn.Module):
    """FreeMatch's self-adaptive thresholds (Wang et al. 2023): each class's bar follows the model's own confidence.

    A global level, the running mean of the teacher's top probability, starts at 1/C and rises as the
    model grows confident: early on most pseudo-labels train, where a fixed 0.95 admits almost none for
    hundreds of steps and the few labels alone shape the model. Class c's bar is that level times
    p_c / max p, with p the running mean predicted distribution, so classes the model predicts less
    often or less surely get a lower bar instead of being starved. The estimates are buffers:
    checkpoints hold them and --resume continues them bitwise; under torchrun each step's batch
    statistics are averaged over ranks first, so every rank keeps the same thresholds.

    Args:
        num_classes: C.
    """

    def __init__(self, num_classes: int):
        super().__init__()
        self.register_buffer("level", torch.tensor(1.0 / num_classes))
        self.register_buffer("class_probs", torch.full((num_classes,), 1.0 / num_classes))

    @torch.no_grad()
    def forward(self, teacher_probs: torch.Tensor) -> torch.Tensor:
        """Update the estimates with a batch's (U, C) teacher probabilities; returns the (C,) thresholds."""
        batch = dist.average(torch.cat([teacher_probs.max(1).values.mean().view(1), teacher_probs.mean(0)]))
        self.level.lerp_(batch[0], 1 - ADAPTIVE_MOMENTUM)
        self.class_probs.lerp_(batch[1:], 1 - ADAPTIVE_MOMENTUM)
        return self.level * self.class_probs / self.class_probs.max()


class DistributionAlignment(nn.Module):
    """ReMixMatch's distribution alignment (Berthelot et al. 2020): pseudo-labels follow the labels' class prior.

    Each teacher distribution q becomes normalize(q * prior / running), where `running` is the
    running mean of q over unlabelled batches. A class the model under-predicts is pushed up, so an
    early bias against it is not fed back as confident pseudo-labels step after step (strongest with
    one label per class). The running mean is a buffer (checkpoints hold it, --resume continues it),
    averaged over ranks under torchrun; the prior is the labelled subset's class frequencies.

    Args:
        num_classes: C.
    """

    def __init__(self, num_classes: int):
        super().__init__()
        self.register_buffer("running", torch.full((num_classes,), 1.0 / num_classes))
        # Not saved: set from the labelled subset at every start (fit_prior), the same on resume.
        self.register_buffer("prior", torch.full((num_classes,), 1.0 / num_classes), persistent=False)

    def fit_prior(self, labels: torch.Tensor) -> None:
        """The labelled subset's class frequencies (labels (N,) >= 0); an absent class keeps a tiny share."""
        counts = torch.bincount(labels.cpu(), minlength=len(self.prior)).double().clamp_min(1e-3)
        self.prior.copy_((counts / counts.sum()).to(self.prior))

    @torch.no_grad()
    def forward(self, teacher_probs: torch.Tensor) -> torch.Tensor:
        """(U, C) aligned distributions of (U, C) teacher probabilities; updates the running mean first."""
        self.running.lerp_(dist.average(teacher_probs.mean(0)), 1 - ADAPTIVE_MOMENTUM)
        aligned = teacher_probs * (self.prior / self.running)
        return aligned / aligned.sum(1, keepdim=True)


def semi_supervised(supervised: nn.Module, finetune_cfg, input_shape: tuple[int, int, int],
                    num_classes: int) -> nn.Module:
    """The finetune's objective: `supervised` itself, or wrapped as `finetune.unlabelled` asks.

    Args:
        supervised: the config's supervised objective.
        finetune_cfg: the `finetune` section (unlabelled, confidence_threshold, unlabelled_weight,
            distribution_alignment).
        input_shape: (C, H, W) of the images, which sizes the views.
        num_classes: C, which sizes adaptive thresholds and distribution alignment.
    """
    if finetune_cfg.unlabelled == "none":
        return supervised
    threshold = finetune_cfg.confidence_threshold
    if threshold == "adaptive":
        threshold = AdaptiveThreshold(num_classes)
    align = DistributionAlignment(num_classes) if finetune_cfg.distribution_alignment else None
    return SemiSupervised(supervised, finetune_cfg.unlabelled, unlabelled_views(input_shape),
                          threshold, finetune_cfg.unlabelled_weight, align)


class SemiSupervised(nn.Module):
    """A supervised objective on the labelled part of the batch plus FixMatch or pseudo-labelling on the rest.

    Args:
        supervised: the finetune's supervised objective (its augmentation applies to labelled examples).
        method: "fixmatch" or "pseudo_label".
        views: weak and strong augmentations of unlabelled images.
        threshold: confidence a pseudo-label needs: a number, or an AdaptiveThreshold.
        weight: lambda, the unlabelled loss's weight.
        align: distribution alignment of the pseudo-labels (None: none).
    """

    needs_labels = True
    eval_chunk_size = None  # validation is the supervised objective's
    train_logs = ("mask_rate", "unsup_loss")  # the loop records these of the logged step as train/<name>

    def __init__(self, supervised: nn.Module, method: str, views: Views, threshold: float | AdaptiveThreshold,
                 weight: float, align: DistributionAlignment | None = None):
        super().__init__()
        if method not in ("fixmatch", "pseudo_label"):
            raise ValueError(f"unknown semi-supervised method {method!r}")
        self.supervised = supervised
        self.method, self.views, self.threshold, self.weight = method, views, threshold, weight
        self.align = align

    def fit_to_labels(self, labels: torch.Tensor) -> None:
        """objective.class_weights of the labelled part (see Supervised.fit_to_labels), and the class
        prior that distribution alignment aims at."""
        if self.align is not None:
            self.align.fit_prior(labels)
        if hasattr(self.supervised, "fit_to_labels"):
            self.supervised.fit_to_labels(labels)

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if not self.training:
            return self.supervised(model, x, y, generator)
        # Boolean indexing costs one device sync per step: the labelled share is only known from y.
        labelled = y >= 0
        loss, logs = self.supervised(model, x[labelled], y[labelled], generator)
        unlabelled = x[~labelled]  # (U, C, H, W)
        if len(unlabelled) == 0:
            return loss, logs
        unsup_loss, mask_rate = self.unlabelled_loss(model, unlabelled, generator)
        return loss + self.weight * unsup_loss, {**logs, "unsup_loss": unsup_loss.detach(),
                                                 "mask_rate": mask_rate}

    def unlabelled_loss(self, model: nn.Module, x: torch.Tensor,
                        generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, mask rate) on unlabelled images (U, C, H, W)."""
        weak = self.views.weak(x, generator)
        if self.method == "pseudo_label":
            teacher = student = model(weak)  # (U, C): one forward is both teacher (detached) and student
        else:
            strong = self.views.strong(x, generator)
            with torch.no_grad():
                teacher = model(weak)  # (U, C)
            student = model(strong)
        probs = teacher.detach().float().softmax(1)
        if self.align is not None:
            probs = self.align(probs)
        threshold = self.threshold(probs) if isinstance(self.threshold, AdaptiveThreshold) else self.threshold
        return masked_pseudo_label_loss(probs, student, threshold)
