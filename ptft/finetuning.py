"""Finetuning policy in one room: what trains at each step (freezing by name pattern, linear
probes, gradual unfreezing, frozen batch norm) and at which learning rates (head lr, layer
decay). What a finetune may start from (its parent's data split) is ptft/lineage.py's.

The config's `finetune:` section is read once, into a `FinetunePlan`; a stage without one
(pretraining) has the plan None, and nothing else asks which stage it is.

Freezing is `requires_grad=False` on parameters that stay in the optimizer: a frozen
parameter gets no gradient, so the optimizer skips it, and unfreezing (also after
`--resume`) changes no parameter groups and no optimizer state.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

import torch

from ptft.errors import UserError
from ptft.models import MODELS

LINEAR_PROBE_PATTERNS = ("encoder.*",)


@dataclass(frozen=True)
class FreezeSchedule:
    """Name patterns frozen from step 0 until `unfreeze_at_step` (None: to the end)."""

    patterns: tuple[str, ...]
    unfreeze_at_step: int | None = None

    def frozen_at(self, step: int) -> tuple[str, ...]:
        """The patterns frozen during `step` (0-based)."""
        if self.unfreeze_at_step is not None and step >= self.unfreeze_at_step:
            return ()
        return self.patterns


@dataclass(frozen=True)
class FinetunePlan:
    """What a finetune trains and how fast, read once from the config's `finetune:` section."""

    mode: str  # "full" | "linear_probe"
    freeze: FreezeSchedule
    head_lr: float | None = None  # lr of `head.*` (None: optim.lr)
    layer_decay: float | None = None  # encoder layer l of L trains at lr * decay ** (L - l)
    # The head trains on features the frozen encoder computed once (ptft/features.py).
    probe_on_features: bool = False

    @classmethod
    def from_config(cls, finetune_cfg) -> FinetunePlan:
        """The plan of a `finetune:` section: linear probe freezes the encoder, else `freeze` is frozen.

        A probe frozen for the whole run trains on precomputed features unless `precompute_features` is
        off; semi-supervised finetuning keeps the per-step path, since FixMatch and pseudo-labels learn
        from fresh augmented views of the unlabelled images at every step.
        """
        probe = finetune_cfg.mode == "linear_probe"
        patterns = LINEAR_PROBE_PATTERNS if probe else tuple(finetune_cfg.freeze)
        on_features = (probe and finetune_cfg.unfreeze_at_step is None and finetune_cfg.unlabelled == "none"
                       and finetune_cfg.precompute_features)
        return cls(mode=finetune_cfg.mode, freeze=FreezeSchedule(patterns, finetune_cfg.unfreeze_at_step),
                   head_lr=finetune_cfg.head_lr, layer_decay=finetune_cfg.layer_decay, probe_on_features=on_features)


def finetune_plan(cfg, stage: str) -> FinetunePlan | None:
    """The plan of a "finetune" stage, None for "pretrain"; say what cannot be finetuned before any work.

    Raises:
        UserError: the model is not a classifier, or the objective is not supervised.
    """
    if stage != "finetune":
        return None
    kind = MODELS.meta(cfg.model.name).get("kind")
    if kind not in (None, "classifier"):
        raise UserError(
            f"model.name: finetune trains a classifier, but {cfg.model.name!r} is an {kind}; use the matching "
            f"*_classifier model with the same options so the encoder weights line up"
        )
    if cfg.objective.name != "supervised":
        raise UserError(f"objective.name: finetune uses 'supervised', got {cfg.objective.name!r}")
    return FinetunePlan.from_config(cfg.finetune)


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


def leaves_parameters_unused(plan: FinetunePlan | None, objective: torch.nn.Module) -> bool:
    """Whether some parameters get no gradient in some steps (DDP must then look for them)."""
    if getattr(objective, "uses_only_encoder", False):
        return True
    # Freezing (linear probe, finetune.freeze) starts at step 0; unfreezing only ends it.
    return plan is not None and bool(plan.freeze.frozen_at(0))


def param_groups(model: torch.nn.Module, objective: torch.nn.Module, plan: FinetunePlan | None,
                 lr: float) -> list[dict]:
    """Parameter groups with per-group learning rates.

    Every parameter is in some group even when frozen: frozen parameters get no gradient,
    so the optimizer skips them, and unfreezing later (or on resume) needs no new groups.

    Args:
        model: the model; its `encoder` may expose `num_layers` and `layer_of(name)`.
        objective: the objective module (e.g. a contrastive projector), trained at `lr`.
        plan: the plan's `head_lr` (lr of `head.*`) and `layer_decay` (encoder layer l of L
            trains at lr * decay ** (L - l), the head at lr); None (pretraining): all at `lr`.
        lr: the base learning rate.
    Returns:
        A list of dicts for a torch optimizer, each with `params`, `lr` and `name`.
    Raises:
        UserError: layer_decay is set but the model's encoder does not say which layer a parameter is in.
    """
    head_lr = (plan and plan.head_lr) or lr
    decay = plan.layer_decay if plan else None
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


def random_probe_warning(plan: FinetunePlan, init_checkpoint: str | None) -> str | None:
    """A linear probe without init.checkpoint: a known baseline, but more often a forgotten key."""
    if plan.mode != "linear_probe" or init_checkpoint:
        return None
    step = plan.freeze.unfreeze_at_step
    until = f" until finetune.unfreeze_at_step={step}" if step else ""
    return (f"warning: finetune.mode=linear_probe with no init.checkpoint: the head learns on a random, frozen "
            f"encoder{until} (a baseline; set init.checkpoint to probe pretrained features)")

