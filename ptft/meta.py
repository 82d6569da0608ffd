"""meta.json: the facts a checkpoint carries, as one typed record, built and read only here.

A run's facts are fixed when it starts (`run_meta`: config, model, data split, versions,
lineage); each checkpoint adds where it stands (`CheckpointMeta.at`: step, epoch, metrics,
best). The JSON keys are the on-disk contract. A new field is added here alone: every
checkpoint then writes it, and older checkpoints, which lack it, load with its default.
"""

from __future__ import annotations

import dataclasses
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path

import torch

import ptft
from ptft.config import Config, config_hash
from ptft.data.images import RULES_VERSION
from ptft.errors import CheckpointError
from ptft.models import model_kind

# Bumped when a checkpoint directory changes in a way older ptft versions cannot read.
FORMAT_VERSION = 1
FORMAT_KEY = "format_version"


_WRITTEN_WHEN_SET = ("memory", "ema")


@dataclass(frozen=True, kw_only=True)
class CheckpointMeta:
    """One checkpoint's meta.json. Fields default to "not recorded" (older checkpoints, tests)."""

    stage: str | None = None  # "pretrain" | "finetune"
    config_hash: str | None = None  # sha256 of the resolved config, run.dir excluded
    config: dict | None = None  # the resolved config as JSON: alone it reproduces the run
    model: dict | None = None  # {"name", "options", "kind"}
    objective: str | None = None
    data: dict | None = None  # the data fingerprint (ptft/data/fingerprint.py)
    # What predict / embed / export need to feed the model without the training data at hand.
    inputs: dict | None = None  # {"shape": [C, H, W], "class_names": [...], "normalize": {"mean", "std"} | None}
    versions: dict | None = None  # {"ptft", "torch", "python"}
    parent: dict | None = None  # init.checkpoint's facts (lineage.parent_facts); None without one
    lineage: list[dict] = field(default_factory=list)  # the ancestors, oldest first
    step: int | None = None
    epoch: float | None = None
    metrics: dict = field(default_factory=dict)  # validation metrics of this step, if it evaluated
    best: dict | None = None  # {"monitor", "value", "step"}: the run's best so far
    # Peak memory of this process up to this checkpoint (runtime.peak_memory): sizes the machine a
    # stage needs. {"device": "cuda:0", "peak_host_bytes": int, "peak_device_bytes": int | None}
    memory: dict | None = None
    # {"decay": d}: model.safetensors holds an exponential moving average of the trained weights
    # (train.ema_decay); None: the trained weights themselves.
    ema: dict | None = None
    format_version: int = FORMAT_VERSION

    def at(self, *, step: int, epoch: float, metrics: dict, best: dict, memory: dict | None = None) -> CheckpointMeta:
        """A copy for the checkpoint of `step`."""
        return dataclasses.replace(self, step=step, epoch=round(epoch, 4), metrics=metrics, best=best,
                                   memory=memory)

    def with_lineage_of(self, saved: CheckpointMeta) -> CheckpointMeta:
        """A copy keeping `saved`'s parent and lineage: they belong to the run, not to one invocation."""
        return dataclasses.replace(self, parent=saved.parent, lineage=list(saved.lineage))

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        # Keys added after format 1 appear only when recorded: an older checkpoint's meta.json
        # reads back and writes out byte-identical.
        return {key: value for key, value in data.items() if key not in _WRITTEN_WHEN_SET or value is not None}

    @classmethod
    def from_json(cls, data: dict) -> CheckpointMeta:
        """The record of a meta.json object; keys this ptft does not know are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})


def run_meta(cfg: Config, stage: str, data, parent: dict | None) -> CheckpointMeta:
    """The facts every checkpoint of a run carries; `data` is the run's DataBundle."""
    return CheckpointMeta(
        stage=stage, config_hash=config_hash(cfg), config=cfg.model_dump(mode="json"),
        model={"name": cfg.model.name, "options": cfg.model.options,
               "kind": model_kind(cfg.model.name, cfg.objective.name)},  # "autoencoder": a backbone + ptft's decoder
        objective=cfg.objective.name, data=data.fingerprint,
        inputs={"shape": list(data.input_shape), "class_names": list(data.class_names),
                "normalize": data.normalization, "pixel_rules": RULES_VERSION,
                "decoded_size": list(data.stored_size) if data.stored_size else None},
        versions={"ptft": ptft.__version__, "torch": torch.__version__, "python": platform.python_version()},
        parent=parent, lineage=list(parent["lineage"]) if parent else [],
        ema={"decay": cfg.train.ema_decay} if cfg.train.ema_decay is not None else None,
    )


def meta_json_bytes(meta: CheckpointMeta) -> bytes:
    """meta.json's bytes: sorted keys, so equal records write equal files."""
    return (json.dumps(meta.to_json(), sort_keys=True, indent=2) + "\n").encode()


def read_meta_json(path: Path) -> dict:
    """A meta.json file as JSON, after checking this ptft reads its checkpoint format.

    Raises:
        CheckpointError: unreadable, not a ptft checkpoint's meta.json, or a newer format.
    """
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # ValueError: bad JSON or bad UTF-8
        raise CheckpointError(f"{path}: unreadable checkpoint metadata ({exc})") from None
    version = data.get(FORMAT_KEY) if isinstance(data, dict) else None
    if not isinstance(version, int):
        raise CheckpointError(f"{path}: no integer '{FORMAT_KEY}' (expected the meta.json of a ptft checkpoint)")
    if version > FORMAT_VERSION:
        writer = (data.get("versions") or {}).get("ptft")
        needed = f"ptft >= {writer}" if writer else f"a ptft that reads checkpoint format {version}"
        raise CheckpointError(f"checkpoint {path.parent} has format {version}, newer than this ptft "
                              f"({ptft.__version__}) reads (<= {FORMAT_VERSION}); it needs {needed}")
    return data
