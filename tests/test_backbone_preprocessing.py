"""What library weights expect of their inputs: recorded in meta.json, a warning when data.normalize forgets it,
and the numbers the model was trained with reused by evaluate and predict."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from conftest import write_colour_images, write_yaml
from ptft import checkpoint as ckpt
from ptft.data.normalize import IMAGENET
from ptft.lineage import InitSource, normalization_warning

WARNING = "data.normalize: imagenet"


# Fixed weights and inputs in every test (conftest.seeded_torch).
pytestmark = pytest.mark.usefixtures("seeded_torch")


@pytest.fixture(scope="module")
def colour_images(tmp_path_factory) -> Path:
    """RGB 32x32 images of 3 classes: 8 train, 2 test per class."""
    return write_colour_images(tmp_path_factory.mktemp("images"), 32, 8, 2)


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory) -> Path:
    """A torchvision hub file, as torchvision's own constructor writes its state dict."""
    path = tmp_path_factory.mktemp("hub") / "resnet18-f37072fd.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return path


def finetune(tmp_path: Path, ptft, images: Path, init: Path, name: str, **data):
    cfg = {
        "run": {"dir": str(tmp_path / name), "seed": 0},
        "data": {"name": "imagefolder", "root": str(images), "batch_size": 8, "val_fraction": 0.25, **data},
        "model": {"name": "torchvision:resnet18"},
        "init": {"checkpoint": str(init)},
        "optim": {"name": "sgd", "lr": 0.01, "momentum": 0.0},
        "train": {"max_steps": 2, "eval_every_steps": 2, "device": "cpu"},
        "checkpoint": {"keep_last": 1},
    }
    result = ptft("finetune", write_yaml(tmp_path / f"{name}.yaml", cfg))
    assert result.code == 0, result.stderr
    return result, ckpt.read_meta(ckpt.resolve_checkpoint(Path(result.last_line)))


def test_torchvision_file_records_what_its_weights_expect_and_warns_once_without_normalize(tmp_path, ptft,
                                                                                          colour_images, resnet18_file):
    result, meta = finetune(tmp_path, ptft, colour_images, resnet18_file, "plain")
    assert result.stderr.count(WARNING) == 1
    warning = next(line for line in result.stderr.splitlines() if WARNING in line)
    assert str(resnet18_file) in warning and "data.normalize is none" in warning and "224 px" in warning
    expects = meta["parent"]["expects"]
    assert expects["mean"] == IMAGENET["mean"] and expects["std"] == IMAGENET["std"]
    assert expects["crop_size"] == [224] and expects["source"].startswith("torchvision ResNet18_Weights")
    assert meta["inputs"]["normalize"] is None  # what the model was trained with: nothing

    # A finetune of that run inherits the record; its weights learnt unnormalised inputs, so no warning.
    again, child = finetune(tmp_path, ptft, colour_images, tmp_path / "plain", "child")
    assert WARNING not in again.stderr and child["parent"]["expects"] == expects


def test_with_imagenet_normalize_evaluate_and_predict_reuse_the_recorded_numbers(tmp_path, ptft, colour_images,
                                                                                resnet18_file):
    result, meta = finetune(tmp_path, ptft, colour_images, resnet18_file, "imagenet", normalize="imagenet")
    assert WARNING not in result.stderr
    assert meta["inputs"]["normalize"] == IMAGENET and meta["parent"]["expects"]["mean"] == IMAGENET["mean"]
    run = tmp_path / "imagenet"
    recorded = ptft("evaluate", run, "--out", tmp_path / "recorded.json")
    overridden = ptft("evaluate", run, "data.normalize=none", "--out", tmp_path / "overridden.json")
    assert recorded.code == overridden.code == 0, recorded.stderr + overridden.stderr
    assert json.loads(recorded.stdout)["loss"] == json.loads(overridden.stdout)["loss"]  # the recorded numbers

    image = colour_images / "test" / "red" / "0.png"
    predicted = ptft("predict", run, image, "--top-k", "3")
    assert predicted.code == 0, predicted.stderr
    probabilities = {entry["name"]: entry["prob"] for entry in json.loads(predicted.stdout)["top_k"]}
    from ptft.inference.target import load_target

    target = load_target(str(run), "predict", "cpu")
    pixels = torch.from_numpy(np.array(Image.open(image))).permute(2, 0, 1).float().div(255).unsqueeze(0)
    mean, std = (torch.tensor(IMAGENET[key]).view(1, 3, 1, 1) for key in ("mean", "std"))
    with torch.no_grad():
        expected = target.model.head(target.model.encoder._net((pixels - mean) / std)).softmax(1)[0]
    for index, name in enumerate(target.prep.class_names):
        assert probabilities[name] == pytest.approx(expected[index].item(), abs=1e-5)
    assert target.prep.describe()["pretrained_weights_expected"]["crop_size"] == [224]


def test_weights_expecting_other_statistics_name_them_in_the_warning():
    source = InitSource("model.safetensors", Path("model.safetensors"), None)
    model = torch.nn.Module()
    model.encoder = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
    expects = {"source": "timm pretrained_cfg of vit_tiny_patch16_224", "mean": [0.5] * 3, "std": [0.5] * 3,
               "input_size": [3, 224, 224]}
    warning = normalization_warning("none", expects, source, model)
    assert "data.normalize: {mean: [0.5, 0.5, 0.5], std: [0.5, 0.5, 0.5]}" in warning and "224 px" in warning
    assert normalization_warning("dataset", expects, source, model) is None  # the user chose
    model.encoder = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3))
    assert normalization_warning("none", expects, source, model) is None  # grey: nothing per channel to suggest
