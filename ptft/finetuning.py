"""What trains during finetuning (freezing by name pattern, linear probes, gradual unfreezing),
and what a finetune may start from (a parent trained on another validation split).

Freezing is `requires_grad=False` on parameters that stay in the optimizer: a frozen
parameter gets no gradient, so the optimizer skips it, and unfreezing (also after
`--resume`) changes no parameter groups and no optimizer state.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from pathlib import Path

import torch

from ptft.data.fingerprint import val_overlap_problem
from ptft.errors import DataError, UserError

LINEAR_PROBE_PATTERNS = ("encoder.*",)


def frozen_patterns(finetune_cfg, step: int) -> list[str]:
    """Name patterns frozen at `step`: linear probe freezes the encoder; unfreeze_at_step ends it."""
    if finetune_cfg.unfreeze_at_step is not None and step >= finetune_cfg.unfreeze_at_step:
        return []
    if finetune_cfg.mode == "linear_probe":
        return list(LINEAR_PROBE_PATTERNS)
    return list(finetune_cfg.freeze)


SHOWN_NAMES = 3  # parameter names shown from each end of the list when a pattern matches none


def check_freeze_patterns(model: torch.nn.Module, patterns) -> None:
    """Refuse a pattern that matches no parameter: a typo would otherwise freeze nothing, silently.

    Raises:
        UserError: naming the pattern and a few of the model's parameter names.
    """
    names = [name for name, _ in model.named_parameters()]
    for pattern in patterns:
        if not any(fnmatchcase(name, pattern) for name in names):
            shown = names if len(names) <= 2 * SHOWN_NAMES else [*names[:SHOWN_NAMES], "...", *names[-SHOWN_NAMES:]]
            prefixes = sorted({name.split(".")[0] + ".*" for name in names})
            raise UserError(f"finetune.freeze: pattern {pattern!r} matches no parameter; the model's {len(names)} "
                            f"parameters are named {', '.join(shown)} (top level: {', '.join(prefixes)})")


def apply_freeze(model: torch.nn.Module, patterns) -> list[str]:
    """Freeze parameters whose names match any pattern (fnmatch), unfreeze the rest.

    Returns:
        The names of the frozen parameters.
    Raises:
        UserError: a pattern matches no parameter (see `check_freeze_patterns`).
    """
    check_freeze_patterns(model, patterns)
    frozen = []
    for name, param in model.named_parameters():
        is_frozen = any(fnmatchcase(name, pattern) for pattern in patterns)
        param.requires_grad_(not is_frozen)
        if is_frozen:
            frozen.append(name)
    return frozen


def keep_frozen_norms_in_eval(model: torch.nn.Module) -> None:
    """Frozen batch-norm layers keep their running statistics: put them in eval mode.

    Without this a "frozen" encoder still drifts, because train-mode batch norm updates its
    running mean and variance from every batch.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()


def random_probe_warning(finetune_cfg, init_checkpoint: str | None) -> str | None:
    """A linear probe without init.checkpoint: a known baseline, but more often a forgotten key."""
    if finetune_cfg.mode != "linear_probe" or init_checkpoint:
        return None
    step = finetune_cfg.unfreeze_at_step
    until = f" until finetune.unfreeze_at_step={step}" if step else ""
    return (f"warning: finetune.mode=linear_probe with no init.checkpoint: the head learns on a random, frozen "
            f"encoder{until} (a baseline; set init.checkpoint to probe pretrained features)")


def check_parent_split(fingerprint: dict, parent_meta: dict, parent: str | Path) -> str | None:
    """Validation must not score examples the parent was trained on with their labels.

    Another split of the parent's data moves some of the parent's training examples into this
    run's validation split. A supervised parent has learnt their labels: its validation figures,
    and so the best checkpoint, would flatter it. A label-free parent has only seen the images.

    Returns:
        A one-line warning for a label-free parent split another way, else None.
    Raises:
        DataError: a supervised parent split the same data another way.
    """
    problem = val_overlap_problem(parent_meta.get("data"), fingerprint)
    if problem is None:
        return None
    if parent_meta.get("objective") == "supervised":
        raise DataError(f"{problem}. init.checkpoint {parent} was trained with their labels (objective supervised): "
                        f"validation would flatter it, and pick the best checkpoint by it")
    return f"warning: {problem} (init.checkpoint {parent} saw them without labels)"
