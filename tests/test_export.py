"""`ptft export`: ONNX / TorchScript / pt2 files that reproduce PyTorch, with their preprocessing beside them."""

from __future__ import annotations

import json
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from conftest import tiny_finetune_config, write_yaml

MODELS = {  # model -> data and training overrides that keep its run to a few seconds
    "tiny_mlp_classifier": ({}, {"max_steps": 5}),
    "tiny_conv_classifier": ({}, {"max_steps": 5}),
    "resnet18_classifier": ({"batch_size": 16}, {"max_steps": 2}),
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """model name -> run directory, each trained once, on first use."""
    from ptft.config import config_from_dict
    from ptft.stages import train

    root, runs = tmp_path_factory.mktemp("export"), {}

    def get(model: str) -> Path:
        if model not in runs:
            data, steps = MODELS[model]
            cfg = tiny_finetune_config(root / model, None, model={"name": model}, data=data,
                                       train={**steps, "eval_every_steps": steps["max_steps"]})
            train(config_from_dict(cfg, "test"), "finetune")
            runs[model] = root / model
        return runs[model]

    return get


def reference(run: Path) -> torch.nn.Module:
    """The run's model in PyTorch, loaded without ptft.inference."""
    from ptft import checkpoint
    from ptft.config import config_from_dict
    from ptft.models import build_model

    step_dir = checkpoint.resolve_checkpoint(run)
    model = build_model(config_from_dict(checkpoint.read_meta(step_dir)["config"], "meta.json").model, (1, 8, 8), 10)
    model.load_state_dict(checkpoint.load_weights(step_dir))
    return model.eval()


def run_exported(fmt: str, path: Path, x: torch.Tensor) -> torch.Tensor:
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(str(path))(x)
    return torch.export.load(str(path)).module()(x)


@pytest.mark.parametrize("model, fmt", [
    ("tiny_mlp_classifier", "onnx"), ("tiny_mlp_classifier", "torchscript"), ("tiny_mlp_classifier", "pt2"),
    ("tiny_conv_classifier", "onnx"), ("resnet18_classifier", "onnx"),
])
def test_exported_file_reproduces_pytorch_within_tolerance(model, fmt, trained, tmp_path, ptft):
    run, out = trained(model), tmp_path / f"model.{fmt}"
    result = ptft("export", run, "--format", fmt, "--out", out)
    assert result.code == 0, result.stderr
    assert result.stdout.strip() == str(out)
    assert "max |exported - pytorch|" in result.stderr and "359 images of the digits test split" in result.stderr
    sidecar = json.loads((tmp_path / f"model.{fmt}.json").read_text())
    check = sidecar["verification"]
    assert check["within_tolerance"] and check["images"] == 359 and check["top1_agreement"] == 1.0
    assert check["max_abs_diff"] <= check["atol"]
    assert sidecar["input"]["shape"] == [None, 1, 8, 8] and sidecar["output"]["shape"] == [None, 10]
    assert sidecar["class_names"] == [str(d) for d in range(10)]
    assert sidecar["preprocessing"]["scale"] == "round(pixel / 255 * 16) / 16"
    assert sidecar["preprocessing"]["resize_rule"] == "crop"  # data.resize, as predict applies it to files
    assert (sidecar["opset"] is not None) == (fmt == "onnx")
    # Any batch size: checked here on 3 and 1 images, independently of ptft's own check.
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = reference(run)(x)
    for batch in (x, x[:1]):
        torch.testing.assert_close(run_exported(fmt, out, batch), expected[:len(batch)], atol=1e-4, rtol=1e-4)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"model.{fmt}", f"model.{fmt}.json"]


def test_onnx_without_the_extra_exits_2_naming_the_pip_install(trained, tmp_path, ptft, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    result = ptft("export", trained("tiny_mlp_classifier"), "--format", "onnx", "--out", tmp_path / "m.onnx")
    assert result.code == 2 and "pip install 'ptft[export]'" in result.stderr and "onnxruntime" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_an_operator_onnx_cannot_represent_exits_2_naming_it_and_leaves_no_file(tmp_path, ptft, monkeypatch):
    (tmp_path / "bessel_models.py").write_text(textwrap.dedent('''
        import torch
        from ptft.models import compose, mlp

        class BesselClassifier(compose.Classifier):
            def forward(self, x):
                return super().forward(torch.special.bessel_j0(x))  # no ONNX operator for this one

        def bessel_classifier(input_shape, num_classes):
            encoder = mlp.mlp_encoder(input_shape, [8], 8, "relu", 0.0, False)
            return BesselClassifier(encoder, torch.nn.Linear(8, num_classes))
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PTFT_TRUSTED_IMPORTS", "bessel_models")  # a checkpoint naming it may import it
    config = write_yaml(tmp_path / "ft.yaml", tiny_finetune_config(
        tmp_path / "run", None, model={"name": "bessel_models:bessel_classifier"}, objective={"name": "supervised"},
        train={"max_steps": 2}))
    assert ptft("finetune", config).code == 0
    (tmp_path / "out").mkdir()
    result = ptft("export", tmp_path / "run", "--format", "onnx", "--out", tmp_path / "out" / "m.onnx")
    assert result.code == 2 and "Traceback" not in result.stderr
    assert "bessel_models:bessel_classifier" in result.stderr and "bessel_j0" in result.stderr
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("case", ["unknown format", "not a checkpoint", "missing folder"])
def test_bad_arguments_exit_2_naming_them(case, trained, tmp_path, ptft):
    run = trained("tiny_mlp_classifier")
    args, named = {
        "unknown format": ([run, "--format", "tflite", "--out", tmp_path / "m.tflite"], "tflite"),
        "not a checkpoint": ([tmp_path, "--format", "pt2", "--out", tmp_path / "m.pt2"], str(tmp_path)),
        "missing folder": ([run, "--format", "pt2", "--out", tmp_path / "no" / "m.pt2"], "no/m.pt2"),
    }[case]
    result = ptft("export", *args)
    assert result.code == 2 and named in result.stderr and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_normalized_model_carries_its_normalization_inside_the_exported_file(tmp_path, ptft):
    from ptft import checkpoint

    run = tmp_path / "normalized"
    config = write_yaml(tmp_path / "ft.yaml", tiny_finetune_config(run, None, data={"normalize": "dataset"},
                                                                   train={"max_steps": 5}))
    assert ptft("finetune", config).code == 0
    result = ptft("export", run, "--format", "pt2", "--out", tmp_path / "m.pt2")
    assert result.code == 0, result.stderr
    stats = checkpoint.load_meta(run).inputs["normalize"]
    sidecar = json.loads((tmp_path / "m.pt2.json").read_text())["preprocessing"]
    assert sidecar["normalization_inside_model"] == stats and sidecar["mean"] == [0.0] and sidecar["std"] == [1.0]
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    mean, std = (torch.tensor(stats[key]).view(1, -1, 1, 1) for key in ("mean", "std"))
    with torch.inference_mode():
        expected = reference(run)((x - mean) / std)  # the plain model, normalised by hand
    torch.testing.assert_close(run_exported("pt2", tmp_path / "m.pt2", x), expected, atol=1e-5, rtol=1e-5)
