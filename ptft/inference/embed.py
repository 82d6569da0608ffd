"""`ptft embed`: the encoder's features of every input, in one file for the user's own tools.

    .safetensors  tensors `features` (N, D) and `labels` (N,) int64 (-1: class unknown; only
                  when some input has a known class); metadata `paths` (JSON list, row order),
                  `class_names`, `checkpoint`, `errors`
    .npy          the features (N, D); the same facts in a sidecar `<name>.json`

Any checkpoint works: a finetuned classifier's, a pretrained autoencoder's or a bare encoder's,
since every ptft model keeps its encoder as `.encoder`. An input that cannot be read has no
row; it is listed under `errors` (path -> reason) and the command exits 2 at the end.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from ptft.console import note
from ptft.errors import UserError
from ptft.inference.output import atomic_file, check_out_path
from ptft.inference.stream import Batch, input_batches, run_batches
from ptft.inference.target import Target, load_target

EMBED_SUFFIXES = (".safetensors", ".npy")
DTYPES = {"float32": torch.float32, "float16": torch.float16}
NO_LABEL = -1


class _Rows:
    """Features, labels and paths of the inputs read so far, in input order."""

    def __init__(self, target: Target, dtype: torch.dtype):
        self.target, self.dtype = target, dtype
        self.features: list[torch.Tensor] = []
        self.paths: list[str] = []
        self.labels: list[int] = []
        self.errors: dict[str, str] = {}

    @torch.inference_mode()
    def add(self, batch: Batch) -> None:
        if len(batch.images):
            x = self.target.prep.to_model_input(batch.images).to(self.target.device)
            self.features.append(self.target.model.encoder(x).float().cpu().to(self.dtype))  # (G, D)
        for item, error in zip(batch.items, batch.errors):
            if error is not None:
                self.errors[item.path] = error
                continue
            self.paths.append(item.path)
            self.labels.append(NO_LABEL if item.true is None else item.true)

    def facts(self) -> dict:
        labelled = any(label != NO_LABEL for label in self.labels)
        return {"paths": self.paths, "labels": self.labels if labelled else None,
                "class_names": list(self.target.prep.class_names), "checkpoint": str(self.target.checkpoint),
                "errors": self.errors}


def embed(target: str, inputs: list[str], *, out: Path, split: str | None = None, dtype: str = "float32",
          batch_size: int = 256, workers: int | None = None) -> int:
    """Write the encoder features of every readable input to `out` (complete or absent).

    Returns:
        How many inputs could not be read (listed under `errors` in the file's facts).
    Raises:
        UserError: a bad target, INPUT, --out suffix or --dtype, or no readable input at all.
    """
    out = check_out_path(out)
    if out.suffix not in EMBED_SUFFIXES:
        raise UserError(f"--out '{out}': expected a file name ending in {' or '.join(EMBED_SUFFIXES)}")
    if dtype not in DTYPES:
        raise UserError(f"--dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    loaded = load_target(target, "embed")
    if not hasattr(loaded.model, "encoder"):
        raise UserError(f"embed: model {loaded.cfg.model.name!r} has no `encoder` attribute, so there are no "
                        f"features to take (ptft's models keep their encoder as `.encoder`)")
    total, batches = input_batches(loaded, inputs, split=split, batch_size=batch_size, workers=workers)
    rows = _Rows(loaded, DTYPES[dtype])
    run_batches(batches, total, "embed", rows.add)
    if not rows.paths:
        raise UserError(f"embed: none of the {total} inputs could be read (first: {next(iter(rows.errors.items()))}); "
                        f"nothing written")
    features = torch.cat(rows.features)  # (N, D)
    _write(out, features, rows.facts())
    note(f"embed: {len(rows.paths)} x {features.shape[1]} {dtype} features in {out}"
         + (f"; {len(rows.errors)} input(s) could not be read" if rows.errors else ""))
    return len(rows.errors)


def _write(out: Path, features: torch.Tensor, facts: dict) -> None:
    if out.suffix == ".safetensors":
        tensors = {"features": features.contiguous()}
        if facts["labels"] is not None:
            tensors["labels"] = torch.tensor(facts["labels"], dtype=torch.int64)
        metadata = {key: json.dumps(value) for key, value in facts.items() if key != "labels"}
        with atomic_file(out) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
        return
    sidecar = out.with_suffix(".json")
    # Both files are renamed only once both are written.
    with contextlib.ExitStack() as stack:
        features_tmp = stack.enter_context(atomic_file(out))
        facts_tmp = stack.enter_context(atomic_file(sidecar))
        np.save(features_tmp, features.numpy())
        facts_tmp.write_text(json.dumps({**facts, "shape": list(features.shape), "dtype": str(features.dtype)
                                         .removeprefix("torch.")}, indent=2) + "\n")
