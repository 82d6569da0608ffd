"""The run directory: where each file of a run lives, and getting a directory ready for a run.

    RUN_DIR/config.yaml  metrics.jsonl  metrics.csv  tensorboard/  .lock
            checkpoints/{step-XXXXXXXX/, last, best}  eval/<split>/metrics.json

`RunDir` is the only place that spells these names; everything else asks it for paths. The path
part imports nothing of ptft's checkpoint code (checkpoint.py builds its paths from it); the
preparation helpers below that need checkpoints import checkpoint.py inside their body.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ptft.config import Config, config_diff, config_to_yaml, load_config
from ptft.durable import replacing
from ptft.errors import RunDirError, UserError
from ptft.optim import SCHEDULES

try:
    import fcntl
except ImportError:  # Windows: no flock; runs there go unlocked
    fcntl = None

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
METRICS_CSV_FILE = "metrics.csv"
TENSORBOARD_DIR = "tensorboard"
LOCK_FILE = ".lock"
CHECKPOINTS_DIR = "checkpoints"
EVAL_DIR = "eval"
EVAL_METRICS_FILE = "metrics.json"
LAST, BEST = "last", "best"
STEP_DIR_PATTERN = re.compile(r"step-(\d{8,})")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


@dataclass(frozen=True)
class RunDir:
    """The paths of one run directory; computing them touches no file."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))  # RunDir("runs/x") works too

    @classmethod
    def at(cls, path: Path | str) -> RunDir:
        return cls(Path(path))

    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def metrics(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def metrics_csv(self) -> Path:
        return self.root / METRICS_CSV_FILE

    @property
    def tensorboard(self) -> Path:
        """TensorBoard's event files (train.loggers: [tensorboard])."""
        return self.root / TENSORBOARD_DIR

    @property
    def lock(self) -> Path:
        return self.root / LOCK_FILE

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS_DIR

    @property
    def last(self) -> Path:
        return self.checkpoints / LAST

    @property
    def best(self) -> Path:
        return self.checkpoints / BEST

    @property
    def outputs(self) -> tuple[Path, ...]:
        """What `--overwrite` clears; config.yaml is rewritten by the new run."""
        return self.checkpoints, self.root / EVAL_DIR, self.metrics, self.metrics_csv, self.tensorboard

    def eval_metrics(self, split: str) -> Path:
        return self.root / EVAL_DIR / split / EVAL_METRICS_FILE

    def step_dir(self, step: int) -> Path:
        return self.checkpoints / step_dir_name(step)

    def step_dirs(self) -> list[Path]:
        """The run's step directories (absolute), oldest step first."""
        return list_step_dirs(self.root.absolute() / CHECKPOINTS_DIR)

    def has_checkpoints(self) -> bool:
        return bool(self.step_dirs())

    @classmethod
    def of_target(cls, path: Path | str) -> RunDir:
        """The run of a target as the user wrote it: RUN, RUN/checkpoints or RUN/checkpoints/<step|pointer>.

        Read from the path, not from where its symlinks lead: a run whose checkpoints/ links to a
        shared scratch volume keeps its eval/ at home, not beside every other run's checkpoints.
        A step directory outside any run gets its eval/ beside it.
        """
        path = Path(os.path.abspath(path))  # `..` collapsed as written, symlinks kept
        if cls(path).checkpoints.is_dir():
            return cls(path)
        if is_checkpoints_dir(path):
            return cls(path.parent)
        return cls(path.parent.parent if path.parent.name == CHECKPOINTS_DIR else path.parent)


def is_checkpoints_dir(path: Path) -> bool:
    """Whether `path` is a run's checkpoints/ directory (by name, or by holding a last/best pointer)."""
    return path.name == CHECKPOINTS_DIR or any((path / name).is_symlink() for name in (LAST, BEST))


def list_step_dirs(ckpt_dir: Path) -> list[Path]:
    """The step directories in a checkpoints/ directory, oldest step first; temps and pointers skipped."""
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), entry) for entry in ckpt_dir.iterdir()
             if (m := STEP_DIR_PATTERN.fullmatch(entry.name)) and entry.is_dir() and not entry.is_symlink()]
    return [entry for _, entry in sorted(found)]


# Keys a resumed run may change: they extend or observe training without changing what
# the run means. Anything else (model, data, objective, optimizer...) is refused.
RESUME_MUTABLE_KEYS = frozenset({
    "run.dir", "train.max_steps", "train.epochs", "train.device", "train.log_every_steps", "train.compile",
    "train.eval_every_steps", "train.early_stopping_patience", "checkpoint.keep_last", "checkpoint.every_steps",
    "data.root", "data.download", "data.eval_batch_size", "train.loggers",
})


