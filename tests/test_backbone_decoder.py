"""Reconstruction objectives with library backbones: encoder + ptft's feature-map decoder, or a refusal
naming the objectives that fit."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import write_colour_images, write_yaml
from ptft import checkpoint as ckpt
from ptft.errors import UserError
from ptft.models import build_model
from ptft.models.decoders import FeatureMapAutoEncoder, FeatureMapDecoder
from ptft.objectives import OBJECTIVES


# Fixed weights and inputs in every test (conftest.seeded_torch).
pytestmark = pytest.mark.usefixtures("seeded_torch")


def model_cfg(name: str, **options) -> SimpleNamespace:
    return SimpleNamespace(name=name, options=options)


@pytest.mark.parametrize("map_size, output_shape",
                         [((1, 1), (3, 32, 32)), ((4, 4), (1, 28, 28)), ((2, 3), (3, 16, 20))])
def test_decoder_upsamples_a_feature_map_to_the_input_shape(map_size, output_shape):
    decoder = FeatureMapDecoder(64, map_size, output_shape)
    assert decoder(torch.rand(2, 64, *map_size)).shape == (2, *output_shape)


@pytest.mark.parametrize("objective", ["reconstruction", "denoising", "masked"])
def test_resnet18_with_a_reconstruction_objective_is_an_autoencoder_of_its_feature_map(objective):
    model = build_model(model_cfg("torchvision:resnet18", small_input=True), (3, 16, 16), 3, objective)
    assert isinstance(model, FeatureMapAutoEncoder)
    assert {key.split(".")[0] for key in model.state_dict()} == {"encoder", "decoder"}
    x = torch.rand(2, 3, 16, 16)
    assert model.encoder(x, feature_map=True).shape == (2, 512, 2, 2)  # layer4, before pooling
    assert model.encoder(x).shape == (2, 512)  # the pooled features, for probes and finetuning
    loss, _ = OBJECTIVES.get(objective)(model, (3, 16, 16))(model, x, None, torch.Generator().manual_seed(0))
    loss.backward()
    assert model.encoder.conv1.weight.grad.abs().sum() > 0 and model.decoder.blocks[0].weight.grad is not None
    assert not model.leaves_parameters_unused  # every encoder parameter reaches layer4: DDP needs no search
    # Other objectives keep the classifier.
    assert not isinstance(build_model(model_cfg("torchvision:resnet18", small_input=True), (3, 16, 16), 3,
                                      "contrastive"), FeatureMapAutoEncoder)


def test_encoder_parameters_after_the_feature_map_are_declared_unused_for_ddp():
    # MobileNetV3's classifier keeps a Linear and Hardswish in the encoder, after the pooling.
    model = build_model(model_cfg("torchvision:mobilenet_v3_small", small_input=True), (3, 16, 16), 3, "masked")
    assert model.leaves_parameters_unused and model(torch.rand(2, 3, 16, 16)).shape == (2, 3, 16, 16)


def test_a_timm_vit_with_a_reconstruction_objective_is_refused_pointing_to_mae():
    pytest.importorskip("timm")
    with pytest.raises(UserError, match="objective.name: 'denoising'.*transformer.*pretrain it with mae"):
        build_model(model_cfg("timm:vit_tiny_patch16_224"), (3, 32, 32), 3, "denoising")


@pytest.fixture(scope="module")
def colour_images(tmp_path_factory) -> Path:
    """RGB 16x16 images of 3 classes: 8 train, 2 test per class."""
    return write_colour_images(tmp_path_factory.mktemp("images"), 16, 8, 2)


def stage_config(run_dir: Path, images: Path, **sections) -> dict:
    cfg = {
        "run": {"dir": str(run_dir), "seed": 0},
        "data": {"name": "imagefolder", "root": str(images), "batch_size": 8, "val_fraction": 0.25},
        "model": {"name": "torchvision:resnet18", "small_input": True},
        "optim": {"name": "sgd", "lr": 0.01, "momentum": 0.0},
        "train": {"max_steps": 2, "eval_every_steps": 2, "log_every_steps": 1, "device": "cpu"},
        "checkpoint": {"keep_last": 1},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    return cfg


def test_resnet18_pretrains_with_reconstruction_then_its_encoder_finetunes(tmp_path, ptft, colour_images):
    pre = stage_config(tmp_path / "pre", colour_images, objective={"name": "reconstruction"})
    pretrained = ptft("pretrain", write_yaml(tmp_path / "pre.yaml", pre))
    assert pretrained.code == 0, pretrained.stderr
    meta = ckpt.read_meta(ckpt.resolve_checkpoint(Path(pretrained.last_line)))
    assert meta["model"]["kind"] == "autoencoder"
    evaluated = ptft("evaluate", tmp_path / "pre")
    assert evaluated.code == 0, evaluated.stderr
    metrics = json.loads(evaluated.stdout)  # evaluate rebuilds the same autoencoder
    assert metrics["mse"] > 0 and metrics["psnr"] > 0

    ft = stage_config(tmp_path / "ft", colour_images, init={"checkpoint": str(tmp_path / "pre")},
                      data={"labels_per_class": 4})
    finetuned = ptft("finetune", write_yaml(tmp_path / "ft.yaml", ft))
    assert finetuned.code == 0, finetuned.stderr
    report = ckpt.read_meta(ckpt.resolve_checkpoint(Path(finetuned.last_line)))["parent"]["report"]
    assert report["counts"]["missing"] == 2 and report["counts"]["shape_mismatched"] == 0  # the new head
    assert report["counts"]["loaded"] == len([k for k in meta_keys(tmp_path / "pre") if k.startswith("encoder.")])
    assert report["unexpected"] and all(name.startswith("decoder.") for name in report["unexpected"])


def meta_keys(run_dir: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(ckpt.resolve_checkpoint(run_dir) / "model.safetensors", "pt") as weights:
        return list(weights.keys())


@pytest.mark.parametrize("arch, fitting", [("vit_b_16", "mae (masked patches in token space), contrastive"),
                                           ("swin_t", "pretrain it with contrastive, vicreg or supervised")])
def test_reconstruction_of_a_torchvision_transformer_exits_2_naming_the_objectives_that_fit(tmp_path, ptft, arch,
                                                                                            fitting):
    cfg = {"model": {"name": f"torchvision:{arch}"}, "objective": {"name": "reconstruction"},
           "train": {"max_steps": 1}}
    result = ptft("config", write_yaml(tmp_path / "c.yaml", cfg))  # refused before torch is needed
    assert result.code == 2 and "Traceback" not in result.stderr
    assert "objective.name" in result.stderr and f"torchvision:{arch}" in result.stderr and fitting in result.stderr
