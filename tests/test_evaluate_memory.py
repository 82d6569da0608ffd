"""`ptft evaluate` streams: what it holds does not grow with the split beyond the logits / features."""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_finetune_config, tiny_pretrain_config, write_yaml

SCALE = 8
EVAL_BATCH = 200
TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)
# The bytes held are also measured whenever a function of evaluate returns (what it collected over all batches).
MEASURED_FILES = ("ptft/evaluation.py",)


def _storages(obj, seen: set[int]) -> None:
    """Storage addresses of every tensor reachable through a data bundle's fields."""
    if isinstance(obj, torch.Tensor):
        seen.add(obj.untyped_storage().data_ptr())
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            _storages(item, seen)
    elif hasattr(obj, "__dict__"):
        for value in vars(obj).values():
            _storages(value, seen)


def _held_bytes(excluded: set[int]) -> int:
    """Bytes of the storages of every live Python-visible tensor, outside the data and the weights."""
    held: dict[int, int] = {}
    for obj in gc.get_objects():
        if type(obj) in TENSOR_TYPES:  # not isinstance: cheaper over ~500k objects, and no lazy-module warnings
            storage = obj.untyped_storage()
            if storage.data_ptr() not in excluded:
                held[storage.data_ptr()] = storage.nbytes()
    return sum(held.values())


def _peak_extra_bytes(ptft, monkeypatch, target: Path, test_size: int) -> tuple[int, dict]:
    """Evaluate `target` on a synthetic test split of `test_size`; the peak bytes evaluate held."""
    from ptft import evaluation
    from ptft.data import sources

    monkeypatch.setattr(sources, "SYNTHETIC_TEST_SIZE", test_size)
    excluded: set[int] = set()
    peak = [0]
    real_build_data, real_build_model = evaluation.build_data, evaluation.build_model_for

    def build_data(*args, **kwargs):
        bundle = real_build_data(*args, **kwargs)
        _storages(bundle, excluded)
        return bundle

    def build_model_for(*args, **kwargs):
        model = real_build_model(*args, **kwargs)

        excluded.update(p.untyped_storage().data_ptr() for p in model.parameters())
        excluded.update(b.untyped_storage().data_ptr() for b in model.buffers())
        model.encoder.register_forward_hook(lambda *_: measure())  # once per batch, in every evaluate path
        return model

    def measure() -> None:
        peak[0] = max(peak[0], _held_bytes(excluded))

    def on_return(frame, event, arg) -> None:
        # Catches what a function collected over all batches at the moment it hands it back.
        if event == "return" and excluded and frame.f_code.co_filename.endswith(MEASURED_FILES):
            measure()

    monkeypatch.setattr(evaluation, "build_data", build_data)
    monkeypatch.setattr(evaluation, "build_model_for", build_model_for)
    gc.collect()
    sys.setprofile(on_return)
    try:
        result = ptft("evaluate", target, f"data.eval_batch_size={EVAL_BATCH}")
    finally:
        sys.setprofile(None)
    assert result.code == 0, result.stderr
    return peak[0], json.loads(result.stdout)


def _trained(ptft, tmp_path: Path, kind: str) -> Path:
    data = {"name": "synthetic", "batch_size": 50}
    if kind == "autoencoder":
        cfg = tiny_pretrain_config(tmp_path / "run", data=data, train={"max_steps": 2, "eval_every_steps": 2})
        command = "pretrain"
    else:
        cfg = tiny_finetune_config(tmp_path / "run", None, data={**data, "labels_per_class": None},
                                   train={"max_steps": 2, "eval_every_steps": 2})
        command = "finetune"
    result = ptft(command, write_yaml(tmp_path / "cfg.yaml", cfg))
    assert result.code == 0, result.stderr
    return tmp_path / "run"


@pytest.mark.parametrize("kind", ["classifier", "autoencoder"])
def test_evaluate_memory_does_not_grow_with_the_split_beyond_its_outputs(kind, ptft, tmp_path, monkeypatch):
    torch.manual_seed(0)
    run = _trained(ptft, tmp_path, kind)
    base = 200
    small, small_metrics = _peak_extra_bytes(ptft, monkeypatch, run, base)
    large, large_metrics = _peak_extra_bytes(ptft, monkeypatch, run, SCALE * base)
    assert small_metrics["num_examples"] == base and large_metrics["num_examples"] == SCALE * base
    # Allowed growth: one float32 row of logits / features per extra example (8 of either here),
    # plus a little slack for allocator-sized odds and ends. Keeping the inputs (64 floats an
    # image) or the reconstructions, as a collect-then-compute evaluate does, exceeds it many times.
    per_example = 8 * 4 if kind == "autoencoder" else 10 * 4
    allowed = (SCALE - 1) * base * per_example + 16 * 1024
    assert large - small <= allowed, f"held {small} bytes for {base} examples, {large} for {SCALE * base}"
