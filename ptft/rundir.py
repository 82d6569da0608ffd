"""The run directory: refusing to clobber a run, resume compatibility, the saved config."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ptft import checkpoint as ckpt
from ptft.config import Config, config_diff, config_to_yaml, load_config
from ptft.errors import RunDirError, UserError

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"

# Keys a resumed run may change: they extend or observe training without changing what
# the run means. Anything else (model, data, objective, optimizer...) is refused.
RESUME_MUTABLE_KEYS = frozenset({
    "run.dir", "train.max_steps", "train.epochs", "train.device", "train.log_every_steps", "train.compile",
    "train.eval_every_steps", "train.early_stopping_patience", "checkpoint.keep_last", "checkpoint.every_steps",
    "data.root", "data.download", "data.eval_batch_size",
})


def holds_run(run_dir: Path) -> bool:
    return (run_dir / CONFIG_FILE).exists() or ckpt.run_has_checkpoints(run_dir)


def prepare_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> Path | None:
    """Make `run_dir` ready for a run; return the checkpoint to resume from, if resuming.

    Raises:
        RunDirError: the directory holds a run and neither flag was given, both flags were
            given, there is nothing to resume, or the directory cannot be written.
    """
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite contradict each other; pass one")
    if resume:
        if not ckpt.run_has_checkpoints(run_dir):
            raise RunDirError(f"--resume: run.dir '{run_dir}' holds no checkpoint to resume from")
        return ckpt.resolve_checkpoint(run_dir / "checkpoints" / "last")
    if holds_run(run_dir):
        if not overwrite:
            raise RunDirError(
                f"run.dir '{run_dir}' already holds a run; pass --resume to continue it, --overwrite to replace it, "
                f"or choose another run.dir=..."
            )
        for name in ("checkpoints", "eval"):
            shutil.rmtree(run_dir / name, ignore_errors=True)
        (run_dir / METRICS_FILE).unlink(missing_ok=True)
    ensure_writable(run_dir)
    return None


def ensure_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise RunDirError(f"run.dir '{run_dir}' is not writable: {exc.strerror or exc}") from None


def check_resume_compatible(run_dir: Path, cfg: Config) -> None:
    """Refuse a resume whose config changes the run's meaning, listing the differing keys."""
    saved = load_config(run_dir / CONFIG_FILE)
    changed = [key for key in config_diff(saved, cfg) if key not in RESUME_MUTABLE_KEYS]
    if changed:
        raise UserError(
            f"--resume: the config differs from the run in '{run_dir}' in keys that change what the run means: "
            f"{', '.join(changed)}. Resume with the run's own config ({run_dir / CONFIG_FILE}), or start a new run.dir "
            f"(only {', '.join(sorted(RESUME_MUTABLE_KEYS))} may change)"
        )


def write_config(run_dir: Path, cfg: Config) -> None:
    """Write the resolved config atomically: it alone reproduces the run."""
    tmp = run_dir / f".{CONFIG_FILE}.tmp-{os.getpid()}"
    tmp.write_text(config_to_yaml(cfg))
    os.replace(tmp, run_dir / CONFIG_FILE)
