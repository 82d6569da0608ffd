"""Optimizers and learning-rate schedules.

`OPTIMIZERS` and `SCHEDULES` hold builders; their bodies import torch lazily so that
config validation can list the names without importing torch. The parameter groups they
update (head lr, layer decay) are finetuning policy: `ptft.finetuning.param_groups`.
"""

from __future__ import annotations

import math

from ptft.registry import Registry

OPTIMIZERS = Registry("optimizer")
SCHEDULES = Registry("schedule")


@OPTIMIZERS.register()
def sgd(param_groups, cfg):
    """SGD with momentum (optim.momentum, optim.nesterov), the textbook finetuning optimizer."""
    import torch

    return torch.optim.SGD(
        param_groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
        weight_decay=cfg.weight_decay,
    )


@OPTIMIZERS.register()
def adam(param_groups, cfg):
    """Adam (optim.betas); weight_decay is L2 added to the gradient."""
    import torch

    return torch.optim.Adam(param_groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


@OPTIMIZERS.register()
def adamw(param_groups, cfg):
    """AdamW: Adam with decoupled weight decay."""
    import torch

    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


def _warmup(step: int, warmup_steps: int) -> float:
    # Linear from 1/warmup to 1, so the first step already moves the weights.
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


@SCHEDULES.register()
def constant(optimizer, cfg, total_steps: int):
    """Constant learning rate after an optional linear warmup (schedule.warmup_steps)."""
    import torch

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _warmup(step, cfg.warmup_steps))


@SCHEDULES.register(length_dependent=True)  # its curve spans total_steps: a resume may not change them
def cosine(optimizer, cfg, total_steps: int):
    """Linear warmup, then cosine decay to schedule.min_lr_ratio x lr at the last step."""
    import torch

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return _warmup(step, cfg.warmup_steps)
        span = max(1, total_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@SCHEDULES.register()
def step(optimizer, cfg, total_steps: int):
    """Linear warmup, then multiply the lr by schedule.gamma every schedule.step_size steps."""
    import torch

    def factor(step_index: int) -> float:
        return _warmup(step_index, cfg.warmup_steps) * cfg.gamma ** (step_index // cfg.step_size)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
