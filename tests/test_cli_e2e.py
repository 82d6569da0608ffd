"""End to end through the real entry point: pretrain -> finetune -> evaluate on tiny digits configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import REPO, tiny_finetune_config, tiny_pretrain_config, write_yaml


@pytest.fixture
def pretrained(tmp_path, ptft):
    config = write_yaml(tmp_path / "ae.yaml", tiny_pretrain_config(tmp_path / "runs" / "ae"))
    result = ptft("pretrain", config)
    assert result.code == 0, result.stderr
    return Path(result.last_line)


def test_pretrain_prints_the_checkpoint_to_start_from(pretrained, tmp_path):
    run_dir = tmp_path / "runs" / "ae"
    assert pretrained == (run_dir / "checkpoints" / "best").resolve()
    assert {p.name for p in pretrained.iterdir()} == {"model.safetensors", "state.pt", "meta.json"}
    assert (run_dir / "checkpoints" / "last").resolve().name == "step-00000020"
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"]["name"] == "tiny_mlp_autoencoder" and saved["objective"]["name"] == "reconstruction"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [5, 10, 15, 20]
    assert all("val/loss" in r for r in records if r["step"] in (10, 20))


def test_finetune_then_evaluate(pretrained, tmp_path, ptft):
    config = write_yaml(tmp_path / "ft.yaml", tiny_finetune_config(tmp_path / "runs" / "ft", str(pretrained)))
    result = ptft("finetune", config)
    assert result.code == 0, result.stderr
    assert "loaded" in result.stderr  # the key-match report
    best = Path(result.last_line)
    meta = json.loads((best / "meta.json").read_text())
    assert meta["parent"]["path"] == str(pretrained)
    assert meta["lineage"][-1]["stage"] == "pretrain"

    evaluated = ptft("evaluate", tmp_path / "runs" / "ft")
    assert evaluated.code == 0, evaluated.stderr
    metrics = json.loads(evaluated.stdout)
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["num_examples"] == 359
    assert len(metrics["confusion_matrix"]) == 10
    assert (tmp_path / "runs" / "ft" / "eval" / "test" / "confusion_matrix.png").stat().st_size > 0
    saved = json.loads((tmp_path / "runs" / "ft" / "eval" / "test" / "metrics.json").read_text())
    assert saved["accuracy"] == metrics["accuracy"]


def test_evaluate_autoencoder_reports_reconstruction_and_probes(pretrained, tmp_path, ptft):
    result = ptft("evaluate", pretrained, "--split", "val")
    assert result.code == 0, result.stderr
    metrics = json.loads(result.stdout)
    assert metrics["split"] == "val" and metrics["mse"] > 0 and metrics["psnr"] > 0
    assert 0.1 < metrics["knn_accuracy"] <= 1.0 and 0.1 < metrics["linear_probe_accuracy"] <= 1.0
    assert (tmp_path / "runs" / "ae" / "eval" / "val" / "reconstructions.png").exists()


def test_evaluate_writes_under_the_run_named_when_checkpoints_is_a_symlink(pretrained, tmp_path, ptft):
    # Checkpoints on a shared scratch volume: evaluating must not write beside them, where
    # every run on the volume would overwrite the others' metrics.
    run, scratch = tmp_path / "runs" / "ae", tmp_path / "scratch"
    scratch.mkdir()
    (run / "checkpoints").rename(scratch / "ae-checkpoints")
    (run / "checkpoints").symlink_to(scratch / "ae-checkpoints", target_is_directory=True)
    for target, split in ((run, "test"), (run / "checkpoints" / "best", "val"), (run / "checkpoints", "val")):
        result = ptft("evaluate", target, "--split", split)
        assert result.code == 0, result.stderr
        saved = json.loads((run / "eval" / split / "metrics.json").read_text())
        assert saved == json.loads(result.stdout)
    assert sorted(p.name for p in scratch.iterdir()) == ["ae-checkpoints"]
    assert not (scratch / "ae-checkpoints" / "eval").exists()


def test_evaluate_with_a_changed_split_says_so_once(pretrained, tmp_path, ptft):
    changed = ptft("evaluate", pretrained, "--split", "val", "data.split_seed=5")
    assert changed.code == 0, changed.stderr
    lines = [line for line in changed.stderr.splitlines() if "data.split_seed" in line]
    assert len(lines) == 1 and "split_seed 5" in lines[0] and "set data.split_seed=0" in lines[0]
    same = ptft("evaluate", pretrained, "--split", "val", "data.eval_batch_size=7")
    assert same.code == 0 and "data.split_seed" not in same.stderr


def test_monitor_no_validation_logs_is_refused_before_step_1(tmp_path, ptft):
    config = write_yaml(tmp_path / "ae.yaml", tiny_pretrain_config(tmp_path / "runs" / "ae"))
    for flags in (["--dry-run"], []):
        result = ptft("pretrain", config, "checkpoint.monitor=val/acc", *flags)
        assert result.code == 2 and "Traceback" not in result.stderr and result.stdout == ""
        message = " ".join(result.stderr.split())
        assert "checkpoint.monitor" in message and "'val/acc'" in message and "val/loss" in message
        assert not (tmp_path / "runs" / "ae").exists()  # nothing trained, nothing written
    # A classifier's supervised validation does log val/acc.
    finetune = write_yaml(tmp_path / "ft.yaml", tiny_finetune_config(tmp_path / "runs" / "ft", None))
    assert ptft("finetune", finetune, "init.checkpoint=null", "checkpoint.monitor=val/acc", "checkpoint.mode=max",
                "--dry-run").code == 0


def test_finetune_from_scratch_is_one_override_away(tmp_path, ptft):
    config = write_yaml(tmp_path / "ft.yaml", tiny_finetune_config(tmp_path / "runs" / "scratch", "missing/run"))
    result = ptft("finetune", config, "init.checkpoint=null")
    assert result.code == 0, result.stderr
    assert json.loads((Path(result.last_line) / "meta.json").read_text())["parent"] is None


def test_existing_run_is_refused_then_overwritten(pretrained, tmp_path, ptft):
    config = tmp_path / "ae.yaml"
    refused = ptft("pretrain", config)
    assert refused.code == 2 and "already holds a run" in refused.stderr and "Traceback" not in refused.stderr
    assert pretrained.exists()
    assert ptft("pretrain", config, "--overwrite").code == 0


def test_typo_in_override_exits_2_with_suggestion(tmp_path, ptft):
    config = write_yaml(tmp_path / "ae.yaml", tiny_pretrain_config(tmp_path / "runs" / "ae"))
    result = ptft("pretrain", config, "optim.lrr=0.1")
    assert result.code == 2
    assert "optim.lrr" in result.stderr and "optim.lr" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "runs" / "ae").exists()


def test_dry_run_trains_nothing(tmp_path, ptft):
    config = write_yaml(tmp_path / "ae.yaml", tiny_pretrain_config(tmp_path / "runs" / "ae"))
    result = ptft("pretrain", config, "--dry-run")
    assert result.code == 0, result.stderr
    assert yaml.safe_load(result.stdout)["model"]["name"] == "tiny_mlp_autoencoder"
    assert "parameters" in result.stderr
    assert not (tmp_path / "runs" / "ae").exists()


@pytest.mark.parametrize("config", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(config, ptft):
    result = ptft("config", config)
    assert result.code == 0, result.stderr
    assert yaml.safe_load(result.stdout)["run"]["dir"].startswith("runs/")


def test_bf16_accumulation_and_clipping_run_on_cpu(tmp_path, ptft):
    config = write_yaml(tmp_path / "c.yaml", tiny_pretrain_config(
        tmp_path / "run", train={"precision": "bf16", "accumulate": 2, "grad_clip": 0.5, "max_steps": 6,
                                 "eval_every_steps": 3}))
    result = ptft("pretrain", config)
    assert result.code == 0, result.stderr
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 6 and records[-1]["val/loss"] > 0
