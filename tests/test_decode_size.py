"""data.decode_size: images kept larger than the model's input, training crops taken from all their pixels
(issue #15: random-resized-crop from the original resolution, evaluation resizing the whole image)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_finetune_config, write_colour_images, write_yaml
from ptft.config.schema import DataSection
from ptft.data import build_data
from ptft.data.resize import attach_input_size, fit_batch
from ptft.objectives.augment import Augment, apply_affine, crop_matrices

COLOUR_MODEL = {"name": "conv_classifier", "channels": [4, 8]}


def colour_data(root: Path, **data) -> dict:
    return {"name": "imagefolder", "root": str(root), "image_size": 8, "labels_per_class": None, "batch_size": 12,
            "val_fraction": 0.25, **data}


def test_the_cache_keeps_decode_size_and_the_model_takes_image_size(tmp_path):
    root = write_colour_images(tmp_path / "images", side=20, train=8, test=2)
    bundle = build_data(DataSection(**colour_data(root, decode_size=16)), "cpu")
    assert bundle.input_shape == (3, 8, 8) and bundle.stored_size == (16, 16)
    assert bundle.unlabelled.x.shape[-2:] == (16, 16)
    plain = build_data(DataSection(**colour_data(root)), "cpu")
    assert plain.input_shape == (3, 8, 8) and plain.stored_size is None  # decode_size unset: image_size itself


def test_views_are_cropped_from_the_stored_pixels_straight_to_the_input_size():
    # Stripes one stored pixel wide: a view cropped from them keeps them, a view cropped from the images
    # first shrunk to the input size cannot (the shrink has already averaged them to grey).
    stored = torch.zeros(4, 1, 32, 32)
    stored[..., ::2] = 1.0
    augment = Augment(crop_scale=(0.0625, 0.0625), output_size=(8, 8))  # an 8 x 8 window of the 32 px image
    views = augment(stored, torch.Generator().manual_seed(0))
    assert views.shape == (4, 1, 8, 8)
    assert views.std() > 0.3  # the stripes, at full contrast
    shrunk = Augment(crop_scale=(0.0625, 0.0625))(fit_batch(stored, (8, 8)), torch.Generator().manual_seed(0))
    assert shrunk.std() < 0.05
    # One resampling: the view is the stored image read through the crop's own matrices.
    matrices = crop_matrices(stored, (0.0625, 0.0625), (1.0, 1.0), torch.Generator().manual_seed(0))
    assert torch.equal(views, apply_affine(stored, matrices, (8, 8)))


def test_a_view_without_geometry_is_fitted_as_every_evaluation_batch_is():
    stored = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    flipped_only = Augment(flip_p=1.0, output_size=(8, 8))
    assert flipped_only.changes_images and not flipped_only.moves_pixels
    assert not Augment(output_size=(8, 8)).changes_images  # only fitting: the objective skips it
    views = flipped_only(stored, torch.Generator().manual_seed(0))
    assert torch.equal(views, fit_batch(stored, (8, 8)).flip(-1))


def test_the_model_fits_a_larger_batch_to_its_input_before_normalising(tmp_path):
    from ptft.config.schema import ModelSection
    from ptft.data.normalize import attach_normalization
    from ptft.models import build_model

    torch.manual_seed(0)
    stats = {"mean": [0.2, 0.4, 0.6], "std": [0.5, 0.5, 0.5]}
    model = build_model(ModelSection(name="conv_classifier", options={"channels": [4]}), (3, 8, 8), 3, "supervised")
    model = attach_normalization(attach_input_size(model, (8, 8)), stats).eval()
    stored = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fitted = fit_batch(stored, (8, 8))
        assert torch.equal(model(stored), model(fitted))  # a batch already at the input size passes untouched


def test_decode_size_without_image_size_smaller_or_with_a_reconstruction_objective_exits_2(tmp_path, ptft):
    root = write_colour_images(tmp_path / "images", side=12, train=4, test=1)
    base = tiny_finetune_config(tmp_path / "run", None, data=colour_data(root), model=COLOUR_MODEL)
    no_size = {**base, "data": {**base["data"], "image_size": None, "decode_size": 12}}
    result = ptft("finetune", write_yaml(tmp_path / "a.yaml", no_size))
    assert result.code == 2 and "data.decode_size" in result.stderr and "data.image_size" in result.stderr
    smaller = {**base, "data": {**base["data"], "decode_size": 4}}
    result = ptft("finetune", write_yaml(tmp_path / "b.yaml", smaller))
    assert result.code == 2 and "data.decode_size: 4 is smaller than data.image_size 8" in result.stderr
    ae = {"run": {"dir": str(tmp_path / "ae")}, "data": colour_data(root, decode_size=12),
          "model": {"name": "conv_autoencoder", "channels": [4]}, "objective": {"name": "reconstruction"},
          "train": {"max_steps": 2}}
    result = ptft("pretrain", write_yaml(tmp_path / "c.yaml", ae))
    assert result.code == 2 and "data.decode_size: objective 'reconstruction' reconstructs" in result.stderr
    assert not (tmp_path / "ae" / "checkpoints").exists()


def test_contrastive_pretrain_finetune_evaluate_and_predict_from_larger_images(tmp_path, ptft):
    from test_predict import records

    root = write_colour_images(tmp_path / "images", side=20, train=12, test=4)
    data = colour_data(root, decode_size=16)
    pre = {"run": {"dir": str(tmp_path / "pre"), "seed": 0}, "data": data,
           "model": {"name": "conv_classifier", **{k: v for k, v in COLOUR_MODEL.items() if k != "name"}},
           "objective": {"name": "contrastive", "preset": "simclr_rgb"}, "optim": {"name": "adam", "lr": 0.01},
           "train": {"max_steps": 4, "eval_every_steps": 2}}
    result = ptft("pretrain", write_yaml(tmp_path / "pre.yaml", pre))
    assert result.code == 0, result.stderr
    fine = tiny_finetune_config(tmp_path / "fine", str(tmp_path / "pre"), data=data, model=COLOUR_MODEL,
                                objective={"name": "supervised", "crop_scale": [0.3, 1.0]}, train={"max_steps": 6})
    result = ptft("finetune", write_yaml(tmp_path / "fine.yaml", fine))
    assert result.code == 0, result.stderr
    meta = json.loads(next((tmp_path / "fine" / "checkpoints").glob("step-*/meta.json")).read_text())
    assert meta["inputs"]["shape"] == [3, 8, 8] and meta["inputs"]["decoded_size"] == [16, 16]
    evaluated = ptft("evaluate", tmp_path / "fine")
    assert evaluated.code == 0, evaluated.stderr
    # Predict decodes the files at the stored size and the model fits them as it fitted the test split.
    files = records(ptft("predict", tmp_path / "fine", root / "test").stdout)
    split = records(ptft("predict", tmp_path / "fine", "--split", "test").stdout)
    assert len(files) == 12 and [(r["pred"], r["prob"]) for r in files] == [(r["pred"], r["prob"]) for r in split]
    accuracy = sum(r["pred"] == r["true"] for r in files) / len(files)
    assert accuracy == pytest.approx(json.loads(evaluated.stdout)["accuracy"])


def test_decode_size_on_a_dataset_that_is_not_decoded_from_files_exits_2(tmp_path, ptft):
    cfg = write_yaml(tmp_path / "d.yaml", tiny_finetune_config(tmp_path / "run", None))
    result = ptft("config", cfg, "data.decode_size=16")
    assert result.code == 2
    assert "data.decode_size" in result.stderr and "digits images are not decoded from files" in result.stderr
