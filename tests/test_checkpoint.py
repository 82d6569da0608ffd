"""Checkpoint directories: atomic layout, pointers, pruning, crash safety, safe loading, weight keys, RNG state."""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess

import numpy as np
import pytest
import torch

from ptft import checkpoint as ckpt
from ptft.errors import CheckpointError
from ptft.meta import CheckpointMeta
from ptft.rng import capture_rng_state, restore_rng_state


def weights_at(step: int) -> dict[str, torch.Tensor]:
    """Distinct, known weights per step, so a test can tell which checkpoint it loaded."""
    return {"encoder.w": torch.full((2, 3), float(step)), "head.b": torch.arange(4, dtype=torch.float32) + step,
            "encoder.count": torch.tensor(step, dtype=torch.long)}


def save(run_dir, step: int, *, best: bool = False, keep_last: int = 10, protect=()):
    state = {"step": step, "optimizer": {"lr": [0.1], "moments": torch.ones(3) * step}}
    meta = CheckpointMeta(step=step, metrics={"val/loss": 1 / step})
    return ckpt.save_checkpoint(run_dir, weights_at(step), state, meta, best=best, keep_last=keep_last,
                                protect=protect)


def step_names(run_dir) -> list[str]:
    return [p.name for p in ckpt.list_checkpoints(run_dir)]


def pointer(run_dir, name: str) -> str:
    return os.readlink(run_dir / "checkpoints" / name)


@pytest.fixture
def restore_global_rng():
    """RNG tests reseed the global generators; put them back so no other test notices."""
    saved = (torch.get_rng_state(), random.getstate(), np.random.get_state())
    yield
    torch.set_rng_state(saved[0])
    random.setstate(saved[1])
    np.random.set_state(saved[2])


def test_save_writes_complete_step_dir_and_relative_pointers(tmp_path):
    path = save(tmp_path, 500, best=True)
    assert path == (tmp_path / "checkpoints" / "step-00000500").resolve()
    assert sorted(p.name for p in path.iterdir()) == ["meta.json", "model.safetensors", "state.pt"]
    assert pointer(tmp_path, "last") == "step-00000500" and pointer(tmp_path, "best") == "step-00000500"
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")] == []
    meta_text = (path / "meta.json").read_text()
    meta = json.loads(meta_text)
    assert meta["format_version"] == 1 and meta["step"] == 500 and meta["metrics"] == {"val/loss": 0.002}
    assert meta_text == json.dumps(meta, sort_keys=True, indent=2) + "\n"


def test_saved_weights_state_and_meta_load_back(tmp_path):
    path = save(tmp_path, 7)
    weights = ckpt.load_weights(path)
    assert set(weights) == {"encoder.w", "head.b", "encoder.count"}
    assert torch.equal(weights["head.b"], torch.tensor([7.0, 8.0, 9.0, 10.0]))
    assert weights["encoder.count"].dtype == torch.long and weights["encoder.count"].item() == 7
    state = ckpt.load_state(path)
    assert state["step"] == 7 and torch.equal(state["optimizer"]["moments"], torch.full((3,), 7.0))
    assert ckpt.load_meta(path).step == 7 and ckpt.read_meta(path)["step"] == 7


def test_save_copies_non_contiguous_and_shared_tensors(tmp_path):
    base = torch.arange(6.0).reshape(2, 3)
    # A transposed view and a tied weight: safetensors refuses both unless given independent copies.
    ckpt.save_checkpoint(tmp_path, {"a": base.t(), "b": base}, {}, CheckpointMeta(step=1), best=False, keep_last=1)
    loaded = ckpt.load_weights(tmp_path)
    assert torch.equal(loaded["a"], base.t()) and torch.equal(loaded["b"], base)


def test_pointers_move_last_always_best_only_when_asked(tmp_path):
    save(tmp_path, 1, best=True)
    save(tmp_path, 2, best=False)
    assert pointer(tmp_path, "last") == "step-00000002" and pointer(tmp_path, "best") == "step-00000001"
    save(tmp_path, 3, best=True)
    assert pointer(tmp_path, "last") == "step-00000003" and pointer(tmp_path, "best") == "step-00000003"


def test_keep_last_prunes_oldest_but_never_best_or_protected(tmp_path):
    save(tmp_path, 1, keep_last=2)
    protected = save(tmp_path, 2, keep_last=2)
    save(tmp_path, 3, best=True, keep_last=2)
    for step in (4, 5, 6):
        save(tmp_path, step, keep_last=2, protect=(protected,))
    assert step_names(tmp_path) == ["step-00000002", "step-00000003", "step-00000005", "step-00000006"]
    assert pointer(tmp_path, "best") == "step-00000003"
    assert not any(p.name.startswith(".tmp-") for p in (tmp_path / "checkpoints").iterdir())


