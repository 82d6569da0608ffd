"""data.normalize: per-channel (x - mean) / std in front of the encoder, the numbers recorded and reused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_finetune_config, tiny_pretrain_config, write_yaml
from ptft.config.schema import DataSection
from ptft.data import build_data
from ptft.data.normalize import IMAGENET, Normalize, attach_normalization, normalization_stats
from ptft.errors import UserError
from ptft.models import MODELS


def data_cfg(**changes) -> DataSection:
    return DataSection(**{"name": "synthetic", **changes})


def test_normalize_subtracts_the_mean_and_divides_by_the_std_per_channel():
    x = torch.rand(4, 3, 5, 6, generator=torch.Generator().manual_seed(0))
    out = Normalize([0.1, 0.2, 0.3], [0.5, 0.25, 2.0])(x)
    expected = (x - torch.tensor([0.1, 0.2, 0.3])[:, None, None]) / torch.tensor([0.5, 0.25, 2.0])[:, None, None]
    torch.testing.assert_close(out, expected)


def test_attached_normalization_feeds_every_encoder_call_and_leaves_the_weights_alone():
    torch.manual_seed(0)
    plain = MODELS.get("tiny_mlp_classifier")((1, 8, 8), 10)
    normalized = MODELS.get("tiny_mlp_classifier")((1, 8, 8), 10)
    normalized.load_state_dict(plain.state_dict())
    attach_normalization(normalized, {"mean": [0.25], "std": [0.5]})
    assert normalized.state_dict().keys() == plain.state_dict().keys()  # checkpoints and weight loading unchanged
    x = torch.rand(3, 1, 8, 8)
    torch.testing.assert_close(normalized(x), plain((x - 0.25) / 0.5))
    # Objectives (contrastive) and probes call the encoder directly: it normalises too.
    torch.testing.assert_close(normalized.encoder(x), plain.encoder((x - 0.25) / 0.5))
    assert attach_normalization(plain, None) is plain and torch.equal(plain(x), plain(x))


def test_dataset_statistics_are_exact_over_the_train_split_on_every_device():
    data = build_data(data_cfg(name="digits", normalize="dataset"), "cpu")
    pixels = data.unlabelled.x.double()  # (N, 1, 8, 8): every example of the train split, none of val or test
    assert data.normalization["mean"] == pytest.approx([pixels.mean().item()], rel=1e-12)
    assert data.normalization["std"] == pytest.approx([pixels.std(correction=0).item()], rel=1e-12)
    uint8 = torch.randint(0, 256, (50, 3, 4, 4), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    stats = normalization_stats("dataset", uint8)
    reference = uint8.double().div(255).transpose(0, 1).reshape(3, -1)
    np.testing.assert_allclose(stats["mean"], reference.mean(1).numpy(), rtol=1e-12)
    np.testing.assert_allclose(stats["std"], reference.std(1, correction=0).numpy(), rtol=1e-12)
    assert normalization_stats("dataset", uint8[:, :, :2]) == normalization_stats("dataset", uint8[:, :, :2].clone())


@pytest.mark.parametrize("setting, images, message", [
    ("imagenet", torch.zeros(2, 1, 4, 4, dtype=torch.uint8), r"imagenet's statistics are for RGB images; these "
                                                              r"have 1 channel"),
    ({"mean": [0.5, 0.5], "std": [0.2, 0.2]}, torch.zeros(2, 3, 4, 4, dtype=torch.uint8),
     r"2 values for mean and std, but the images have 3 channels"),
    ("dataset", torch.full((2, 1, 4, 4), 7, dtype=torch.uint8), r"channel 0 has the same value in every pixel"),
])
def test_statistics_that_do_not_fit_the_images_are_a_user_error_naming_data_normalize(setting, images, message):
    with pytest.raises(UserError, match=rf"^data.normalize: .*{message}"):
        normalization_stats(setting, images)


def test_none_is_the_default_and_imagenet_gives_the_standard_numbers():
    assert build_data(data_cfg(), "cpu").normalization is None
    assert normalization_stats("imagenet", torch.zeros(1, 3, 2, 2)) == IMAGENET
    assert IMAGENET == {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


@pytest.mark.parametrize("value, message", [
    ("zscore", "data.normalize"),
    ({"mean": [0.5], "std": [0.0]}, "data.normalize"),
    ({"mean": [0.5, 0.5], "std": [0.2]}, "data.normalize"),
])
def test_config_refuses_a_bad_normalize_with_exit_2(tmp_path, ptft, value, message):
    config = write_yaml(tmp_path / "c.yaml", tiny_pretrain_config(tmp_path / "run", data={"normalize": value}))
    result = ptft("config", config)
    assert result.code == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_pretrain_records_dataset_statistics_and_finetune_and_evaluate_reuse_them(tmp_path, ptft):
    pre = write_yaml(tmp_path / "pre.yaml", tiny_pretrain_config(tmp_path / "pre", data={"normalize": "dataset"}))
    assert ptft("pretrain", pre).code == 0
    recorded = json.loads((tmp_path / "pre" / "checkpoints" / "last" / "meta.json").read_text())["inputs"]["normalize"]
    assert set(recorded) == {"mean", "std"} and 0 < recorded["mean"][0] < 1 and recorded["std"][0] > 0
    fine = write_yaml(tmp_path / "fine.yaml", tiny_finetune_config(tmp_path / "fine", str(tmp_path / "pre"),
                                                                    data={"normalize": "dataset"}))
    best = ptft("finetune", fine).last_line
    assert json.loads((Path(best) / "meta.json").read_text())["inputs"]["normalize"] == recorded
    # evaluate feeds the model the recorded numbers, whatever the config now says.
    as_trained = json.loads(ptft("evaluate", best).last_line)
    overridden = json.loads(ptft("evaluate", best, "data.normalize=none").last_line)
    assert as_trained["loss"] == overridden["loss"] and as_trained["accuracy"] == overridden["accuracy"]


def test_normalization_changes_what_the_model_sees(tmp_path, ptft):
    # The same seeds with and without: only the inputs differ, so the losses do.
    losses = {}
    for setting in ("none", "imagenet_like"):
        data = {"normalize": {"mean": [0.3], "std": [0.2]}} if setting != "none" else {}
        config = write_yaml(tmp_path / f"{setting}.yaml", tiny_pretrain_config(tmp_path / setting, data=data))
        assert ptft("pretrain", config).code == 0
        records = [json.loads(line) for line in (tmp_path / setting / "metrics.jsonl").read_text().splitlines()]
        losses[setting] = [r["train/loss"] for r in records if "train/loss" in r]
        meta = json.loads((tmp_path / setting / "checkpoints" / "last" / "meta.json").read_text())
        assert meta["inputs"]["normalize"] == (data["normalize"] if data else None)
    assert losses["none"] != losses["imagenet_like"]


def test_an_rgb_folder_normalised_with_imagenet_statistics_trains(tmp_path, ptft):
    root = tmp_path / "images"
    for name, colour in [("red", (200, 0, 0)), ("blue", (0, 0, 200))]:
        for i in range(6):
            (root / "train" / name).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), tuple(c + i for c in colour)).save(root / "train" / name / f"{i}.png")
    data = {"name": "imagefolder", "root": str(root), "batch_size": 4, "val_fraction": 0.25, "normalize": "imagenet"}
    config = write_yaml(tmp_path / "pre.yaml", tiny_pretrain_config(tmp_path / "pre", data=data))
    result = ptft("pretrain", config)
    assert result.code == 0, result.stderr
    meta = json.loads((tmp_path / "pre" / "checkpoints" / "last" / "meta.json").read_text())
    assert meta["inputs"]["normalize"] == IMAGENET
