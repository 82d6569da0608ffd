"""EMA of weights (train.ema_decay): an exponential moving average of what trains, validated and handed on.

After each optimizer step that updated the weights, E_t = decay * E_{t-1} + (1 - decay) * W_t, with
E_1 = W_1 (torch.optim.swa_utils.AveragedModel with get_ema_multi_avg_fn). The average, not the
trained weights, is what validation scores (so `best` picks among averages) and what a checkpoint's
model.safetensors holds (what finetune, evaluate, predict and export load). The trained weights and
the count of updates go into state.pt, so --resume continues both bitwise.
"""

from __future__ import annotations

import copy
import itertools

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ptft.errors import CheckpointError

STATE_KEY = "ema"  # state.pt's entry: the trained weights ("model", "objective") and "n_averaged"


class ModelEma:
    """The moving average of a model and its objective, following the trained ones given at construction.

    The objective is averaged with the model because its own weights (a contrastive projector, an MAE
    decoder) meet the model's in the validation loss and sit beside them in the checkpoint: averaging one
    side alone would score an average against weights it never trained with.
    """

    def __init__(self, model: torch.nn.Module, objective: torch.nn.Module, decay: float,
                 forward_model: torch.nn.Module | None = None):
        # The unwrapped modules (never DDP's wrapper), so keys and the update are the same on every rank.
        self.trained = torch.nn.ModuleDict({"model": model, "objective": objective})
        # use_buffers=True averages batch-norm running statistics too: statistics copied from the
        # trained model would describe the activations of its latest weights, not of the average's,
        # and the averaged network would normalise with the wrong mean and variance at validation.
        self.averaged = AveragedModel(self.trained, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        self.decay = decay
        # What validation runs in place of `model` when the loop trains another module over the model's
        # parameters (TrainParts.forward_model: a probe's head on precomputed features); None: `model`.
        self.forward_model = None if forward_model is None else self._counterpart(forward_model)

    @property
    def model(self) -> torch.nn.Module:
        """The averaged model: what validation scores and checkpoints save."""
        return self.averaged.module["model"]

    @property
    def objective(self) -> torch.nn.Module:
        """The averaged objective, scored and saved beside the averaged model."""
        return self.averaged.module["objective"]

    def _counterpart(self, module: torch.nn.Module) -> torch.nn.Module:
        """A copy of `module` in which every submodule, parameter or buffer it shares with the trained
        modules is the averaged one."""
        # The average is a deepcopy of the trained modules, so both list their parts in one order.
        def parts(root: torch.nn.Module):
            return itertools.chain(root.modules(), root.parameters(), root.buffers())

        pairs = zip(parts(self.trained), parts(self.averaged.module), strict=True)
        return copy.deepcopy(module, memo={id(trained): averaged for trained, averaged in pairs})

    @property
    def updates(self) -> int:
        return int(self.averaged.n_averaged)

    @torch.no_grad()
    def update(self) -> None:
        """Fold in the trained weights; called once per optimizer step that changed them."""
        self.averaged.update_parameters(self.trained)

    def resume_state(self) -> dict:
        """State.pt's `STATE_KEY` entry: the trained weights and the update count (the average itself is
        model.safetensors)."""
        return {"model": self.trained["model"].state_dict(), "objective": self.trained["objective"].state_dict(),
                "n_averaged": self.updates}

    def restore(self, model_state: dict, objective_state: dict, state: dict | None) -> None:
        """Resume: the average from model.safetensors (`model_state`, `objective_state`: `unpack_weights`'),
        the trained weights and the count from state.pt's `STATE_KEY` entry (`state`).

        Raises:
            CheckpointError: the checkpoint holds no EMA state (saved without train.ema_decay).
        """
        if state is None:
            raise CheckpointError("train.ema_decay is set but the checkpoint to resume from holds no EMA state "
                                  "(it was saved without train.ema_decay); resume with the run's own config")
        self.model.load_state_dict(model_state)
        self.objective.load_state_dict(objective_state)
        self.trained["model"].load_state_dict(state["model"])
        self.trained["objective"].load_state_dict(state["objective"])
        self.averaged.n_averaged.fill_(int(state["n_averaged"]))


def build_ema(decay: float | None, model: torch.nn.Module, objective: torch.nn.Module,
              forward_model: torch.nn.Module | None = None) -> ModelEma | None:
    """The EMA for train.ema_decay (None: off) of `model` and `objective`, unwrapped, uncompiled, on their
    device: the average starts as a copy of them as they are now (see ModelEma for `forward_model`)."""
    return None if decay is None else ModelEma(model, objective, decay, forward_model)
