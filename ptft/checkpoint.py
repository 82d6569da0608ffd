"""Checkpoint directories: atomic writes, last/best pointers, pruning, safe loading, the weights' keys.

    RUN_DIR/checkpoints/step-00000500/{model.safetensors, state.pt, meta.json}
    RUN_DIR/checkpoints/last, best      relative symlinks to step directories

A step directory is written under a `.tmp-*` name and renamed into place once every file is
on disk; pointers move afterwards by an atomic replace, `best` before `last`. So a crash at
any moment leaves last/best pointing at complete checkpoints, `best` never older than what
`last`'s state knows of (a resume re-points it, see `point_best_at`), and leftovers are
`.tmp-*` entries that the next save removes (unless their writer's pid is alive). Loading
never unpickles arbitrary objects: weights go through safetensors, state through
`torch.load(weights_only=True)`. Paths come from `ptft.rundir`, meta.json from `ptft.meta`.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as _load_safetensors
from safetensors.torch import save as _safetensors_bytes

from ptft.durable import fsync_path
from ptft.errors import CheckpointError
from ptft.meta import CheckpointMeta, meta_json_bytes, read_meta_json
from ptft.rundir import BEST, LAST, RunDir, is_checkpoints_dir, list_step_dirs, step_dir_name

WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "state.pt"
META_FILE = "meta.json"
CHECKPOINT_FILES = (WEIGHTS_FILE, STATE_FILE, META_FILE)
# The objective's own weights (e.g. the contrastive projector) sit beside the model's under this prefix.
OBJECTIVE_PREFIX = "objective."
TMP_PREFIX = ".tmp-"
TMP_PID_PATTERN = re.compile(r"-(\d+)$")
ACCEPTED_FORMS = "a step directory, a last/best pointer, a checkpoints/ directory or a run directory"


def pack_weights(model: torch.nn.Module, objective: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What model.safetensors holds: the model's keys, and the objective's under `objective.`."""
    weights = dict(model.state_dict())
    weights.update({OBJECTIVE_PREFIX + k: v for k, v in objective.state_dict().items()})
    return weights


