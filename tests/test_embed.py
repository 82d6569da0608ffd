"""`ptft embed`: encoder features of every input, from pretrained and finetuned checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import tiny_finetune_config, tiny_pretrain_config


def train(stage: str, cfg: dict) -> Path:
    from ptft.config import config_from_dict
    from ptft.stages import train as train_stage

    return train_stage(config_from_dict(cfg, "test"), stage)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A tiny autoencoder and a classifier finetuned from its encoder (so the encoders differ)."""
    root = tmp_path_factory.mktemp("embed")
    pretrained = train("pretrain", tiny_pretrain_config(root / "ae"))
    train("finetune", tiny_finetune_config(root / "ft", str(pretrained)))
    return {"pretrain": root / "ae", "finetune": root / "ft"}


@pytest.fixture(scope="module")
def digits_pngs(tmp_path_factory) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """The first 40 images of digits' test split as PNGs in class folders, with the split's tensors."""
    from PIL import Image

    from ptft.data import DATASETS

    data = DATASETS.get("digits")(Path("unused"), False)
    folder = tmp_path_factory.mktemp("digits") / "images"
    for i in range(40):
        path = folder / data.class_names[int(data.test_y[i])] / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((data.test_x[i, 0].numpy() * 255).round().astype(np.uint8), "L").save(path)
    return folder, data.test_x[:40], data.test_y[:40]


def encoder_of(run: Path) -> torch.nn.Module:
    """The run's encoder, built and loaded without ptft.inference."""
    from ptft import checkpoint
    from ptft.config import config_from_dict
    from ptft.models import build_model

    step_dir = checkpoint.resolve_checkpoint(run)
    model = build_model(config_from_dict(checkpoint.read_meta(step_dir)["config"], "meta.json").model, (1, 8, 8), 10)
    model.load_state_dict(checkpoint.load_weights(step_dir))
    return model.eval().encoder


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_embed_features_equal_the_encoders_output_on_the_same_images(stage, runs, digits_pngs, tmp_path, ptft):
    folder, x, y = digits_pngs
    out = tmp_path / "features.safetensors"
    result = ptft("embed", runs[stage], folder, "--out", out)
    assert result.code == 0, result.stderr
    assert result.last_line == str(out)
    tensors = load_file(out)
    with safe_open(out, "pt") as f:
        paths = json.loads(f.metadata()["paths"])
    order = [int(Path(p).stem) for p in paths]  # folders come sorted by class, then file name
    assert sorted(order) == list(range(40))
    with torch.inference_mode():
        expected = encoder_of(runs[stage])(x[order])
    assert tensors["features"].dtype == torch.float32 and tensors["features"].shape == expected.shape
    torch.testing.assert_close(tensors["features"], expected, atol=1e-6, rtol=1e-5)
    assert tensors["labels"].tolist() == y[order].tolist()


def test_npy_with_a_sidecar_in_float16_for_a_split(runs, tmp_path, ptft):
    out = tmp_path / "val.npy"
    result = ptft("embed", runs["pretrain"], "--split", "val", "--out", out, "--dtype", "float16")
    assert result.code == 0, result.stderr
    features = np.load(out)
    facts = json.loads((tmp_path / "val.json").read_text())
    assert features.dtype == np.float16 and features.shape == (len(facts["paths"]), 8) == tuple(facts["shape"])
    assert facts["paths"][:2] == ["val:0", "val:1"] and len(facts["labels"]) == len(features)
    assert facts["class_names"] == [str(d) for d in range(10)] and facts["errors"] == {}


def test_an_unreadable_input_has_no_row_is_listed_and_exits_2(runs, digits_pngs, tmp_path, ptft):
    folder, _, _ = digits_pngs
    good = sorted(folder.rglob("*.png"))[:3]
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    out = tmp_path / "f.safetensors"
    result = ptft("embed", runs["finetune"], good[0], bad, good[1], "--out", out)
    assert result.code == 2 and "1 input(s) could not be read" in result.stderr
    with safe_open(out, "pt") as f:
        meta = f.metadata()
        assert f.get_tensor("features").shape == (2, 8)
    assert json.loads(meta["paths"]) == [str(good[0]), str(good[1])]
    assert list(json.loads(meta["errors"])) == [str(bad)]


@pytest.mark.parametrize("args, named", [
    (["--out", "features.csv"], "--out"),
    (["--out", "f.npy", "--dtype", "int8"], "--dtype"),
    (["--out", "missing_folder/f.npy"], "missing_folder"),
], ids=["unknown suffix", "unknown dtype", "missing folder"])
def test_bad_options_exit_2_naming_them(args, named, runs, digits_pngs, tmp_path, ptft, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = ptft("embed", runs["pretrain"], digits_pngs[0], *args)
    assert result.code == 2 and named in result.stderr and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_contrastive_encoder_embeds_and_predict_points_to_embed(tmp_path, ptft):
    run = tmp_path / "contrastive"
    train("pretrain", tiny_pretrain_config(run, model={"name": "mlp_encoder", "hidden": [8], "latent": 8},
                                           objective={"name": "contrastive"},
                                           train={"max_steps": 4, "eval_every_steps": 4}))
    predicted = ptft("predict", run, "--split", "test")
    assert predicted.code == 2 and "ptft embed" in predicted.stderr and predicted.stdout == ""
    out = tmp_path / "test.npy"
    embedded = ptft("embed", run, "--split", "test", "--out", out)  # its projector's weights are left out
    assert embedded.code == 0, embedded.stderr
    assert np.load(out).shape == (359, 8)