def test_keep_last_zero_still_keeps_last(tmp_path):
    save(tmp_path, 1, keep_last=0)
    save(tmp_path, 2, keep_last=0)
    assert step_names(tmp_path) == ["step-00000002"]


def test_list_and_has_checkpoints_sort_by_step(tmp_path):
    assert ckpt.list_checkpoints(tmp_path) == [] and not ckpt.run_has_checkpoints(tmp_path)
    for step in (20, 3, 100):
        save(tmp_path, step)
    (tmp_path / "checkpoints" / "notes").mkdir()
    assert step_names(tmp_path) == ["step-00000003", "step-00000020", "step-00000100"]
    assert all(p.is_absolute() for p in ckpt.list_checkpoints(tmp_path))
    assert ckpt.run_has_checkpoints(tmp_path)


def test_resave_of_an_existing_step_replaces_it(tmp_path):
    save(tmp_path, 1, best=True)
    orphan = tmp_path / "checkpoints" / "step-00000002"  # written by a run killed before moving `last`
    orphan.mkdir()
    (orphan / "model.safetensors").write_bytes(b"stale")
    save(tmp_path, 2)
    assert ckpt.load_weights(tmp_path / "checkpoints" / "last")["encoder.w"][0, 0].item() == 2.0
    assert step_names(tmp_path) == ["step-00000001", "step-00000002"]


