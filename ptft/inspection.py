"""`ptft models` and `ptft inspect`: what the registries hold, what a checkpoint is."""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from ptft.console import stderr
from ptft.errors import UserError


def registries() -> dict:
    """Kind -> registry: config validation's one list (`load_registries`), so listing never imports torch."""
    from ptft.config.validation import load_registries

    return load_registries()._asdict()


def registry_listing() -> dict:
    """Kind -> name -> {"description", and "kind" for models}: what `ptft models --json` prints."""
    listing = {}
    for title, registry in registries().items():
        entries = {}
        for name, description in registry.describe().items():
            entry = {"description": description}
            if title == "models":
                entry["kind"] = registry.meta(name).get("kind", "")  # a family line gives its family's
            entries[name] = entry
        listing[title] = entries
    return listing


def print_registries(*, as_json: bool = False) -> None:
    """One table per registry on stderr (people), or the listing as one JSON object on stdout (machines)."""
    listing = registry_listing()
    if as_json:
        print(json.dumps(listing, sort_keys=True))
        return
    for title, entries in listing.items():
        table = Table(title=title, title_justify="left", show_header=False, box=None, pad_edge=False)
        table.add_column("name", style="bold")
        if title == "models":
            table.add_column("kind")
        table.add_column("description")
        for name, entry in entries.items():
            kind = [entry["kind"]] if title == "models" else []
            table.add_row(name, *kind, entry["description"])
        stderr.print(table)
        stderr.print()


def _checkpoint_facts(path: Path) -> dict:
    from ptft import checkpoint as ckpt

    meta = ckpt.load_meta(path)
    return {
        "checkpoint": str(path), "step": meta.step, "epoch": meta.epoch, "stage": meta.stage,
        "metrics": meta.metrics, "best": meta.best, "config_hash": meta.config_hash,
        "model": meta.model, "objective": meta.objective, "data": meta.data,
        "versions": meta.versions, "hash": ckpt.checkpoint_hash(path),
        "parent": {k: v for k, v in (meta.parent or {}).items() if k != "report"} or None,
        "lineage": meta.lineage,
    }


def inspect_target(target: Path, *, as_json: bool = False) -> dict:
    """Facts about a checkpoint, or about each checkpoint of a run directory.

    Raises:
        UserError: the target is neither a run directory nor a checkpoint.
    """
    from ptft import checkpoint as ckpt
    from ptft.rundir import RunDir

    run = RunDir(target)
    if run.root.is_dir() and run.checkpoints.is_dir():
        facts = {"run": str(run.root), "checkpoints": [_checkpoint_facts(p) for p in run.step_dirs()],
                 "last": _pointer(run.last), "best": _pointer(run.best)}
    else:
        facts = _checkpoint_facts(ckpt.resolve_checkpoint(run.root))
    if as_json:
        print(json.dumps(facts, sort_keys=True))
    else:
        _print_facts(facts)
    return facts


def _pointer(pointer: Path) -> str | None:
    return str(pointer.resolve()) if pointer.exists() else None


def _print_facts(facts: dict) -> None:
    if "run" in facts:
        table = Table(title=f"run {facts['run']}", title_justify="left")
        for column in ("checkpoint", "step", "metrics", "pointer"):
            table.add_column(column)
        for item in facts["checkpoints"]:
            marks = [n for n in ("last", "best") if facts[n] == str(Path(item["checkpoint"]).resolve())]
            metrics = "  ".join(f"{k} {v:.4g}" for k, v in item["metrics"].items() if isinstance(v, (int, float)))
            table.add_row(Path(item["checkpoint"]).name, str(item["step"]), metrics, ", ".join(marks))
        stderr.print(table)
        return
    if not facts.get("checkpoint"):
        raise UserError("inspect: nothing to show")
    table = Table(title=f"checkpoint {facts['checkpoint']}", title_justify="left", show_header=False)
    for key in ("stage", "step", "epoch", "config_hash", "hash"):
        table.add_row(key, str(facts[key]))
    table.add_row("model", json.dumps(facts["model"]))
    table.add_row("metrics", json.dumps(facts["metrics"]))
    table.add_row("versions", json.dumps(facts["versions"]))
    for i, ancestor in enumerate(facts["lineage"]):
        table.add_row(f"lineage[{i}]", f"{ancestor.get('stage')} step {ancestor.get('step')}: {ancestor.get('path')}")
    stderr.print(table)