def unpack_weights(weights: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Undo `pack_weights`: (the model's state dict, the objective's state dict)."""
    model = {k: v for k, v in weights.items() if not k.startswith(OBJECTIVE_PREFIX)}
    objective = {k[len(OBJECTIVE_PREFIX):]: v for k, v in weights.items() if k.startswith(OBJECTIVE_PREFIX)}
    return model, objective


def save_checkpoint(run_dir: Path, weights: dict[str, torch.Tensor], state: dict, meta: CheckpointMeta, *,
                    best: bool, keep_last: int, protect: Iterable[Path] = ()) -> Path:
    """Write `RUN_DIR/checkpoints/step-XXXXXXXX` atomically, move the pointers, prune old steps.

    Args:
        run_dir: the run directory; `checkpoints/` is created inside it.
        weights: model (and objective) tensors, on any device (`pack_weights`).
        state: optimizer, scheduler, RNG... state; must load with `weights_only=True`.
        meta: the checkpoint's facts; its `step` names the directory (an existing one is replaced).
        best: also point `best` at this checkpoint.
        keep_last: how many newest step directories pruning keeps (besides best and protected).
        protect: step directories pruning must never delete (e.g. the one a run resumed from).
    Returns:
        The absolute path of the new step directory.
    Raises:
        CheckpointError: a weight is NaN/infinite (nothing written), or writing failed (earlier
            checkpoints and pointers untouched, no temp directory left).
    """
    tensors = {name: t.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
               for name, t in weights.items()}
    _check_finite(tensors, meta.step)
    # Serialised in memory first, so every disk error surfaces as an OSError from one writer.
    files = {
        WEIGHTS_FILE: _safetensors_bytes(tensors, metadata={"format": "pt"}),
        STATE_FILE: _torch_bytes(state),
        META_FILE: meta_json_bytes(meta),
    }
    run = RunDir(run_dir)
    ckpt_dir, final = run.checkpoints, run.step_dir(meta.step)
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(ckpt_dir)
        _write_step_dir(ckpt_dir, final, files)
        # best first: a kill between the two moves then leaves `last` behind, and resuming from
        # it redoes this step. The other way round `best` would stay on an older step for good.
        if best:
            _point(ckpt_dir, BEST, final.name)
        _point(ckpt_dir, LAST, final.name)
        _prune(ckpt_dir, keep_last, protect)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        where = f" ({exc.filename})" if exc.filename else ""
        raise CheckpointError(f"could not write checkpoint {final}: {reason}{where}") from None
    return final.resolve()


def _check_finite(tensors: dict[str, torch.Tensor], step: int) -> None:
    for name, tensor in tensors.items():
        if (tensor.is_floating_point() or tensor.is_complex()) and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"refusing to save step {step}: weight {name!r} holds NaN or infinite values; "
                                  f"last/best still point to the previous checkpoint")


def _torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    # Makes the directory's entries (new files, renames) durable, not just the files' bytes.
    fsync_path(path)


def _remove_stale_temps(ckpt_dir: Path) -> None:
    """Remove what crashed writers left: partial step dirs, replaced or pruned dirs, pointer links.

    Every temp name ends in its writer's pid; a live writer's temps are its work in progress.
    """
    for entry in ckpt_dir.iterdir():
        if entry.name.startswith(TMP_PREFIX) and not _written_by_another_live_process(entry.name):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()


def _written_by_another_live_process(temp_name: str) -> bool:
    match = TMP_PID_PATTERN.search(temp_name)
    if match is None or int(match.group(1)) == os.getpid():
        return False
    try:
        os.kill(int(match.group(1)), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        pass
    return True


def _write_step_dir(ckpt_dir: Path, final: Path, files: dict[str, bytes]) -> None:
    tmp = ckpt_dir / f"{TMP_PREFIX}{final.name}-{os.getpid()}"
    try:
        tmp.mkdir()
        for name, data in files.items():
            _write_file(tmp / name, data)
        _fsync_dir(tmp)
        if final.exists():
            _replace_dir(tmp, final)
        else:
            os.rename(tmp, final)
        _fsync_dir(ckpt_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing left after a successful rename


def _replace_dir(new: Path, final: Path) -> None:
    """Swap in a re-saved step (a resumed run reaching a step a killed run had written).

    rename() cannot replace a non-empty directory, so the old one moves aside first. Pointers
    move only after a rename, so such a directory is normally no pointer's target; if it were,
    the pointer would dangle only between the two renames.
    """
    aside = final.parent / f"{TMP_PREFIX}replaced-{final.name}-{os.getpid()}"
    os.rename(final, aside)
    try:
        os.rename(new, final)
    except OSError:
        os.rename(aside, final)
        raise
    shutil.rmtree(aside)


def _point(ckpt_dir: Path, name: str, target: str) -> None:
    """Atomically make `ckpt_dir/name` a relative symlink to `target` (the run dir stays movable)."""
    link = ckpt_dir / f"{TMP_PREFIX}{name}-{os.getpid()}"
    try:
        os.symlink(target, link)
        os.replace(link, ckpt_dir / name)
    finally:
        if link.is_symlink():
            link.unlink()
    _fsync_dir(ckpt_dir)


def point_best_at(ckpt_dir: Path, step: int | None) -> None:
    """Point `best` at step `step` when that step directory exists (a resume's repair).

    A kill between the pointer moves of a save leaves `best` ahead of the step `last` names;
    the run resumes from `last`, whose best tracker is the truth. Nothing moves when the
    tracker knows no best step yet or its directory is gone.
    """
    if step is None:
        return
    # Not RunDir(...).step_dir: ckpt_dir may be the store a symlinked checkpoints/ points to.
    target = Path(ckpt_dir) / step_dir_name(step)
    if target.is_dir() and os.path.realpath(Path(ckpt_dir) / BEST) != os.path.realpath(target):
        try:
            _point(Path(ckpt_dir), BEST, target.name)
        except OSError as exc:
            raise CheckpointError(f"could not point {Path(ckpt_dir) / BEST} at {target.name}: "
                                  f"{exc.strerror or exc}") from None


def _prune(ckpt_dir: Path, keep_last: int, protect: Iterable[Path]) -> None:
    steps = list_step_dirs(ckpt_dir)
    keep = {p.resolve() for p in steps[-keep_last:]} if keep_last > 0 else set()
    keep |= {(ckpt_dir / name).resolve() for name in (LAST, BEST) if (ckpt_dir / name).exists()}
    keep |= {Path(p).resolve() for p in protect}
    for step_dir in steps:
        if step_dir.resolve() not in keep:
            # Renamed first: a crash mid-delete leaves a `.tmp-*` dir, never a half checkpoint.
            doomed = ckpt_dir / f"{TMP_PREFIX}pruned-{step_dir.name}-{os.getpid()}"
            os.rename(step_dir, doomed)
            shutil.rmtree(doomed)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """The run's step directories (absolute), oldest step first."""
    return RunDir(run_dir).step_dirs()


def run_has_checkpoints(run_dir: Path) -> bool:
    return RunDir(run_dir).has_checkpoints()


def is_ptft_checkpoint(path: Path | str) -> bool:
    """Whether `path` names a ptft checkpoint (any form `resolve_checkpoint` takes), not a weights file.

    ptft checkpoints are directories, reached directly or through a pointer; a dangling pointer
    counts, so that resolving it says so. Anything else is a file of foreign weights. A directory
    holding no checkpoint counts too: resolving it says what was expected.
    """
    path = Path(path)
    return path.is_dir() or (path.is_symlink() and not path.exists())


def resolve_checkpoint(path: Path | str) -> Path:
    """The step directory that `path` names: itself, a pointer's target, or a run's best (else last).

    Raises:
        CheckpointError: the path is missing, a dangling pointer, none of the accepted forms,
            or a step directory lacking one of its files.
    """
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise CheckpointError(f"checkpoint pointer {path} is dangling: its target {os.readlink(path)} does not exist")
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist (expected {ACCEPTED_FORMS})")
    if RunDir(path).checkpoints.is_dir():
        return _follow_pointers(RunDir(path).checkpoints)
    if is_checkpoints_dir(path):
        return _follow_pointers(path)
    return _complete_step_dir(path)


def _follow_pointers(ckpt_dir: Path) -> Path:
    for name in (BEST, LAST):
        pointer = ckpt_dir / name
        if pointer.is_symlink() or pointer.exists():
            return resolve_checkpoint(pointer)
    raise CheckpointError(f"{ckpt_dir} holds no '{BEST}' or '{LAST}' pointer: the run has saved no checkpoint yet")


def _complete_step_dir(path: Path) -> Path:
    target = path.resolve()
    shown = str(path) if target == path.absolute() else f"{path} (-> {target})"
    if not target.is_dir():
        raise CheckpointError(f"checkpoint {shown} is a file (expected {ACCEPTED_FORMS})")
    missing = [name for name in CHECKPOINT_FILES if not (target / name).is_file()]
    if len(missing) == len(CHECKPOINT_FILES):
        raise CheckpointError(f"{shown} is not a checkpoint (expected {ACCEPTED_FORMS})")
    if missing:
        raise CheckpointError(f"checkpoint {shown} is incomplete: missing {', '.join(missing)} "
                              f"(a step directory holds {', '.join(CHECKPOINT_FILES)})")
    return target


def _open_checkpoint(ckpt: Path | str) -> tuple[Path, dict]:
    """(step dir, meta.json's JSON) after checking this ptft can read the checkpoint's format."""
    step_dir = resolve_checkpoint(ckpt)
    return step_dir, read_meta_json(step_dir / META_FILE)


def load_meta(ckpt: Path | str) -> CheckpointMeta:
    """The checkpoint's meta.json as a record (any form `resolve_checkpoint` accepts)."""
    return CheckpointMeta.from_json(_open_checkpoint(ckpt)[1])


def read_meta(ckpt: Path | str) -> dict:
    """The checkpoint's meta.json as plain JSON, for tools that pass it on; ptft reads `load_meta`."""
    return _open_checkpoint(ckpt)[1]


def load_weights(ckpt: Path | str) -> dict[str, torch.Tensor]:
    """The checkpoint's model.safetensors as CPU tensors. Raises CheckpointError if unreadable."""
    step_dir, _ = _open_checkpoint(ckpt)
    return load_safetensors_file(step_dir / WEIGHTS_FILE)


def load_state(ckpt: Path | str) -> dict:
    """The checkpoint's state.pt, loaded with `weights_only=True` (no arbitrary code runs)."""
    step_dir, _ = _open_checkpoint(ckpt)
    path = step_dir / STATE_FILE
    state = load_torch_file(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of training state, got {type(state).__name__}")
    return state


def load_safetensors_file(path: Path) -> dict[str, torch.Tensor]:
    """A .safetensors file as CPU tensors; truncated or corrupt -> CheckpointError."""
    try:
        return _load_safetensors(str(path), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: unreadable safetensors file, truncated or corrupt ({exc})") from None


def load_torch_file(path: Path):
    """torch.load with `weights_only=True` on the CPU: pickled code is refused, never run.

    Raises:
        CheckpointError: the file holds objects beyond tensors and plain containers, or is damaged.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # damage shows as RuntimeError, EOFError, KeyError, UnpicklingError...
        message = str(exc)
        if "Weights only load failed" in message:
            culprit = next((line.strip() for line in message.splitlines() if "GLOBAL" in line), "")
            raise CheckpointError(f"{path}: refused: it holds pickled Python objects, not just tensors and plain "
                                  f"containers ({culprit or 'see torch.load weights_only'}); ptft never runs code "
                                  f"from a file. Re-save only the state dict.") from None
        first_line = message.splitlines()[0][:200] if message else ""
        raise CheckpointError(f"{path}: unreadable torch file, truncated or corrupt "
                              f"({type(exc).__name__}: {first_line})") from None


def file_sha256(path: Path) -> str:
    """sha256 hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from None
    return digest.hexdigest()


def checkpoint_hash(ckpt: Path | str) -> str:
    """sha256 of the checkpoint's model.safetensors: what lineage records."""
    return file_sha256(resolve_checkpoint(ckpt) / WEIGHTS_FILE)