def dead_pid() -> int:
    """The pid of a process that has exited (a crashed writer's)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_leftover_temp_dirs_are_ignored_then_removed(tmp_path):
    save(tmp_path, 1, best=True)
    crashed = tmp_path / "checkpoints" / f".tmp-step-00000002-{dead_pid()}"
    crashed.mkdir()
    (crashed / "model.safetensors").write_bytes(b"half a fi")
    (tmp_path / "checkpoints" / f".tmp-last-{dead_pid()}").symlink_to("step-00000001")
    assert ckpt.resolve_checkpoint(tmp_path).name == "step-00000001"
    assert step_names(tmp_path) == ["step-00000001"]
    save(tmp_path, 3)
    assert not any(p.name.startswith(".tmp-") for p in (tmp_path / "checkpoints").iterdir())


def test_temps_of_another_live_process_are_left_alone(tmp_path):
    save(tmp_path, 1)
    in_flight = tmp_path / "checkpoints" / f".tmp-step-00000002-{os.getppid()}"  # a live pid, not ours
    in_flight.mkdir()
    (in_flight / "model.safetensors").write_bytes(b"being written")
    save(tmp_path, 3)
    assert (in_flight / "model.safetensors").read_bytes() == b"being written"


def test_a_crash_between_pointer_moves_leaves_best_ahead_never_behind(tmp_path, monkeypatch):
    save(tmp_path, 1, best=True)
    real_point = ckpt._point

    def crash_after_first_pointer(ckpt_dir, name, target):
        real_point(ckpt_dir, name, target)
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "_point", crash_after_first_pointer)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 2, best=True)
    # `last` still names step 1, whose tracker knows no better step: resume re-points best there.
    assert pointer(tmp_path, "best") == "step-00000002" and pointer(tmp_path, "last") == "step-00000001"


def test_point_best_at_moves_best_only_to_an_existing_step(tmp_path):
    save(tmp_path, 1, best=True)
    save(tmp_path, 2, best=True)
    ckpt_dir = tmp_path / "checkpoints"
    ckpt.point_best_at(ckpt_dir, 1)
    assert pointer(tmp_path, "best") == "step-00000001"
    for missing in (7, None):
        ckpt.point_best_at(ckpt_dir, missing)
        assert pointer(tmp_path, "best") == "step-00000001"


def test_failure_mid_write_leaves_pointers_and_no_temp(tmp_path, monkeypatch):
    save(tmp_path, 1, best=True)
    real_write = ckpt._write_file

    def disk_full_on_state(path, data):
        if path.name == "state.pt":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_write(path, data)

    monkeypatch.setattr(ckpt, "_write_file", disk_full_on_state)
    with pytest.raises(CheckpointError, match=r"step-00000002: No space left on device"):
        save(tmp_path, 2, best=True)
    assert pointer(tmp_path, "last") == "step-00000001" and pointer(tmp_path, "best") == "step-00000001"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["best", "last", "step-00000001"]
    assert ckpt.load_weights(tmp_path)["encoder.w"][0, 0].item() == 1.0


def test_any_exception_mid_write_removes_the_temp_dir(tmp_path, monkeypatch):
    save(tmp_path, 1)

    def crash(path, data):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "_write_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last", "step-00000001"]


def test_failed_pointer_move_keeps_the_old_pointer(tmp_path, monkeypatch):
    save(tmp_path, 1, best=True)

    def refuse(src, dst):
        raise PermissionError(errno.EACCES, "Permission denied", str(dst))

    monkeypatch.setattr(ckpt.os, "replace", refuse)
    with pytest.raises(CheckpointError, match="Permission denied"):
        save(tmp_path, 2, best=True)
    assert pointer(tmp_path, "last") == "step-00000001" and pointer(tmp_path, "best") == "step-00000001"
    assert not any(p.name.startswith(".tmp-") for p in (tmp_path / "checkpoints").iterdir())


def test_unwritable_run_dir_is_a_checkpoint_error(tmp_path):
    blocker = tmp_path / "run"
    blocker.write_text("a file where the run directory should be")
    with pytest.raises(CheckpointError, match=r"could not write checkpoint .*run/checkpoints/step-00000001"):
        save(blocker, 1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_before_writing(tmp_path, bad):
    save(tmp_path, 1, best=True)
    weights = weights_at(2)
    weights["head.b"][1] = bad
    with pytest.raises(CheckpointError, match=r"step 2: weight 'head.b'"):
        ckpt.save_checkpoint(tmp_path, weights, {}, CheckpointMeta(step=2), best=True, keep_last=5)
    assert step_names(tmp_path) == ["step-00000001"]
    assert pointer(tmp_path, "last") == "step-00000001" and pointer(tmp_path, "best") == "step-00000001"


def test_resolve_accepts_every_form(tmp_path, monkeypatch):
    first = save(tmp_path, 1, best=True)
    second = save(tmp_path, 2)
    checkpoints = tmp_path / "checkpoints"
    assert ckpt.resolve_checkpoint(second) == second
    assert ckpt.resolve_checkpoint(str(checkpoints / "last")) == second
    assert ckpt.resolve_checkpoint(checkpoints / "best") == first
    assert ckpt.resolve_checkpoint(checkpoints) == first  # best, else last
    assert ckpt.resolve_checkpoint(tmp_path) == first
    (checkpoints / "best").unlink()
    assert ckpt.resolve_checkpoint(tmp_path) == second
    monkeypatch.chdir(tmp_path)  # a relative path resolves to an absolute one
    assert ckpt.resolve_checkpoint("checkpoints/step-00000001") == first and first.is_absolute()


def test_resolve_errors_name_the_path_and_what_was_expected(tmp_path):
    step = save(tmp_path, 1, best=True)
    with pytest.raises(CheckpointError, match=r"nowhere does not exist \(expected a step directory"):
        ckpt.resolve_checkpoint(tmp_path / "nowhere")
    (tmp_path / "other").mkdir()
    with pytest.raises(CheckpointError, match=r"other is not a checkpoint \(expected a step directory"):
        ckpt.resolve_checkpoint(tmp_path / "other")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(CheckpointError, match=r"file.txt is a file"):
        ckpt.resolve_checkpoint(tmp_path / "file.txt")
    (step / "state.pt").unlink()
    with pytest.raises(CheckpointError, match=r"step-00000001 is incomplete: missing state.pt"):
        ckpt.resolve_checkpoint(step)
    with pytest.raises(CheckpointError, match=r"last \(-> .*step-00000001\) is incomplete"):
        ckpt.resolve_checkpoint(tmp_path / "checkpoints" / "last")
    os.rename(step, step.with_name("moved"))
    with pytest.raises(CheckpointError, match=r"best is dangling: its target step-00000001 does not exist"):
        ckpt.resolve_checkpoint(tmp_path)


def test_resolve_run_without_pointers(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(CheckpointError, match=r"holds no 'best' or 'last' pointer"):
        ckpt.resolve_checkpoint(tmp_path)


def test_unsafe_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))  # unpickling would create the marker file

    step = save(tmp_path, 1)
    torch.save({"step": 1, "payload": Payload()}, step / "state.pt")
    with pytest.raises(CheckpointError, match=r"state.pt: refused: it holds pickled Python objects"):
        ckpt.load_state(step)
    assert not marker.exists()


def test_truncated_files_are_checkpoint_errors(tmp_path):
    step = save(tmp_path, 1)
    for name in ("model.safetensors", "state.pt"):
        data = (step / name).read_bytes()
        (step / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model.safetensors: unreadable safetensors file, truncated or corrupt"):
        ckpt.load_weights(step)
    with pytest.raises(CheckpointError, match=r"state.pt: unreadable torch file, truncated or corrupt"):
        ckpt.load_state(step)


def test_meta_version_and_corruption_are_checked(tmp_path):
    step = save(tmp_path, 1)
    meta_path = step / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "format_version": 2, "versions": {"ptft": "0.9.0"}}))
    with pytest.raises(CheckpointError, match=r"format 2, newer than this ptft .* it needs ptft >= 0.9.0"):
        ckpt.load_weights(step)
    meta_path.write_text(json.dumps({"step": 1}))
    with pytest.raises(CheckpointError, match=r"meta.json: no integer 'format_version'"):
        ckpt.read_meta(step)
    meta_path.write_text('{"step": ')
    with pytest.raises(CheckpointError, match=r"meta.json: unreadable checkpoint metadata"):
        ckpt.load_state(step)


def test_hashes_are_sha256_of_the_weights_file(tmp_path):
    import hashlib

    step = save(tmp_path, 1)
    expected = hashlib.sha256((step / "model.safetensors").read_bytes()).hexdigest()
    assert ckpt.file_sha256(step / "model.safetensors") == expected
    assert ckpt.checkpoint_hash(tmp_path) == expected
    assert ckpt.checkpoint_hash(save(tmp_path, 2)) != expected
    with pytest.raises(CheckpointError, match=r"cannot read .*absent.bin"):
        ckpt.file_sha256(tmp_path / "absent.bin")


def test_rng_round_trip_through_state_pt(tmp_path, restore_global_rng):
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    np.random.normal()  # sets numpy's cached Gaussian, which the state must carry too
    rng = capture_rng_state()
    expected = (torch.rand(3), random.random(), np.random.rand(2), np.random.normal())
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    ckpt.save_checkpoint(tmp_path, weights_at(1), {"rng": rng}, CheckpointMeta(step=1), best=False, keep_last=1)
    restore_rng_state(ckpt.load_state(tmp_path)["rng"])  # weights_only=True load
    assert torch.equal(torch.rand(3), expected[0])
    assert random.random() == expected[1]
    assert np.array_equal(np.random.rand(2), expected[2])
    assert np.random.normal() == expected[3]


class FakeCuda:
    """torch.cuda's RNG functions on a machine without a GPU, recording which device each call names."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[str, int | None]] = []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_rng_state", self.get_rng_state)
        monkeypatch.setattr(torch.cuda, "set_rng_state", self.set_rng_state)

    def get_rng_state(self, device="cuda"):
        self.calls.append(("get", torch.device(device).index))
        return torch.tensor([7, 1], dtype=torch.uint8)

    def set_rng_state(self, state, device="cuda"):
        self.calls.append(("set", torch.device(device).index))
        assert state.tolist() == [7, 1]


