"""Where a run's starting weights came from: the init checkpoint, its facts, the chain of ancestors.

A finetune checkpoint names the checkpoint it started from (path and sha256 of its weights,
`parent_facts`) and that checkpoint's own ancestors (`lineage`), so `inspect` and `evaluate`
show the whole chain. `init.checkpoint` is resolved once (`resolve_init`): a ptft checkpoint
brings its meta.json, whose data split is held against this run's (`check_parent_split`); a
foreign weights file brings only its hash.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ptft import checkpoint as ckpt
from ptft.data.fingerprint import val_overlap_problem
from ptft.data.normalize import IMAGENET
from ptft.errors import DataError
from ptft.meta import CheckpointMeta
from ptft.weights import KeyReport


@dataclass(frozen=True)
class InitSource:
    """`init.checkpoint`, resolved."""

    given: str  # as the config says: what messages and the key report show
    path: Path  # a ptft checkpoint's step directory, or the foreign weights file
    meta: CheckpointMeta | None  # a ptft checkpoint's meta.json; None for a foreign file

    @property
    def is_ptft(self) -> bool:
        return self.meta is not None


def resolve_init(init_cfg) -> InitSource:
    """Resolve `init_cfg.checkpoint` once: a ptft checkpoint (any form) to its step directory and meta.

    Raises:
        CheckpointError: a ptft checkpoint path that names no readable checkpoint.
    """
    given = str(init_cfg.checkpoint)
    if not ckpt.is_ptft_checkpoint(given):
        return InitSource(given, Path(given), None)
    step_dir = ckpt.resolve_checkpoint(given)
    return InitSource(given, step_dir, ckpt.load_meta(step_dir))


def check_parent_split(fingerprint: dict, source: InitSource) -> str | None:
    """Validation must not score examples the parent was trained on with their labels.

    Another split of the parent's data moves some of the parent's training examples into this
    run's validation split. A supervised parent has learnt their labels: its validation figures,
    and so the best checkpoint, would flatter it. A label-free parent has only seen the images.
    A foreign file records no split, so there is nothing to hold against.

    Returns:
        A one-line warning for a label-free parent split another way, else None.
    Raises:
        DataError: a supervised parent split the same data another way.
    """
    if source.meta is None:
        return None
    problem = val_overlap_problem(source.meta.data, fingerprint)
    if problem is None:
        return None
    if source.meta.objective == "supervised":
        raise DataError(f"{problem}. init.checkpoint {source.given} was trained with their labels (objective "
                        f"supervised): validation would flatter it, and pick the best checkpoint by it")
    return f"warning: {problem} (init.checkpoint {source.given} saw them without labels)"


def parent_facts(source: InitSource, report: KeyReport, expects: dict | None = None) -> dict:
    """What a checkpoint records of the weights its run started from (meta.json `parent`).

    `expects` (`expected_inputs`), recorded only when known: what those weights expect of their inputs.
    """
    if source.meta is None:
        facts = {"path": source.given, "hash": ckpt.file_sha256(source.path), "lineage": []}
    else:
        facts = {"path": str(source.path), "hash": ckpt.checkpoint_hash(source.path),
                 "lineage": [*source.meta.lineage, lineage_entry(source.path, source.meta)]}
    return {**facts, "report": report.as_dict(), **({"expects": expects} if expects else {})}


def expected_inputs(source: InitSource, model) -> dict | None:
    """What the init weights expect of their inputs: normalisation (mean, std) and size, or None if unknown.

    A library-format file (torchvision, timm) expects what its library's metadata says for the
    model's architecture (LibraryEncoder.preprocessing); a ptft checkpoint what its own parent
    expected, as recorded in its meta.json `parent.expects`, so the fact travels down a lineage.
    """
    if source.meta is not None:
        return (source.meta.parent or {}).get("expects")
    return getattr(model.encoder, "preprocessing", None)


def normalization_warning(normalize, expects: dict | None, source: InitSource, model) -> str | None:
    """A one-line warning when data.normalize is none but the library file's weights expect normalised RGB inputs.

    Not for a ptft checkpoint: its weights learnt whatever its run fed them. Grey data (a stem
    summed over RGB) has no per-channel equivalent to suggest, so it gets none either.
    """
    if source.is_ptft or normalize != "none" or not expects or "mean" not in expects or _input_channels(model) != 3:
        return None
    mean, std = [round(v, 4) for v in expects["mean"]], [round(v, 4) for v in expects["std"]]
    imagenet = {key: [round(v, 4) for v in values] for key, values in IMAGENET.items()}
    fix = "data.normalize: imagenet" if {"mean": mean, "std": std} == imagenet else \
        f"data.normalize: {{mean: {mean}, std: {std}}}"
    size = expects.get("crop_size") or expects.get("input_size", [None])[-1:]
    at = f" at {size[-1]} px" if size and size[-1] else ""
    return (f"warning: init.checkpoint {source.given} holds weights trained on inputs normalised with mean {mean} "
            f"and std {std}{at} ({expects.get('source', 'the library')}), but data.normalize is none: "
            f"set {fix}")


def lineage_entry(step_dir: Path, meta: CheckpointMeta) -> dict:
    """One ancestor in a lineage: where it is, what it was, the hash of its weights."""
    return {"path": str(step_dir), "stage": meta.stage, "step": meta.step, "config_hash": meta.config_hash,
            "hash": ckpt.checkpoint_hash(step_dir)}


def _input_channels(model) -> int | None:
    from ptft.models.backbones import first_conv

    try:
        return first_conv(model.encoder)[1].in_channels
    except ValueError:  # no conv: not a library backbone
        return None
