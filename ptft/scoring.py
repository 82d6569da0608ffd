"""Validation figures of the weights a run would hand on: the objective's mean loss and logs over a
split, sharded over torchrun ranks, plus the k-NN monitor.

What is scored is what a checkpoint saves: the EMA's average when train.ema_decay is set, run
through a linear probe's head alone when it trains on precomputed features (TrainParts.forward_model).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ptft import distributed as dist
from ptft.data.batches import iterate_eval
from ptft.runtime import autocast

if TYPE_CHECKING:
    from ptft.engine import LoopSettings, TrainParts


@torch.inference_mode()
def evaluate_objective(parts: TrainParts, split, settings: LoopSettings) -> dict[str, float]:
    """Mean objective loss (and its logs) over a split, with fixed noise seeds.

    Batches of the objective's `eval_chunk_size` when it has one (its figures depend on the
    batching), else of `settings.eval_batch_size`: either way the figures do not change with
    data.eval_batch_size, which --resume may change. Under torchrun each rank validates its slice
    of whole batches (`dist.shard_rows`) and the sums are added over ranks: every rank gets the
    figures of one process (up to float summation order), so best and early stop agree.
    """
    model, objective = scored_modules(parts)
    for module in (model, objective):  # batch-norm statistics: rank 0's, the ones saved
        dist.share_buffers(module)
    model.eval()
    objective.eval()
    batch_size = getattr(parts.objective, "eval_chunk_size", None) or settings.eval_batch_size
    sums = dist.sum_by_key(_objective_sums(parts.device, model, objective, split, batch_size, settings))
    count = sums.pop(_EXAMPLES)
    metrics = {f"val/{k}": v / count for k, v in sums.items()}
    if getattr(parts, "knn", None) is not None:
        metrics.update(parts.knn(model, split, settings.eval_batch_size))
    return metrics


def saved_modules(parts: TrainParts) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The model and objective a checkpoint's model.safetensors holds: the EMA's when there is one."""
    ema = getattr(parts, "ema", None)
    return (ema.model, ema.objective) if ema is not None else (parts.model, parts.objective)


def scored_modules(parts: TrainParts) -> tuple[torch.nn.Module, torch.nn.Module]:
    """What validation runs: the saved model, or its counterpart over `forward_model`'s inputs."""
    model, objective = saved_modules(parts)
    ema = getattr(parts, "ema", None)
    forward_model = ema.forward_model if ema is not None else getattr(parts, "forward_model", None)
    return (model if forward_model is None else forward_model), objective


# Validation batch i draws its noise from seed + i * this (odd, so the low 32 bits a CPU generator
# keeps differ for every i): the same noise whichever rank validates the batch; batch 0 keeps seed.
_EVAL_BATCH_SEED_STRIDE = 0x9E3779B1
_EXAMPLES = "#examples"  # the example count among the sums: no name an objective logs


def _objective_sums(device, model, objective, split, batch_size: int, settings: LoopSettings) -> dict[str, float]:
    """This rank's sums of the loss and logs over its slice (each batch's mean times its size), and its count."""
    rows = dist.shard_rows(len(split.x), batch_size)
    generator = torch.Generator(device=device)
    totals: dict[str, torch.Tensor] = {}
    count = 0
    for index, (x, y) in enumerate(iterate_eval(split.x[rows], split.y[rows], batch_size), rows.start // batch_size):
        generator.manual_seed((settings.seed + index * _EVAL_BATCH_SEED_STRIDE) % 2**63)
        with autocast(settings.precision, device):
            loss, logs = objective(model, x, y, generator)
        for key, value in {"loss": loss, **logs}.items():
            totals[key] = totals.get(key, 0) + value.detach().float() * len(x)
        count += len(x)
    return {_EXAMPLES: count, **{key: value.item() for key, value in totals.items()}}
