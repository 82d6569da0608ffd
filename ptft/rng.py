"""Global RNG state (torch, CUDA, python `random`, numpy) captured into a checkpoint and restored from it.

Held as tensors, lists and numbers only, so state.pt loads with `weights_only=True`.
"""

from __future__ import annotations

import random

import numpy as np
import torch


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
