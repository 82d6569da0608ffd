"""`ptft predict`: one record per input, with the checkpoint's own preprocessing, through the CLI."""

from __future__ import annotations

import csv
import io
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_finetune_config, tiny_pretrain_config


def train(stage: str, cfg: dict) -> Path:
    """Train in this process (module fixtures cannot use the function-scoped `ptft` fixture)."""
    from ptft.config import config_from_dict
    from ptft.stages import train as train_stage

    return train_stage(config_from_dict(cfg, "test"), stage)


def write_test_split(folder: Path, mode: str = "L", suffix: str = ".png") -> list[Path]:
    """digits' test split as 8-bit images in class folders, named by their index in the split."""
    from ptft.data import DATASETS

    data = DATASETS.get("digits")(Path("unused"), False)
    paths = []
    for i, (x, y) in enumerate(zip(data.test_x, data.test_y)):
        pixels = (x[0].numpy() * 255).round().astype(np.uint8)  # (8, 8), from counts 0..16
        path = folder / data.class_names[int(y)] / f"{i:04d}{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels, "L").convert(mode).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> Path:
    """A tiny MLP classifier finetuned from scratch on all of digits' labels."""
    run = tmp_path_factory.mktemp("predict") / "ft"
    train("finetune", tiny_finetune_config(run, None, data={"labels_per_class": None, "batch_size": 64},
                                           optim={"lr": 0.1}, train={"max_steps": 40}))
    return run


@pytest.fixture(scope="module")
def test_pngs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pngs") / "test"
    write_test_split(folder)
    return folder


def records(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def test_predictions_on_pngs_of_the_test_split_equal_evaluate(classifier, test_pngs, ptft):
    evaluated = ptft("evaluate", classifier)
    assert evaluated.code == 0, evaluated.stderr
    accuracy = json.loads(evaluated.stdout)["accuracy"]

    result = ptft("predict", classifier, test_pngs)
    assert result.code == 0, result.stderr
    found = records(result.stdout)
    assert len(found) == 359 and all(r["true"] == int(Path(r["path"]).parent.name) for r in found)
    shown = re.search(r"accuracy (\d\.\d+) \((\d+)/359 inputs with a known class\)", result.stderr)
    assert shown and int(shown.group(2)) / 359 == pytest.approx(accuracy, abs=1e-6)
    # The PNG files decode to exactly the split's tensors: image by image, the same predictions.
    split = records(ptft("predict", classifier, "--split", "test").stdout)
    by_index = {int(Path(r["path"]).stem): r for r in found}
    assert [by_index[i]["pred"] for i in range(359)] == [r["pred"] for r in split]
    assert [by_index[i]["prob"] for i in range(359)] == [r["prob"] for r in split]


def test_records_keep_the_input_order_with_top_k_as_csv(classifier, test_pngs, ptft, tmp_path):
    chosen = sorted(test_pngs.rglob("*.png"))[::-120][:3]  # not in sorted order
    out = tmp_path / "predictions.csv"
    result = ptft("predict", classifier, *chosen, "--top-k", "3", "--format", "csv", "--out", out)
    assert result.code == 0, result.stderr
    assert result.stdout == ""
    lines = out.read_text().splitlines()
    assert lines[0] == "path,pred,pred_name,prob,top_k,true,error"
    assert [line.split(",")[0] for line in lines[1:]] == [str(p) for p in chosen]
    top = json.loads(next(csv.DictReader(io.StringIO(out.read_text())))["top_k"])
    assert len(top) == 3 and [t["prob"] for t in top] == sorted((t["prob"] for t in top), reverse=True)
    assert not list(tmp_path.glob(".*"))  # no temporary file left beside it


def test_grey_model_fed_rgb_jpegs_sees_them_as_pil_converts_them(classifier, tmp_path, ptft):
    rng = np.random.default_rng(0)
    rgb, grey = tmp_path / "rgb", tmp_path / "grey"
    for i in range(12):
        pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        (rgb / f"{i:02d}.jpg").parent.mkdir(exist_ok=True)
        Image.fromarray(pixels, "RGB").save(rgb / f"{i:02d}.jpg", quality=90)
        (grey / f"{i:02d}.png").parent.mkdir(exist_ok=True)
        Image.open(rgb / f"{i:02d}.jpg").convert("L").save(grey / f"{i:02d}.png")
    from_rgb = ptft("predict", classifier, rgb)
    assert from_rgb.code == 0, from_rgb.stderr
    from_grey = records(ptft("predict", classifier, grey).stdout)
    assert [(r["pred"], r["prob"]) for r in records(from_rgb.stdout)] == [(r["pred"], r["prob"]) for r in from_grey]


def test_a_larger_image_is_resized_to_the_models_input(classifier, tmp_path, ptft):
    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((64, 48, 3), dtype=np.uint8), "RGB").save(big)
    result = ptft("predict", classifier, big)
    assert result.code == 0, result.stderr
    assert "pred" in records(result.stdout)[0]


