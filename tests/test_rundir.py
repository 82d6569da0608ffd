"""The run directory: one layout with one owner, one run at a time, --overwrite really replaces, resume
refuses a changed schedule length."""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, tiny_pretrain_config, write_yaml
from ptft.rundir import (CHECKPOINTS_DIR, CONFIG_FILE, EVAL_DIR, EVAL_METRICS_FILE, METRICS_CSV_FILE, METRICS_FILE,
                         RunDir)

pytestmark = pytest.mark.skipif(os.name != "posix", reason="flock, symlinks and signals")


def _last_step(run_dir) -> int:
    last = run_dir / "checkpoints" / "last"
    return int(last.resolve().name.split("-")[1]) if last.exists() else -1


def test_second_launch_into_a_running_run_dir_exits_2_naming_dir_and_pid_and_kill_9_frees_it(tmp_path, ptft):
    config = write_yaml(tmp_path / "c.yaml", tiny_pretrain_config(
        tmp_path / "run", train={"max_steps": 100000, "eval_every_steps": 1000}, checkpoint={"every_steps": 5}))
    running = subprocess.Popen([sys.executable, "-m", "ptft", "pretrain", str(config)], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while _last_step(tmp_path / "run") < 5:
            assert time.monotonic() < deadline and running.poll() is None, running.communicate()
            time.sleep(0.02)
        running.send_signal(signal.SIGSTOP)  # frozen mid-run it still holds the lock, and leaves the CPU to us
        for flags in ((), ("--overwrite",), ("--resume",)):
            refused = ptft("pretrain", config, *flags)
            assert refused.code == 2, refused.stderr
            assert str(tmp_path / "run") in refused.stderr and f"pid {running.pid}" in refused.stderr
            assert "Traceback" not in refused.stderr
        assert _last_step(tmp_path / "run") >= 5  # --overwrite deleted nothing of the running run
    finally:
        running.send_signal(signal.SIGKILL)  # dies holding the lock: the kernel releases it
        running.communicate()
    end = _last_step(tmp_path / "run") + 3
    resumed = ptft("pretrain", config, "--resume", f"train.max_steps={end}")
    assert resumed.code == 0, resumed.stderr
    assert _last_step(tmp_path / "run") == end


def test_overwrite_with_a_symlinked_checkpoints_dir_replaces_the_old_run(tmp_path, ptft):
    store = tmp_path / "big_disk" / "ckpts"
    store.mkdir(parents=True)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").symlink_to(store)
    config = write_yaml(tmp_path / "c.yaml", tiny_pretrain_config(tmp_path / "run", train={"max_steps": 20}))
    assert ptft("pretrain", config).code == 0
    assert (store / "step-00000020").is_dir()
    replaced = ptft("pretrain", config, "--overwrite", "train.max_steps=10")
    assert replaced.code == 0, replaced.stderr
    link = tmp_path / "run" / "checkpoints"
    assert link.is_symlink() and link.resolve() == store.resolve()
    assert sorted(p.name for p in store.iterdir()) == ["best", "last", "step-00000010"]
    assert replaced.last_line == str((store / "step-00000010").resolve())


def test_resume_refuses_a_new_length_for_a_cosine_schedule_naming_the_key(tmp_path, ptft):
    config = write_yaml(tmp_path / "c.yaml", tiny_pretrain_config(
        tmp_path / "run", train={"max_steps": 20}, schedule={"name": "cosine"}))
    assert ptft("pretrain", config).code == 0
    refused = ptft("pretrain", config, "--resume", "train.max_steps=30")
    assert refused.code == 2, refused.stderr
    assert "train.max_steps" in refused.stderr and "cosine" in refused.stderr
    assert "init.checkpoint=" in refused.stderr and "Traceback" not in refused.stderr
    assert (tmp_path / "run" / "checkpoints" / "last").resolve().name == "step-00000020"
    assert ptft("pretrain", config, "--resume").code == 0  # the same length still resumes


@pytest.mark.parametrize("schedule", ["constant", "step"])
def test_resume_may_extend_a_schedule_that_does_not_depend_on_the_length(tmp_path, ptft, schedule):
    config = write_yaml(tmp_path / "c.yaml", tiny_pretrain_config(
        tmp_path / "run", train={"max_steps": 10}, schedule={"name": schedule}))
    assert ptft("pretrain", config).code == 0
    extended = ptft("pretrain", config, "--resume", "train.max_steps=15")
    assert extended.code == 0, extended.stderr
    assert (tmp_path / "run" / "checkpoints" / "last").resolve().name == "step-00000015"


def test_run_dir_paths_follow_the_documented_layout(tmp_path):
    run = RunDir.at(tmp_path / "run")
    assert run == RunDir(str(tmp_path / "run"))
    root = tmp_path / "run"
    assert (run.config, run.metrics, run.lock) == (root / "config.yaml", root / "metrics.jsonl", root / ".lock")
    assert (run.checkpoints, run.last, run.best) == (root / "checkpoints", root / "checkpoints" / "last",
                                                     root / "checkpoints" / "best")
    assert run.step_dir(500) == root / "checkpoints" / "step-00000500"
    assert run.eval_metrics("val") == root / "eval" / "val" / "metrics.json"
    assert run.outputs == (root / "checkpoints", root / "eval", root / "metrics.jsonl", root / "metrics.csv",
                           root / "tensorboard")


def test_the_run_of_a_target_is_read_from_the_path_as_written(tmp_path):
    store = tmp_path / "scratch" / "ckpts"
    (store / "step-00000001").mkdir(parents=True)
    (store / "last").symlink_to("step-00000001")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").symlink_to(store)
    run = tmp_path / "run"
    for target in (run, run / "checkpoints", run / "checkpoints" / "last", run / "checkpoints" / "step-00000001",
                   tmp_path / "run" / ".." / "run"):
        assert RunDir.of_target(target).root == run, target
    assert RunDir.of_target(store).root == store.parent  # a checkpoints/ dir by its pointers, not its name
    (tmp_path / "loose").mkdir()
    assert RunDir.of_target(tmp_path / "loose").root == tmp_path  # a step dir outside any run: eval/ beside it


# LOCK_FILE aside: other lock files (the decode cache's) end in ".lock" too.
# TENSORBOARD_DIR is left out: "tensorboard" is also the name of a logger in train.loggers.
RUN_DIR_NAMES = {CONFIG_FILE, METRICS_FILE, METRICS_CSV_FILE, CHECKPOINTS_DIR, EVAL_DIR, EVAL_METRICS_FILE}


def _path_literals(path) -> list[tuple[int, str]]:
    """String constants naming a run-dir file; docstrings, dict keys and subscripts (JSON fields) aside."""
    tree = ast.parse(path.read_text())
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body \
                and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant):
            skip.add(id(node.body[0].value))
        elif isinstance(node, ast.Dict):
            skip.update(id(key) for key in node.keys if key is not None)
        elif isinstance(node, ast.Subscript):
            skip.add(id(node.slice))
        elif isinstance(node, ast.JoinedStr):  # pieces of an f-string are no whole file name
            skip.update(id(part) for part in node.values)
    return [(node.lineno, node.value) for node in ast.walk(tree) if isinstance(node, ast.Constant)
            and node.value in RUN_DIR_NAMES and id(node) not in skip]


def test_only_rundir_spells_the_names_of_a_runs_files():
    package = REPO / "ptft"
    found = {str(path.relative_to(REPO)): hits for path in sorted(package.rglob("*.py"))
             if path != package / "rundir.py" and (hits := _path_literals(path))}
    assert found == {}, "ask ptft.rundir.RunDir for run-directory paths instead of spelling them"


def test_resume_of_a_run_dir_that_does_not_exist_exits_2_and_creates_nothing(tmp_path, ptft):
    cfg = tiny_pretrain_config(tmp_path / "never-ran")
    result = ptft("pretrain", write_yaml(tmp_path / "c.yaml", cfg), "--resume")
    assert result.code == 2 and "holds no checkpoint to resume from" in result.stderr
    assert not (tmp_path / "never-ran").exists()
