"""Config mistakes and shortcuts as users meet them through the CLI: checkpoint.mode from the monitored
metric, a run length given on the command line, out-of-range model options caught by `ptft config`."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from conftest import REPO, tiny_finetune_config, tiny_pretrain_config, write_yaml


def _val_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if "val/acc" in record]


def test_finetune_monitoring_val_acc_without_mode_hands_over_the_highest_val_acc(tmp_path, ptft):
    run_dir = tmp_path / "ft"
    config = write_yaml(tmp_path / "ft.yaml", tiny_finetune_config(
        run_dir, None, train={"max_steps": 24, "eval_every_steps": 3}, checkpoint={"monitor": "val/acc"}))

    shown = ptft("config", config)
    assert shown.code == 0, shown.stderr
    assert yaml.safe_load(shown.stdout)["checkpoint"]["mode"] == "max"

    result = ptft("finetune", config)
    assert result.code == 0, result.stderr
    records = _val_records(run_dir)
    accuracies = [record["val/acc"] for record in records]
    assert len(set(accuracies)) > 1, "the run must see different accuracies for the choice to matter"
    best = next(record["step"] for record in records if record["val/acc"] == max(accuracies))
    assert Path(result.last_line).name == f"step-{best:08d}"
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["checkpoint"]["mode"] == "max"


def test_run_saved_with_mode_min_for_val_loss_still_resumes(tmp_path, ptft):
    # What every run before mode inference saved: the default monitor with an explicit `mode: min`.
    config = write_yaml(tmp_path / "ae.yaml", tiny_pretrain_config(tmp_path / "ae", train={"max_steps": 10}))
    assert ptft("pretrain", config).code == 0
    saved = yaml.safe_load((tmp_path / "ae" / "config.yaml").read_text())["checkpoint"]
    assert (saved["monitor"], saved["mode"]) == ("val/loss", "min")
    resumed = ptft("pretrain", config, "train.max_steps=20", "--resume")
    assert resumed.code == 0, resumed.stderr
    assert Path(resumed.last_line).name == "step-00000020"


# ---- one run length from the command line -------------------------------------------------------

def test_max_steps_on_the_command_line_replaces_the_files_epochs(tmp_path, ptft):
    config = write_yaml(tmp_path / "ae.yaml", tiny_pretrain_config(
        tmp_path / "ae", train={"max_steps": None, "epochs": 50, "eval_every_steps": 3}))
    result = ptft("pretrain", config, "train.max_steps=3")
    assert result.code == 0, result.stderr
    assert Path(result.last_line).name == "step-00000003"
    notes = [line for line in result.stderr.splitlines() if "train.epochs" in line]
    assert len(notes) == 1 and "train.max_steps=3" in notes[0] and "50" in notes[0]
    saved = yaml.safe_load((tmp_path / "ae" / "config.yaml").read_text())["train"]
    assert (saved["max_steps"], saved["epochs"]) == (3, None)


def test_epochs_on_the_command_line_replaces_the_files_max_steps(tmp_path, ptft):
    config = write_yaml(tmp_path / "ae.yaml", tiny_pretrain_config(tmp_path / "ae", train={"max_steps": 500}))
    result = ptft("config", config, "train.epochs=2")
    assert result.code == 0, result.stderr
    train = yaml.safe_load(result.stdout)["train"]
    assert (train["epochs"], train["max_steps"]) == (2, None)
    assert "train.max_steps" in result.stderr and "train.epochs=2" in result.stderr


def test_both_run_lengths_in_the_file_or_both_on_the_command_line_are_still_an_error(tmp_path, ptft):
    both_in_file = write_yaml(tmp_path / "both.yaml", tiny_pretrain_config(
        tmp_path / "run", train={"max_steps": 5, "epochs": 2}))
    one_in_file = write_yaml(tmp_path / "one.yaml", tiny_pretrain_config(tmp_path / "run"))
    for result in (ptft("config", both_in_file), ptft("config", both_in_file, "train.max_steps=7"),
                   ptft("config", one_in_file, "train.max_steps=7", "train.epochs=2")):
        assert result.code == 2 and "Traceback" not in result.stderr
        assert "train.epochs, train.max_steps" in result.stderr and "set exactly one" in result.stderr


# ---- a builder renamed on the command line ----------------------------------------------------

def test_renaming_the_model_on_the_command_line_notes_the_options_it_drops(tmp_path, ptft):
    # configs/ssl_pretrain_denoising.yaml's first trial: conv_autoencoder over ssl_pretrain.yaml's classifier
    # silently fell back to the builder's default widths; the note names what went.
    config = write_yaml(tmp_path / "ft.yaml", tiny_finetune_config(
        tmp_path / "ft", None, model={"name": "conv_classifier", "channels": [4, 8], "latent": 8}))
    model = yaml.safe_load(config.read_text())["model"]

    result = ptft("config", config, "model.name=conv_autoencoder", "model.latent=4")
    assert result.code == 0, result.stderr
    notes = [line for line in result.stderr.splitlines() if "model.name=conv_autoencoder" in line]
    assert len(notes) == 1 and "model.channels" in notes[0] and "model.latent" not in notes[0]
    assert yaml.safe_load(result.stdout)["model"]["latent"] == 4

    for same_or_bare in ("model.name=" + model["name"], "objective.max_shift=0.1"):
        assert "afresh" not in ptft("config", config, same_or_bare).stderr


# ---- model option ranges ----------------------------------------------------------------------

def test_config_refuses_out_of_range_model_options_naming_key_range_and_value(ptft):
    cases = {"model.latent=0": ("model.latent", "an integer >= 1", "got 0"),
             "model.dropout=1.0": ("model.dropout", "in [0, 1)", "got 1.0"),
             "model.hidden=[128,0]": ("model.hidden", "integers >= 1", "got [128, 0]"),
             "model.hidden=[]": ("model.hidden", "a non-empty list", "got []")}
    for override, expected in cases.items():
        result = ptft("config", REPO / "configs" / "ae.yaml", override)
        assert result.code == 2 and "Traceback" not in result.stderr, override
        assert all(part in result.stderr for part in expected), result.stderr
    conv = ptft("config", REPO / "configs" / "conv_finetune.yaml", "model.channels=[8,-1]", "model.head_dropout=2")
    assert conv.code == 2 and "model.channels" in conv.stderr and "model.head_dropout" in conv.stderr
