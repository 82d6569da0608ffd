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


def parent_facts(source: InitSource, report: KeyReport) -> dict:
    """What a checkpoint records of the weights its run started from (meta.json `parent`)."""
    if source.meta is None:
        facts = {"path": source.given, "hash": ckpt.file_sha256(source.path), "lineage": []}
    else:
        facts = {"path": str(source.path), "hash": ckpt.checkpoint_hash(source.path),
                 "lineage": [*source.meta.lineage, lineage_entry(source.path, source.meta)]}
    return {**facts, "report": report.as_dict()}


def lineage_entry(step_dir: Path, meta: CheckpointMeta) -> dict:
    """One ancestor in a lineage: where it is, what it was, the hash of its weights."""
    return {"path": str(step_dir), "stage": meta.stage, "step": meta.step, "config_hash": meta.config_hash,
            "hash": ckpt.checkpoint_hash(step_dir)}
