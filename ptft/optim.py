"""Optimizers, learning-rate schedules and the parameter groups they update.

`OPTIMIZERS` and `SCHEDULES` hold builders; their bodies import torch lazily so that
config validation can list the names without importing torch.
"""

from __future__ import annotations

import math

from ptft.errors import UserError
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


def build_param_groups(model, objective, finetune_cfg, lr: float) -> list[dict]:
    """Parameter groups with per-group learning rates.

    Every parameter is in some group even when frozen: frozen parameters get no gradient,
    so the optimizer skips them, and unfreezing later (or on resume) needs no new groups.

    Args:
        model: the model; its `encoder` may expose `num_layers` and `layer_of(name)`.
        objective: the objective module (e.g. a contrastive projector), trained at `lr`.
        finetune_cfg: `finetune.head_lr` (lr of `head.*`) and `finetune.layer_decay`
            (encoder layer l of L trains at lr * decay ** (L - l), the head at lr), or None.
        lr: the base learning rate.
    Returns:
        A list of dicts for a torch optimizer, each with `params`, `lr` and `name`.
    Raises:
        UserError: layer_decay is set but the model's encoder does not say which layer a parameter is in.
    """
    head_lr = getattr(finetune_cfg, "head_lr", None) or lr
    decay = getattr(finetune_cfg, "layer_decay", None)
    encoder = getattr(model, "encoder", None)
    if decay is not None:
        _check_layered(encoder)
    groups: dict[str, dict] = {}

    def put(key: str, group_lr: float, param) -> None:
        groups.setdefault(key, {"name": key, "lr": group_lr, "params": []})["params"].append(param)

    for name, param in model.named_parameters():
        if name.startswith("head."):
            put("head", head_lr, param)
        elif decay is not None and name.startswith("encoder."):
            layer = encoder.layer_of(name[len("encoder."):])
            put(f"encoder.layer{layer}", lr * decay ** (encoder.num_layers - layer), param)
        else:
            put("body", lr, param)
    for param in objective.parameters():
        put("objective", lr, param)
    return list(groups.values())


def _check_layered(encoder) -> None:
    # A user's model (package.module:builder) may lack the depth interface; say so before training.
    if not (hasattr(encoder, "num_layers") and callable(getattr(encoder, "layer_of", None))):
        raise UserError(
            f"finetune.layer_decay: the model's encoder ({type(encoder).__name__}) has no `num_layers` and "
            f"`layer_of(param_name)`, so its layers cannot be told apart; add them to the encoder or unset "
            f"finetune.layer_decay"
        )