def test_unreadable_inputs_are_error_records_and_the_rest_still_run(classifier, test_pngs, tmp_path, ptft):
    good = sorted((test_pngs / "5").glob("*.png"))[:2]
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(good[0].read_bytes()[:-30])
    out = tmp_path / "out.jsonl"
    result = ptft("predict", classifier, good[0], not_image, truncated, good[1], "--out", out)
    assert result.code == 2
    assert "2 input(s) could not be read" in result.stderr and "Traceback" not in result.stderr
    found = records(out.read_text())
    assert [r["path"] for r in found] == [str(p) for p in (good[0], not_image, truncated, good[1])]
    assert "pred" in found[0] and "pred" in found[3]
    assert str(not_image) in found[1]["error"] and str(truncated) in found[2]["error"]

    strict_out = tmp_path / "strict.jsonl"
    strict = ptft("predict", classifier, good[0], not_image, good[1], "--out", strict_out, "--strict")
    assert strict.code == 2 and str(not_image) in strict.stderr
    assert not strict_out.exists() and not list(tmp_path.glob(".*"))  # no partial output


def bad_arguments(tmp: Path, run: Path) -> dict[str, tuple[list, str]]:
    (tmp / "empty").mkdir(exist_ok=True)
    return {
        "missing path": ([run, tmp / "nope.png"], "nope.png"),
        "empty folder": ([run, tmp / "empty"], "no images in this folder"),
        "glob matching nothing": ([run, str(tmp / "*.jpeg")], "no image files match"),
        "not a checkpoint": ([tmp / "empty", tmp / "empty"], "predict: "),
        "unknown format": ([run, "--split", "test", "--format", "xml"], "--format"),
        "unknown split": ([run, "--split", "train"], "--split"),
        "split and inputs": ([run, tmp / "empty", "--split", "test"], "either INPUT paths or --split"),
        "no input": ([run], "INPUT"),
    }


@pytest.mark.parametrize("case", ["missing path", "empty folder", "glob matching nothing", "not a checkpoint",
                                  "unknown format", "unknown split", "split and inputs", "no input"])
def test_bad_arguments_exit_2_naming_them_and_write_nothing(case, classifier, tmp_path, ptft):
    args, named = bad_arguments(tmp_path, classifier)[case]
    out = tmp_path / "out.jsonl"
    result = ptft("predict", *args, "--out", out)
    assert result.code == 2, result.stderr
    assert named in result.stderr and "Traceback" not in result.stderr
    assert not out.exists() and not list(tmp_path.glob(".*"))


def test_paths_on_stdin_and_globs_are_inputs(classifier, test_pngs, ptft, monkeypatch):
    listed = sorted((test_pngs / "2").glob("*.png"))[:3]
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(f"{p}\n" for p in listed) + "\n"))
    from_stdin = ptft("predict", classifier, "-")
    assert from_stdin.code == 0, from_stdin.stderr
    assert [r["path"] for r in records(from_stdin.stdout)] == [str(p) for p in listed]
    globbed = ptft("predict", classifier, str(test_pngs / "2" / "00[0-4]*.png"))
    assert globbed.code == 0 and [r["path"] for r in records(globbed.stdout)] == \
        [str(p) for p in sorted((test_pngs / "2").glob("00[0-4]*.png"))]


def test_decoding_in_worker_processes_gives_the_same_records(classifier, test_pngs, ptft):
    here = ptft("predict", classifier, test_pngs, "--workers", "0", "--batch-size", "100")
    pooled = ptft("predict", classifier, test_pngs, "--workers", "2", "--batch-size", "100")
    assert here.code == pooled.code == 0, pooled.stderr
    assert pooled.stdout == here.stdout


def test_autoencoder_predicts_reconstructions_mse_psnr_and_pictures(tmp_path, ptft):
    run = tmp_path / "ae"
    train("pretrain", tiny_pretrain_config(run))
    evaluated = json.loads(ptft("evaluate", run).stdout)
    result = ptft("predict", run, "--split", "test", "--save-images", tmp_path / "recon")
    assert result.code == 0, result.stderr
    found = records(result.stdout)
    assert len(found) == evaluated["num_examples"] == 359
    assert np.mean([r["mse"] for r in found]) == pytest.approx(evaluated["mse"], rel=1e-4)
    assert np.mean([r["psnr"] for r in found]) == pytest.approx(evaluated["psnr"], rel=1e-4)
    saved = Image.open(found[5]["reconstruction"])
    assert saved.size == (8, 8) and saved.mode == "L" and len(list((tmp_path / "recon").iterdir())) == 359


