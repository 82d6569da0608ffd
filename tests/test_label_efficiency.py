"""scripts/label_efficiency.py: a smoke run through the real CLI, and its table arithmetic."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import yaml
from matplotlib import image as plt_image

from conftest import REPO, tiny_finetune_config, write_yaml

SCRIPT = REPO / "scripts" / "label_efficiency.py"


@pytest.fixture
def script(monkeypatch):
    """The script as a module (registered, so its dataclasses resolve their annotations)."""
    spec = importlib.util.spec_from_file_location("label_efficiency", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_quick_study_writes_table_plot_and_raw(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--dataset", "digits", "--methods", "scratch", "denoising",
         "--budgets", "2", "--seeds", "0", "--quick", "--jobs", "2", "--out", str(out), "--work", str(work)],
        capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    table = (out / "table.md").read_text()
    assert proc.stdout == table
    assert table.startswith("Test accuracy (%), mean ± std over 1 seed (0), by labels per class:")
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert rows[0] == "| method | 2 |"
    assert [row.split(" | ")[0] for row in rows[1:]] == ["| scratch", "| denoising"]
    assert all(row.endswith(" ± 0.0 |") for row in rows[1:])  # one seed: no spread
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    raw = json.loads((out / "raw.json").read_text())
    assert [(r["method"], r["labels_per_class"], r["seed"]) for r in raw["runs"]] == [
        ("scratch", 2, 0), ("denoising", 2, 0)]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in raw["runs"])
    assert list(raw["pretrain_seconds"]) == ["denoising"]
    # The finetune started from the pretraining the script ran, and saw 2 labels per class.
    meta = json.loads((work / "denoising" / "labels2-seed0" / "checkpoints" / "last" / "meta.json").read_text())
    assert meta["parent"]["path"].startswith(str(work / "denoising" / "pretrain"))
    assert meta["data"]["labelled_size"] == 20


def test_table_is_mean_and_std_over_seeds(script):
    records = [{"method": m, "labels_per_class": b, "seed": s, "accuracy": a}
               for m, b, s, a in [("scratch", 1, 0, 0.5), ("scratch", 1, 1, 0.7), ("masked", 1, 0, 0.9),
                                  ("masked", 1, 1, 0.9)]]
    rows = script.summarize(records)
    assert rows == [("scratch", 1, pytest.approx(0.6), pytest.approx(0.1)), ("masked", 1, 0.9, 0.0)]
    table = script.markdown_table(rows, [1], [0, 1])
    assert table.splitlines()[2:] == ["| method | 1 |", "|---|---:|", "| scratch | 60.0 ± 10.0 |",
                                      "| masked | 90.0 ± 0.0 |"]


@pytest.mark.parametrize("argv", [["--budgets", "0"], ["--jobs", "0"]])
def test_bad_budget_or_jobs_is_refused(script, argv):
    with pytest.raises(SystemExit) as exc:
        script.parse_args(argv)
    assert exc.value.code == 2


def test_plot_draws_every_method_and_budget_to_a_png(script, tmp_path):
    rows = [("scratch", 10, 0.6, 0.05), ("pretrained", 1, 0.5, 0.1), ("scratch", 1, 0.2, 0.08),
            ("pretrained", 10, 0.85, 0.02), ("scratch", 5, 0.4, 0.05), ("pretrained", 5, 0.7, 0.05),
            ("pretrained", 100, 0.95, 0.01)]
    path = tmp_path / "plots" / "label_efficiency.png"
    script.save_label_efficiency_plot(rows, path)
    image = plt_image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    # Two methods: the plot holds at least two distinct saturated line colours besides black and white.
    rgb = (image[..., :3] * 255).astype(int).reshape(-1, 3)
    saturated = {tuple(c) for c in rgb if c.max() - c.min() > 80}
    assert len(saturated) >= 2


def test_val_labels_per_class_holds_out_that_many_examples_of_each_class(tmp_path, ptft):
    config = write_yaml(tmp_path / "ft.yaml", tiny_finetune_config(
        tmp_path / "run", None, data={"val_labels_per_class": 3}, train={"max_steps": 2, "eval_every_steps": 2}))
    result = ptft("finetune", config)
    assert result.code == 0, result.stderr
    meta = json.loads((tmp_path / "run" / "checkpoints" / "last" / "meta.json").read_text())
    assert meta["data"]["val_size"] == 30 and meta["data"]["labelled_size"] == 20


def test_quick_cross_dataset_study_has_a_column_per_dataset_and_budget(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--datasets", "digits", "--methods", "scratch", "scratch+fixmatch",
         "--budgets", "2", "--seeds", "0", "--val-per-class", "--quick", "--jobs", "2", "--out", str(out),
         "--work", str(work)],
        capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in (out / "table.md").read_text().splitlines() if line.startswith("| ")]
    assert rows[0] == "| method | digits 2 |"
    assert [row.split(" | ")[0] for row in rows[1:]] == [
        "| scratch", "| scratch, val = budget", "| scratch+fixmatch", "| scratch+fixmatch, val = budget"]
    raw = json.loads((out / "raw.json").read_text())
    assert raw["datasets"] == ["digits"] and len(raw["runs"]) == 4
    # The same shipped finetune config; only FixMatch and the validation split differ.
    fixmatch = yaml.safe_load((work / "digits" / "scratch+fixmatch" / "labels2-seed0-val2" / "config.yaml").read_text())
    assert fixmatch["finetune"]["unlabelled"] == "fixmatch" and fixmatch["data"]["val_labels_per_class"] == 2
    plain = yaml.safe_load((work / "digits" / "scratch" / "labels2-seed0" / "config.yaml").read_text())
    assert plain["finetune"]["unlabelled"] == "none" and plain["data"]["val_labels_per_class"] is None


def test_quick_denoising_study_finetunes_the_autoencoders_encoder(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--datasets", "digits", "--methods", "denoising+fixmatch",
         "--budgets", "2", "--seeds", "0", "--quick", "--out", str(out), "--work", str(work)],
        capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    pretrained = yaml.safe_load((work / "digits" / "denoising" / "pretrain" / "config.yaml").read_text())
    assert pretrained["model"]["name"] == "conv_autoencoder" and pretrained["objective"]["name"] == "denoising"
    finetune = work / "digits" / "denoising+fixmatch" / "labels2-seed0"
    assert yaml.safe_load((finetune / "config.yaml").read_text())["model"]["name"] == "conv_classifier"
    meta = json.loads((finetune / "checkpoints" / "last" / "meta.json").read_text())
    assert meta["parent"]["path"].startswith(str(work / "digits" / "denoising" / "pretrain"))
    assert json.loads((out / "raw.json").read_text())["runs"][0]["method"] == "denoising+fixmatch"


@pytest.mark.parametrize("flag, rows", [
    ([], ["scratch"]),
    (["--val-per-class"], ["scratch", "scratch, val = budget"]),
    (["--val-per-class", "only"], ["scratch, val = budget"])])
def test_val_per_class_adds_or_replaces_the_ten_percent_split(script, flag, rows):
    args = script.parse_args(["--datasets", "digits", "--methods", "scratch", "--budgets", "5", "--seeds", "0", *flag])
    runs = script.finetunes_from(args, "digits", None)
    assert [run.row for run in runs] == rows and {run.budget for run in runs} == {5}


def test_cross_table_puts_datasets_side_by_side_and_marks_missing_runs(script):
    table = script.cross_table({"digits": [("scratch", 1, 0.5, 0.0), ("vicreg", 1, 0.75, 0.05)],
                                "mnist": [("scratch", 1, 0.25, 0.0)]}, [1], [0])
    assert table.splitlines()[2:] == ["| method | digits 1 | mnist 1 |", "|---|---:|---:|",
                                      "| scratch | 50.0 ± 0.0 | 25.0 ± 0.0 |", "| vicreg | 75.0 ± 5.0 | - |"]


@pytest.mark.parametrize("argv", [["--datasets", "cifar10"], ["--datasets", "digits", "--methods", "masked"],
                                  ["--dataset", "digits", "--methods", "vicreg"],
                                  ["--dataset", "digits", "--select", "loss"],
                                  ["--datasets", "digits", "--select", "best"]])
def test_unknown_datasets_or_methods_of_the_other_study_are_refused(script, argv):
    with pytest.raises(SystemExit) as exc:
        script.parse_args(argv)
    assert exc.value.code == 2


@pytest.mark.parametrize("select, rows", [
    (None, ["scratch", "contrastive", "contrastive+fixmatch"]),
    ("loss", ["scratch", "contrastive (best val/loss)", "contrastive+fixmatch (best val/loss)"]),
    ("both", ["scratch", "contrastive (best val/knn_acc)", "contrastive (best val/loss)",
              "contrastive+fixmatch (best val/knn_acc)", "contrastive+fixmatch (best val/loss)"])])
def test_select_names_the_pretraining_checkpoint_in_the_rows_unless_it_is_the_default_knn(script, select, rows):
    argv = ["--datasets", "digits", "--methods", "scratch", "contrastive", "contrastive+fixmatch"]
    args = script.parse_args(argv + (["--select", select] if select else []))
    assert args.select == (select or "knn")
    assert [recipe.row for recipe in args.recipes] == rows
    # The default selection keeps the run folders it always had.
    assert {r.folder for r in args.recipes if r.select == "knn"} <= {"contrastive", "contrastive+fixmatch"}


def test_quick_study_with_select_both_finetunes_from_each_pretraining_checkpoint(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--datasets", "digits", "--methods", "contrastive", "--select", "both",
         "--budgets", "2", "--seeds", "0", "--quick", "--jobs", "2", "--out", str(out), "--work", str(work)],
        capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    table = (out / "table.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert rows[0] == "| method | digits 2 |"
    assert [row.split(" | ")[0] for row in rows[1:]] == ["| contrastive (best val/knn_acc)",
                                                         "| contrastive (best val/loss)"]
    raw = json.loads((out / "raw.json").read_text())
    assert raw["select"] == "both" and len(raw["runs"]) == 2
    assert {key: best["monitor"] for key, best in raw["pretrain_best"].items()} == {
        "digits/contrastive": "val/knn_acc", "digits/contrastive-best-loss": "val/loss"}
    assert "- digits/contrastive-best-loss: best val/loss at step 2 (" in table
    for folder, monitor in [("contrastive", "val/knn_acc"), ("contrastive-best-loss", "val/loss")]:
        pretrained = yaml.safe_load((work / "digits" / folder / "pretrain" / "config.yaml").read_text())
        # Both pretrainings log val/knn_acc; only the checkpoint they hand on differs.
        assert pretrained["checkpoint"]["monitor"] == monitor and pretrained["train"]["knn_monitor"] is True
        meta = json.loads((work / "digits" / folder / "labels2-seed0" / "checkpoints" / "last" / "meta.json")
                          .read_text())
        assert meta["parent"]["path"].startswith(str(work / "digits" / folder / "pretrain"))


def _study_raw(path, runs):
    path.write_text(json.dumps({"datasets": sorted({r[0] for r in runs}), "runs": [
        {"dataset": d, "method": m, "labels_per_class": b, "seed": s, "accuracy": a, "seconds": 1.0}
        for d, m, b, s, a in runs]}))
    return path


def test_combine_puts_several_studies_in_one_table_with_each_datasets_own_budgets(tmp_path):
    first = _study_raw(tmp_path / "a.json", [("mnist", "scratch+fixmatch", 10, s, 0.9) for s in (0, 1)]
                       + [("mnist", "scratch", 10, s, 0.5 + 0.1 * s) for s in (0, 1)])
    second = _study_raw(tmp_path / "b.json", [("fashion_mnist", "scratch", 100, s, 0.8) for s in (0, 1)]
                        + [("mnist", "scratch, val = budget", 10, s, 0.7) for s in (0, 1)]
                        + [("digits", "scratch", 5, s, 0.6) for s in (0, 1)])
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--combine", str(first), str(second), "--out", str(out)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    table = (out / "table.md").read_text()
    assert proc.stdout == table and table.startswith("Test accuracy (%), mean ± std over 2 seeds (0, 1)")
    # Datasets in the study's order, only the budgets each was run at; each row before its val = budget twin.
    assert table.splitlines()[2:] == [
        "| method | digits 5 | mnist 10 | fashion_mnist 100 |", "|---|---:|---:|---:|",
        "| scratch | 60.0 ± 0.0 | 55.0 ± 5.0 | 80.0 ± 0.0 |",
        "| scratch, val = budget | - | 70.0 ± 0.0 | - |",
        "| scratch+fixmatch | - | 90.0 ± 0.0 | - |"]
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    raw = json.loads((out / "raw.json").read_text())
    assert raw["combined"] == [str(first), str(second)] and len(raw["runs"]) == 10


@pytest.mark.parametrize("case, message", [
    ("repeated", "repeats a run another file holds"),
    ("missing", "is not a raw.json that label_efficiency.py wrote"),
    ("seeds", "the cells are over different seeds")])
def test_combine_refuses_repeated_runs_unreadable_files_and_mixed_seeds(tmp_path, case, message):
    first = _study_raw(tmp_path / "a.json", [("mnist", "scratch", 10, 0, 0.5), ("mnist", "scratch", 10, 1, 0.5)])
    second = {"repeated": lambda: _study_raw(tmp_path / "b.json", [("mnist", "scratch", 10, 1, 0.6)]),
              "missing": lambda: tmp_path / "absent.json",
              "seeds": lambda: _study_raw(tmp_path / "b.json", [("mnist", "scratch", 100, 0, 0.9)])}[case]()
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--combine", str(first), str(second), "--out", str(out)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr
    assert case == "seeds" or str(second) in proc.stderr  # names the file at fault
    assert not out.exists()