def test_cuda_rng_state_is_the_training_devices(tmp_path, monkeypatch, restore_global_rng):
    cuda = FakeCuda(monkeypatch)
    rng = capture_rng_state(torch.device("cuda:1"))
    ckpt.save_checkpoint(tmp_path, weights_at(1), {"rng": rng}, CheckpointMeta(step=1), best=False, keep_last=1)
    restore_rng_state(ckpt.load_state(tmp_path)["rng"], torch.device("cuda:1"))
    assert cuda.calls == [("get", 1), ("set", 1)]


def test_cpu_training_captures_no_cuda_rng_state(monkeypatch, restore_global_rng):
    cuda = FakeCuda(monkeypatch)
    rng = capture_rng_state(torch.device("cpu"))
    restore_rng_state(rng, torch.device("cpu"))
    assert rng["cuda"] == [] and cuda.calls == []


def test_packed_weights_hold_the_objectives_keys_apart_and_unpack_into_both_modules(tmp_path):
    torch.manual_seed(0)
    model, objective = torch.nn.Sequential(torch.nn.Linear(2, 3)), torch.nn.Module()
    objective.projector = torch.nn.Linear(3, 2)
    packed = ckpt.pack_weights(model, objective)
    assert sorted(packed) == ["0.bias", "0.weight", "objective.projector.bias", "objective.projector.weight"]
    ckpt.save_checkpoint(tmp_path, packed, {}, CheckpointMeta(step=1), best=False, keep_last=1)
    model_state, objective_state = ckpt.unpack_weights(ckpt.load_weights(tmp_path))
    assert model_state.keys() == model.state_dict().keys()
    assert objective_state.keys() == objective.state_dict().keys()
    assert all(torch.equal(objective_state[k], v) for k, v in objective.state_dict().items())


def test_ptft_checkpoints_are_directories_or_pointers_and_anything_else_is_a_weights_file(tmp_path):
    step = save(tmp_path / "run", 1, best=True)
    (tmp_path / "w.pt").write_bytes(b"")
    (tmp_path / "dangling").symlink_to("nowhere")
    (tmp_path / "to_file").symlink_to(tmp_path / "w.pt")
    for path in (step, tmp_path / "run", tmp_path / "run" / "checkpoints", tmp_path / "run" / "checkpoints" / "best",
                 tmp_path / "dangling"):
        assert ckpt.is_ptft_checkpoint(path), path
    for path in (tmp_path / "w.pt", tmp_path / "to_file", tmp_path / "absent.safetensors"):
        assert not ckpt.is_ptft_checkpoint(str(path)), path