def test_predict_embed_and_export_help_answer_without_torch():
    import subprocess

    code = ("import sys\nfrom ptft.cli import main\n"
            "for cmd in ('predict', 'embed', 'export'):\n"
            "    sys.argv = ['ptft', cmd, '--help']\n"
            "    try:\n        main()\n    except SystemExit as exc:\n        assert exc.code in (0, None)\n"
            "assert 'torch' not in sys.modules\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_normalized_model_predicts_what_evaluate_measures(test_pngs, tmp_path, ptft):
    run = tmp_path / "normalized"
    train("finetune", tiny_finetune_config(run, None, data={"labels_per_class": None, "batch_size": 64,
                                                            "normalize": "dataset"},
                                           optim={"lr": 0.1}, train={"max_steps": 20}))
    evaluated = json.loads(ptft("evaluate", run).stdout)
    result = ptft("predict", run, test_pngs)
    assert result.code == 0, result.stderr
    confusion = np.zeros((10, 10), dtype=int)
    for record in records(result.stdout):
        confusion[record["true"], record["pred"]] += 1
    assert confusion.tolist() == evaluated["confusion_matrix"]  # data.normalize's numbers applied, as in training


def write_wide_folder(root: Path) -> Path:
    """An imagefolder of 16x8 (W x H) noise photos: 'left' brighter on its left half, 'right' on its right.

    Cropping to the centre square and stretching the whole photo give different pixels, so a
    model fed the other rule than it was trained with predicts other probabilities.
    """
    rng = np.random.default_rng(0)
    for split, count in (("train", 24), ("test", 8)):
        for name, bright in (("left", slice(0, 8)), ("right", slice(8, 16))):
            for i in range(count):
                pixels = rng.integers(0, 200, (8, 16), dtype=np.uint8)
                pixels[:, bright] += 40
                path = root / split / name / f"{i:02d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels, "L").save(path)
    return root


def train_on_wide_photos(tmp_path: Path, resize: str | None) -> tuple[Path, Path]:
    """(the photo folder, a run finetuned on it at image_size 6 by `resize`, None: the default)."""
    root = write_wide_folder(tmp_path / "photos")
    data = {"name": "imagefolder", "root": str(root), "image_size": 6, "labels_per_class": None,
            "batch_size": 16, "val_fraction": 0.25} | ({} if resize is None else {"resize": resize})
    run = tmp_path / "run"
    train("finetune", tiny_finetune_config(run, None, data=data, train={"max_steps": 10}))
    return root, run


@pytest.mark.parametrize("resize", [None, "stretch"])  # None: the default rule, crop
def test_predict_on_a_folders_own_photos_uses_its_resize_rule_and_equals_evaluate(resize, tmp_path, ptft):
    root, run = train_on_wide_photos(tmp_path, resize)
    evaluated = ptft("evaluate", run)
    assert evaluated.code == 0, evaluated.stderr

    result = ptft("predict", run, root / "test")
    assert result.code == 0, result.stderr
    found = records(result.stdout)
    shown = re.search(r"accuracy (\d\.\d+) \((\d+)/16 inputs with a known class\)", result.stderr)
    assert shown and int(shown.group(2)) / 16 == pytest.approx(json.loads(evaluated.stdout)["accuracy"], abs=1e-6)
    # The split's tensors are the folder's test images decoded as training decoded them, in the same order.
    split = records(ptft("predict", run, "--split", "test").stdout)
    assert [(r["pred"], r["prob"], r["true"]) for r in found] == [(r["pred"], r["prob"], r["true"]) for r in split]


def test_a_folder_given_as_dot_names_its_inputs_as_the_shell_does(classifier, test_pngs, ptft, monkeypatch):
    monkeypatch.chdir(test_pngs)
    result = ptft("predict", classifier, ".")
    assert result.code == 0, result.stderr
    found = records(result.stdout)
    assert [r["path"] for r in found] == [str(p.relative_to(test_pngs)) for p in sorted(test_pngs.rglob("*.png"))]
    assert all(r["true"] == int(Path(r["path"]).parent.name) for r in found)  # class folders still label them


def test_a_checkpoint_written_before_data_resize_existed_predicts_with_stretch(tmp_path, ptft):
    root, run = train_on_wide_photos(tmp_path, "stretch")
    stretched = ptft("predict", run, root / "test")
    assert stretched.code == 0, stretched.stderr
    for meta_file in (run / "checkpoints").glob("step-*/meta.json"):
        written = json.loads(meta_file.read_text())
        del written["config"]["data"]["resize"]  # as ptft wrote it before the key existed
        meta_file.write_text(json.dumps(written))
    old = ptft("predict", run, root / "test")
    assert old.code == 0, old.stderr
    assert old.stdout == stretched.stdout  # today's default, crop, would give other probabilities


def test_predict_and_embed_start_without_importing_the_libraries_only_pictures_and_probes_need():
    import subprocess

    # sklearn, matplotlib and torchvision cost seconds of import: predict over a folder used to spend more
    # time importing them than classifying 10,000 images.
    code = ("import sys\nimport ptft.inference.predict, ptft.inference.embed, ptft.inference.export\n"
            "heavy = [m for m in ('sklearn', 'matplotlib', 'torchvision') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
