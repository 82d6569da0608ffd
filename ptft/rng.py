"""Randomness: global RNG state (torch, CUDA, python `random`, numpy) captured into a checkpoint and
restored from it, and the per-step seeds of a training micro-batch (`StepRandomness`).

Held as tensors, lists and numbers only, so state.pt loads with `weights_only=True`.
"""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch

from ptft import distributed as dist


def capture_rng_state(device: torch.device | str = "cpu") -> dict:
    """Global RNG states of torch (CPU and the training device's CUDA), python `random` and numpy.

    Only the training device's CUDA generator (`cuda:N` is not the current device), and only
    once CUDA is in use: touching every GPU from every DDP rank would create a context (and
    waste memory) on each of them.
    """
    device = torch.device(device)
    uses_cuda = device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_initialized()
    version, internal, gauss_next = random.getstate()
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)  # keys: (624,) uint32
    return {
        "torch": torch.get_rng_state(),
        "cuda": [torch.cuda.get_rng_state(device)] if uses_cuda else [],
        "python": [version, list(internal), gauss_next],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
    }


def restore_rng_state(state: dict, device: torch.device | str = "cpu") -> None:
    """Undo `capture_rng_state`; the CUDA state goes to the training `device`."""
    device = torch.device(device)
    torch.set_rng_state(state["torch"])
    if state["cuda"] and device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"][0], device)
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    saved = state["numpy"]
    np.random.set_state(("MT19937", saved["keys"].numpy().astype(np.uint32), saved["pos"],
                         saved["has_gauss"], saved["cached_gaussian"]))


# 2**64 / golden ratio: odd, so rank * stride differs in the low 32 bits for every pair of ranks.
_RANK_STRIDE = 0x9E3779B97F4A7C15


def step_seed(run_seed: int, step: int, micro: int, rank: int = 0) -> int:
    """Seed of the per-step generator (noise, masks, augmentations): a function of the step alone.

    Under DDP each rank draws its own noise for its own slice of the batch; rank 0 draws
    what a single process draws. A CPU generator keeps only the seed's low 32 bits, so the
    rank enters them too, times an odd constant: ranks never share a seed at the same step.
    """
    return (run_seed * 1_000_003 + step * 64 + micro + rank * _RANK_STRIDE) % (2**63)


def _model_rng_seed(run_seed: int, step: int, micro: int, rank: int) -> int:
    """Seed of torch's global generators for one micro-batch; unrelated to `step_seed`'s stream."""
    digest = hashlib.sha256(f"ptft-model-rng:{run_seed}:{rank}:{step}:{micro}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _global_seeders(device: torch.device) -> list:
    """Seed setters of the global generators a forward on `device` draws from (dropout)."""
    seeders = [torch.default_generator.manual_seed]
    if device.type == "cuda":
        # This process's training GPU only: torch.manual_seed would reseed every GPU it sees.
        torch.cuda.init()
        index = device.index if device.index is not None else torch.cuda.current_device()
        seeders.append(torch.cuda.default_generators[index].manual_seed)
    elif device.type == "mps":
        seeders.append(torch.mps.manual_seed)
    return seeders


class StepRandomness:
    """Every random draw of a training micro-batch, as a function of (seed, rank, step, micro).

    The objective draws noise, masks and views from `generator`; the model (dropout) draws from
    torch's global generators. Both are reseeded before every micro-batch on every rank, rank 0
    included, so what a step draws never depends on where the run last started: a resumed run
    draws what an unbroken one does on each rank, and no rank's stream needs saving. Reseeding
    takes microseconds and no device sync.
    """

    def __init__(self, run_seed: int, device: torch.device):
        self.run_seed, self.rank = run_seed, dist.rank()
        self.generator = torch.Generator(device=device)
        self._seeders = _global_seeders(device)

    def reseed(self, step: int, micro: int) -> torch.Generator:
        """Seed every generator for micro-batch `micro` of `step`; return the objective's."""
        self.generator.manual_seed(step_seed(self.run_seed, step, micro, self.rank))
        model_seed = _model_rng_seed(self.run_seed, step, micro, self.rank)
        for seed in self._seeders:
            seed(model_seed)
        return self.generator