@contextlib.contextmanager
def run_dir_lock(run_dir: Path, *, resume: bool = False) -> Iterator[None]:
    """Hold an exclusive lock on `run_dir` (creating it, unless resuming) until the block ends.

    Two runs in one directory would delete each other's temp checkpoints and interleave
    metrics.jsonl. The lock is a flock on `RUN_DIR/.lock`, which holds the holder's pid for
    the message; the kernel drops it when the holder dies, even by `kill -9`, so a killed
    run never blocks `--resume`. The file itself stays: unlinking it would let a third run
    lock a new file while the second still holds the old one.

    Raises:
        RunDirError: another live process holds the lock, or the directory cannot be written.
    """
    path = RunDir(run_dir).lock
    if resume and not run_dir.is_dir():  # refused before the lock would create an empty run directory
        raise RunDirError(NOTHING_TO_RESUME.format(run_dir=run_dir))
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise RunDirError(f"run.dir '{run_dir}' is not writable: {exc.strerror or exc}") from None
    try:
        _lock(fd, run_dir)
        yield
    finally:
        os.close(fd)  # releases the lock


def _lock(fd: int, run_dir: Path) -> None:
    if fcntl is None:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        raise RunDirError(
            f"run.dir '{run_dir}' is in use by another ptft run (pid {holder}); wait for it to finish or stop it "
            f"(then --resume continues it), or choose another run.dir=..."
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


NOTHING_TO_RESUME = "--resume: run.dir '{run_dir}' holds no checkpoint to resume from"


def holds_run(run_dir: Path) -> bool:
    run = RunDir(run_dir)
    return run.config.exists() or run.has_checkpoints()


def prepare_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> Path | None:
    """Make `run_dir` ready for a run; return the checkpoint to resume from, if resuming.

    Raises:
        RunDirError: the directory holds a run and neither flag was given, both flags were
            given, there is nothing to resume, or the directory cannot be written.
    """
    from ptft.checkpoint import resolve_checkpoint  # checkpoint.py builds its paths from this module

    if resume and overwrite:
        raise RunDirError("--resume and --overwrite contradict each other; pass one")
    run = RunDir(run_dir)
    if resume:
        if not run.has_checkpoints():
            raise RunDirError(NOTHING_TO_RESUME.format(run_dir=run_dir))
        return resolve_checkpoint(run.last)
    if holds_run(run_dir):
        if not overwrite:
            raise RunDirError(
                f"run.dir '{run_dir}' already holds a run; pass --resume to continue it, --overwrite to replace it, "
                f"or choose another run.dir=..."
            )
        for path in run.outputs:
            _remove_outputs(path)
    ensure_writable(run_dir)
    return None


def _remove_outputs(path: Path) -> None:
    """Delete a previous run's outputs; a symlinked directory is emptied and the link kept.

    rmtree refuses a symlink, and ignoring that error kept the old run (its `best`, its
    higher step numbers) under the new one.
    """
    try:
        for entry in path.iterdir() if path.is_symlink() and path.is_dir() else [path]:
            # Links inside are removed, never followed: only the top-level link leads to our outputs.
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink(missing_ok=True)
    except OSError as exc:
        raise RunDirError(f"--overwrite: could not delete '{exc.filename or path}' of the previous run: "
                          f"{exc.strerror or exc}") from None


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
    saved = load_config(RunDir(run_dir).config)
    changed = [key for key in config_diff(saved, cfg) if key not in RESUME_MUTABLE_KEYS]
    if changed:
        raise UserError(
            f"--resume: the config differs from the run in '{run_dir}' in keys that change what the run means: "
            f"{', '.join(changed)}. Resume with the run's own config ({RunDir(run_dir).config}), or start a new run.dir "
            f"(only {', '.join(sorted(RESUME_MUTABLE_KEYS))} may change)"
        )
    _check_schedule_length(run_dir, saved, cfg)


def _run_length(cfg: Config) -> tuple[str, int]:
    # max_steps wins over epochs (stages.loop_settings), so only the key in force sets the length.
    if cfg.train.max_steps:
        return "train.max_steps", cfg.train.max_steps
    return "train.epochs", cfg.train.epochs


def _check_schedule_length(run_dir: Path, saved: Config, cfg: Config) -> None:
    """A schedule spread over the run's length (cosine) would jump if a resume changed the length."""
    (old_key, old), (key, new) = _run_length(saved), _run_length(cfg)
    if (old_key, old) == (key, new) or not SCHEDULES.meta(cfg.schedule.name).get("length_dependent"):
        return
    raise UserError(
        f"--resume: {key}={new} changes the length of the run in '{run_dir}' ({old_key}={old}), but "
        f"schedule.name '{cfg.schedule.name}' spreads the learning rate over that length, so it would jump "
        f"mid-run. Resume with {old_key}={old}, or train longer as a new run from its weights: "
        f"run.dir=NEW_DIR init.checkpoint={RunDir(run_dir).last} {key}=..."
    )


def write_config(run_dir: Path, cfg: Config) -> None:
    """Write the resolved config atomically: it alone reproduces the run."""
    with replacing(RunDir(run_dir).config) as tmp:
        tmp.write_text(config_to_yaml(cfg))
