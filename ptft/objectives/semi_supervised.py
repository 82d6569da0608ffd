"""Semi-supervised finetuning: the supervised loss on labelled examples plus a loss on unlabelled ones.

The training batch carries unlabelled examples with label -1 (ptft/data/mixed.py). On them:
- FixMatch (Sohn et al. 2020): the model's prediction on a weakly augmented view becomes a
  pseudo-label where its confidence reaches the threshold, and the model learns to predict it on
  a strongly augmented view of the same image;
- pseudo-labelling (Lee 2013), the simple baseline: the same on the weak view alone.
Validation batches hold no -1 labels, so val/loss is the supervised objective's own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

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


def masked_pseudo_label_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor,
                             threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of the student on the teacher's confident argmax classes.

    Args:
        teacher_logits: (U, C) logits whose softmax gives the pseudo-labels (no gradient flows back).
        student_logits: (U, C) logits that learn to predict them.
        threshold: a pseudo-label counts where the teacher's largest probability is >= this.
    Returns:
        (loss, mask_rate): the cross-entropy summed over confident examples divided by U (so a
        confident few weigh little, as in FixMatch), and the fraction of confident examples.
    """
    probs = teacher_logits.detach().float().softmax(1)
    confidence, pseudo = probs.max(1)  # (U,) each
    mask = (confidence >= threshold).float()
    per_example = F.cross_entropy(student_logits.float(), pseudo, reduction="none")  # (U,)
    return (per_example * mask).mean(), mask.mean()


def semi_supervised(supervised: nn.Module, finetune_cfg, input_shape: tuple[int, int, int]) -> nn.Module:
    """The finetune's objective: `supervised` itself, or wrapped as `finetune.unlabelled` asks.

    Args:
        supervised: the config's supervised objective.
        finetune_cfg: the `finetune` section (unlabelled, confidence_threshold, unlabelled_weight).
        input_shape: (C, H, W) of the images, which sizes the views.
    """
    if finetune_cfg.unlabelled == "none":
        return supervised
    return SemiSupervised(supervised, finetune_cfg.unlabelled, unlabelled_views(input_shape),
                          finetune_cfg.confidence_threshold, finetune_cfg.unlabelled_weight)


class SemiSupervised(nn.Module):
    """A supervised objective on the labelled part of the batch plus FixMatch or pseudo-labelling on the rest.

    Args:
        supervised: the finetune's supervised objective (its augmentation applies to labelled examples).
        method: "fixmatch" or "pseudo_label".
        views: weak and strong augmentations of unlabelled images.
        threshold: confidence a pseudo-label needs.
        weight: lambda, the unlabelled loss's weight.
    """

    needs_labels = True
    eval_chunk_size = None  # validation is the supervised objective's
    train_logs = ("mask_rate", "unsup_loss")  # the loop records these of the logged step as train/<name>

    def __init__(self, supervised: nn.Module, method: str, views: Views, threshold: float, weight: float):
        super().__init__()
        if method not in ("fixmatch", "pseudo_label"):
            raise ValueError(f"unknown semi-supervised method {method!r}")
        self.supervised = supervised
        self.method, self.views, self.threshold, self.weight = method, views, threshold, weight


    def fit_class_weights(self, labels: torch.Tensor) -> None:
        """objective.class_weights of the labelled part: see Supervised.fit_class_weights."""
        if hasattr(self.supervised, "fit_class_weights"):
            self.supervised.fit_class_weights(labels)
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
            logits = model(weak)  # (U, C): one forward is both teacher (detached) and student
            return masked_pseudo_label_loss(logits, logits, self.threshold)
        strong = self.views.strong(x, generator)
        with torch.no_grad():
            teacher = model(weak)  # (U, C)
        return masked_pseudo_label_loss(teacher, model(strong), self.threshold)
