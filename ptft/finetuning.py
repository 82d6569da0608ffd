"""What trains during finetuning: freezing by name pattern, linear probes, gradual unfreezing.

Freezing is `requires_grad=False` on parameters that stay in the optimizer: a frozen
parameter gets no gradient, so the optimizer skips it, and unfreezing (also after
`--resume`) changes no parameter groups and no optimizer state.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

import torch

from ptft.errors import UserError

LINEAR_PROBE_PATTERNS = ("encoder.*",)


def frozen_patterns(finetune_cfg, step: int) -> list[str]:
    """Name patterns frozen at `step`: linear probe freezes the encoder; unfreeze_at_step ends it."""
    if finetune_cfg.unfreeze_at_step is not None and step >= finetune_cfg.unfreeze_at_step:
        return []
    if finetune_cfg.mode == "linear_probe":
        return list(LINEAR_PROBE_PATTERNS)
    return list(finetune_cfg.freeze)


def apply_freeze(model: torch.nn.Module, patterns) -> list[str]:
    """Freeze parameters whose names match any pattern (fnmatch), unfreeze the rest.

    Returns:
        The names of the frozen parameters.
    Raises:
        UserError: a pattern matches no parameter (a typo would otherwise freeze nothing silently).
    """
    names = [name for name, _ in model.named_parameters()]
    for pattern in patterns:
        if not any(fnmatchcase(name, pattern) for name in names):
            prefixes = sorted({name.split(".")[0] + ".*" for name in names})
            raise UserError(f"finetune.freeze: pattern {pattern!r} matches no parameter (top-level: {', '.join(prefixes)})")
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
