"""train.loggers: metrics.jsonl always, TensorBoard and CSV on request, each step once, also after --resume."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_pretrain_config, write_yaml

# Records at 3, 6, 9, 10 (validation), 12, 15, 18, 20 (validation and the end); checkpoints every 5 steps.
SCHEDULE = dict(train={"max_steps": 20, "eval_every_steps": 10, "log_every_steps": 3,
                       "loggers": ["csv", "tensorboard"]},
                checkpoint={"every_steps": 5, "keep_last": 5})
STEPS = [3, 6, 9, 10, 12, 15, 18, 20]


def _jsonl(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _csv(run_dir: Path) -> list[dict]:
    with (run_dir / "metrics.csv").open(newline="") as f:
        return [{key: float(cell) for key, cell in row.items() if cell != ""} for row in csv.DictReader(f)]


def _tensorboard(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)], as TensorBoard's own reader sees the event files (purges applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _as_tensorboard(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """What the records should look like in TensorBoard: every key but step, a float32 scalar at its step."""
    expected: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        for key, value in record.items():
            if key != "step":
                expected.setdefault(key, []).append((record["step"], float(np.float32(value))))
    return expected


def test_tensorboard_and_csv_hold_the_same_records_as_metrics_jsonl(tmp_path, ptft):
    config = write_yaml(tmp_path / "c.yaml", tiny_pretrain_config(tmp_path / "run", **SCHEDULE))
    result = ptft("pretrain", config)
    assert result.code == 0, result.stderr
    records = _jsonl(tmp_path / "run")  # written although train.loggers does not list jsonl
    assert [r["step"] for r in records] == STEPS
    assert _csv(tmp_path / "run") == [{key: float(value) for key, value in r.items()} for r in records]
    assert _tensorboard(tmp_path / "run") == _as_tensorboard(records)


def test_records_carry_lr_and_throughput_and_no_device_memory_on_cpu(tmp_path, ptft):
    config = write_yaml(tmp_path / "c.yaml", tiny_pretrain_config(tmp_path / "run", **SCHEDULE))
    assert ptft("pretrain", config, "train.loggers=[jsonl]").code == 0
    records = _jsonl(tmp_path / "run")
    assert all(r["lr"] == 0.01 and r["perf/samples_per_s"] > 0 for r in records)
    assert not any("perf/peak_device_bytes" in r for r in records)  # CUDA only
    assert not (tmp_path / "run" / "metrics.csv").exists() and not (tmp_path / "run" / "tensorboard").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_records_on_cuda_carry_the_peak_device_memory(tmp_path, ptft):
    config = write_yaml(tmp_path / "c.yaml", tiny_pretrain_config(tmp_path / "run", **SCHEDULE))
    assert ptft("pretrain", config, "train.device=cuda").code == 0
    assert all(r["perf/peak_device_bytes"] > 0 for r in _jsonl(tmp_path / "run"))


class _Killed(BaseException):
    """Stands for SIGKILL inside a save: no handler runs, nothing after it happens."""


def test_a_killed_run_resumed_logs_each_step_once_in_every_logger(tmp_path, ptft, monkeypatch):
    from ptft import checkpoint as ckpt

    config = write_yaml(tmp_path / "c.yaml", tiny_pretrain_config(tmp_path / "run", **SCHEDULE))
    real_save = ckpt.save_checkpoint

    def die_saving_step_15(run_dir, weights, state, meta, **kwargs):
        if meta.step == 15:  # records through step 15 are written; the last checkpoint is step 10
            raise _Killed
        return real_save(run_dir, weights, state, meta, **kwargs)

    monkeypatch.setattr(ckpt, "save_checkpoint", die_saving_step_15)
    with pytest.raises(_Killed):
        ptft("pretrain", config)
    assert [r["step"] for r in _jsonl(tmp_path / "run")] == STEPS[:6]  # 12 and 15 will be logged again
    monkeypatch.setattr(ckpt, "save_checkpoint", real_save)
    resumed = ptft("pretrain", config, "--resume")
    assert resumed.code == 0, resumed.stderr
    records = _jsonl(tmp_path / "run")
    assert [r["step"] for r in records] == STEPS
    assert [int(row["step"]) for row in _csv(tmp_path / "run")] == STEPS
    assert _csv(tmp_path / "run") == [{key: float(value) for key, value in r.items()} for r in records]
    assert _tensorboard(tmp_path / "run") == _as_tensorboard(records)


def test_tensorboard_without_its_package_is_exit_2_naming_the_extra_before_any_step(tmp_path, ptft, monkeypatch):
    # None in sys.modules makes `import` raise ImportError, as on a machine without the package.
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    config = write_yaml(tmp_path / "c.yaml", tiny_pretrain_config(tmp_path / "run", train={"loggers": ["tensorboard"]}))
    for args in (["--dry-run"], []):
        result = ptft("pretrain", config, *args)
        assert result.code == 2, result.stderr
        assert "train.loggers" in result.stderr and "pip install 'ptft[tensorboard]'" in result.stderr
        assert "Traceback" not in result.stderr
        assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_an_unknown_logger_is_a_config_error_naming_the_key_and_the_choices(tmp_path, ptft):
    config = write_yaml(tmp_path / "c.yaml", tiny_pretrain_config(tmp_path / "run", train={"loggers": ["wandb"]}))
    result = ptft("config", config)
    assert result.code == 2
    assert "train.loggers" in result.stderr and all(name in result.stderr for name in ("jsonl", "tensorboard", "csv"))


def test_jsonl_is_always_in_the_resolved_loggers(tmp_path, ptft):
    config = write_yaml(tmp_path / "c.yaml", tiny_pretrain_config(tmp_path / "run", train={"loggers": ["csv", "csv"]}))
    result = ptft("config", config)
    assert result.code == 0, result.stderr
    assert "loggers: [jsonl, csv]" in result.stdout


def test_overwrite_clears_the_previous_runs_csv_and_tensorboard(tmp_path, ptft):
    config = write_yaml(tmp_path / "c.yaml", tiny_pretrain_config(tmp_path / "run", **SCHEDULE))
    assert ptft("pretrain", config).code == 0
    replaced = ptft("pretrain", config, "--overwrite", "train.loggers=[jsonl]", "train.max_steps=2")
    assert replaced.code == 0, replaced.stderr
    assert not (tmp_path / "run" / "metrics.csv").exists() and not (tmp_path / "run" / "tensorboard").exists()
