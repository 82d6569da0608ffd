"""Checkpoints you can trust: exact resume (also after SIGKILL), graceful interrupt, non-finite guard."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import REPO, tiny_pretrain_config, write_yaml

# Dropout and denoising noise make every step consume randomness: an inexact resume shows.
NOISY = dict(model={"name": "tiny_mlp_autoencoder", "dropout": 0.1},
             objective={"name": "denoising", "noise": "gaussian", "std": 0.2})


def _final_weights(run_dir: Path) -> dict:
    return load_file((run_dir / "checkpoints" / "last").resolve() / "model.safetensors")


def _assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert (a[key] == b[key]).all(), f"{key} differs"


def test_extending_a_finished_run_equals_one_long_run(tmp_path, ptft):
    long = write_yaml(tmp_path / "long.yaml", tiny_pretrain_config(tmp_path / "long", train={"max_steps": 30}, **NOISY))
    short = write_yaml(tmp_path / "short.yaml", tiny_pretrain_config(tmp_path / "short", train={"max_steps": 15}, **NOISY))
    assert ptft("pretrain", long).code == 0
    assert ptft("pretrain", short).code == 0
    resumed = ptft("pretrain", short, "train.max_steps=30", "--resume")
    assert resumed.code == 0, resumed.stderr
    _assert_bitwise_equal(_final_weights(tmp_path / "long"), _final_weights(tmp_path / "short"))


def _start(config: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ptft", "pretrain", str(config), *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    last = run_dir / "checkpoints" / "last"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if last.exists() and int(last.resolve().name.split("-")[1]) >= step:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    raise AssertionError("run made no progress")


def test_sigkill_mid_epoch_then_resume_is_bitwise_exact(tmp_path, ptft):
    settings = dict(train={"max_steps": 300, "eval_every_steps": 7, "log_every_steps": 10},
                    checkpoint={"every_steps": 3, "keep_last": 2}, **NOISY)
    reference = write_yaml(tmp_path / "ref.yaml", tiny_pretrain_config(tmp_path / "ref", **settings))
    killed = write_yaml(tmp_path / "killed.yaml", tiny_pretrain_config(tmp_path / "killed", **settings))
    assert ptft("pretrain", reference).code == 0
    for kill_after in (40, 130):
        proc = _start(killed, *(["--resume"] if kill_after != 40 else []))
        _wait_for_step(tmp_path / "killed", kill_after, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for pointer in ("last", "best"):
            target = (tmp_path / "killed" / "checkpoints" / pointer).resolve()
            assert {p.name for p in target.iterdir()} == {"model.safetensors", "state.pt", "meta.json"}
    finished = _start(killed, "--resume")
    out, err = finished.communicate(timeout=300)
    assert finished.returncode == 0, err
    _assert_bitwise_equal(_final_weights(tmp_path / "ref"), _final_weights(tmp_path / "killed"))


def test_sigterm_writes_a_resumable_checkpoint_and_exits_130(tmp_path):
    config = write_yaml(tmp_path / "c.yaml", tiny_pretrain_config(
        tmp_path / "run", train={"max_steps": 100000, "eval_every_steps": 1000}, checkpoint={"every_steps": 1000}))
    proc = _start(config)
    deadline = time.monotonic() + 120
    while not (tmp_path / "run" / "metrics.jsonl").exists():
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "--resume" in err
    last = (tmp_path / "run" / "checkpoints" / "last").resolve()
    assert last.is_dir() and int(last.name.split("-")[1]) > 0


def test_non_finite_loss_stops_with_exit_2_and_saves_no_bad_weights(tmp_path, ptft):
    config = write_yaml(tmp_path / "c.yaml", tiny_pretrain_config(
        tmp_path / "run", train={"max_steps": 50, "eval_every_steps": 5}, optim={"name": "sgd", "lr": 1e30},
        model={"name": "tiny_mlp_classifier"}, objective={"name": "supervised"}))
    result = ptft("pretrain", config)
    assert result.code == 2, result.stderr
    assert "non-finite loss at step" in result.stderr and "Traceback" not in result.stderr
    for pointer in ("last", "best"):
        path = tmp_path / "run" / "checkpoints" / pointer
        if path.exists():
            assert all(t.isfinite().all() for t in load_file(path.resolve() / "model.safetensors").values())


@pytest.mark.skipif(os.name != "posix", reason="signals")
def test_resume_keeps_lineage_and_refuses_meaning_changes(tmp_path, ptft):
    config = write_yaml(tmp_path / "c.yaml", tiny_pretrain_config(tmp_path / "run"))
    assert ptft("pretrain", config).code == 0
    refused = ptft("pretrain", config, "--resume", "optim.lr=0.5")
    assert refused.code == 2 and "optim.lr" in refused.stderr
    allowed = ptft("pretrain", config, "--resume", "train.max_steps=25")
    assert allowed.code == 0, allowed.stderr
    assert (tmp_path / "run" / "checkpoints" / "last").resolve().name == "step-00000025"


class _Killed(BaseException):
    """Stands for SIGKILL inside a save: no handler runs, nothing after it happens."""


def _pointer(run_dir: Path, name: str) -> str:
    return (run_dir / "checkpoints" / name).resolve().name


def test_kill_between_pointer_moves_then_resume_leaves_best_on_the_best_step(tmp_path, ptft, monkeypatch):
    from ptft import checkpoint as ckpt

    config = write_yaml(tmp_path / "c.yaml", tiny_pretrain_config(tmp_path / "run"))
    real_point = ckpt._point

    def die_after_first_pointer_to_step_20(ckpt_dir, name, target):
        real_point(ckpt_dir, name, target)
        if target == "step-00000020":
            raise _Killed

    monkeypatch.setattr(ckpt, "_point", die_after_first_pointer_to_step_20)
    with pytest.raises(_Killed):
        ptft("pretrain", config)
    monkeypatch.setattr(ckpt, "_point", real_point)
    meta = json.loads((tmp_path / "run" / "checkpoints" / "step-00000020" / "meta.json").read_text())
    assert meta["best"]["step"] == 20  # step 20 improved: its save was moving both pointers
    resumed = ptft("pretrain", config, "--resume")
    assert resumed.code == 0, resumed.stderr
    assert _pointer(tmp_path / "run", "best") == "step-00000020" == _pointer(tmp_path / "run", "last")
    assert resumed.last_line.endswith("step-00000020")


def test_resume_repoints_a_stale_best_to_the_trackers_best_step(tmp_path, ptft):
    config = write_yaml(tmp_path / "c.yaml", tiny_pretrain_config(tmp_path / "run"))
    assert ptft("pretrain", config).code == 0
    assert _pointer(tmp_path / "run", "best") == "step-00000020"
    # What a kill between the pointer moves left behind before best moved first: last new, best old.
    stale = tmp_path / "run" / "checkpoints" / ".stale"
    os.symlink("step-00000010", stale)
    os.replace(stale, tmp_path / "run" / "checkpoints" / "best")
    resumed = ptft("pretrain", config, "--resume")
    assert resumed.code == 0, resumed.stderr
    assert _pointer(tmp_path / "run", "best") == "step-00000020"
    assert resumed.last_line.endswith("step-00000020")
