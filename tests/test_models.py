"""The MODELS registry: every builder's shapes, encoder key identity, layer depths, options, imports."""

from __future__ import annotations

import inspect
import subprocess
import sys
import textwrap
import typing

import pytest
import torch

from conftest import REPO
from ptft.errors import UserError
from ptft.models import MODELS, summarize
from ptft.models.compose import AutoEncoder, Classifier, EncoderOnly
from ptft.models.conv import stage_sizes

KIND_TYPES = {"autoencoder": AutoEncoder, "classifier": Classifier, "encoder": EncoderOnly}
RESNETS = [name for name in MODELS.names() if name.startswith("resnet")]
SMALL_MODELS = [name for name in MODELS.names() if name not in RESNETS]
NUM_CLASSES = 10


# Fixed weights and inputs in every test (conftest.seeded_torch).
pytestmark = pytest.mark.usefixtures("seeded_torch")


def build(name: str, input_shape=(1, 8, 8), **options):
    return MODELS.get(name)(input_shape, NUM_CLASSES, **options)


def check_forward(name: str, input_shape) -> None:
    model = build(name, input_shape).eval()
    x = torch.rand(2, *input_shape)
    with torch.no_grad():
        out = model(x)
    kind = MODELS.meta(name)["kind"]
    assert isinstance(model, KIND_TYPES[kind])
    if kind == "autoencoder":
        assert out.shape == x.shape
        assert 0.0 <= out.min() and out.max() <= 1.0
    elif kind == "classifier":
        assert out.shape == (2, NUM_CLASSES)
    else:
        assert out.shape == (2, model.encoder.out_features)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("input_shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32), (2, 7, 9)], ids=str)
@pytest.mark.parametrize("name", SMALL_MODELS)
def test_small_models_forward_shapes(name, input_shape):
    check_forward(name, input_shape)


@pytest.mark.parametrize("input_shape", [(1, 28, 28), (3, 32, 32)], ids=str)
@pytest.mark.parametrize("name", RESNETS)
def test_resnets_forward_shapes(name, input_shape):
    check_forward(name, input_shape)


def test_every_model_has_a_kind_and_a_description():
    built_in = {f"{family}_{kind}" for family in ("mlp", "conv") for kind in KIND_TYPES}
    built_in |= {"resnet18_classifier", "resnet34_classifier", "resnet50_classifier", "resnet18_encoder"}
    built_in |= {f"tiny_{family}_{kind}" for family in ("mlp", "conv") for kind in ("autoencoder", "classifier")}
    assert built_in <= set(MODELS.names()) and len(built_in) == 14
    for name, description in MODELS.describe().items():
        assert MODELS.meta(name)["kind"] in KIND_TYPES, name
        assert description and "\n" not in description, name


def test_options_are_keyword_only_with_builtin_annotations_and_defaults():
    plain = (int, float, bool, str, list[int])
    for name in MODELS.names():
        builder = MODELS.get(name)
        hints = typing.get_type_hints(builder)  # what config.py needs to resolve, without torch
        params = list(inspect.signature(builder).parameters.values())
        assert [p.name for p in params[:2]] == ["input_shape", "num_classes"], name
        for param in params[2:]:
            assert param.kind is inspect.Parameter.KEYWORD_ONLY, (name, param.name)
            assert param.default is not inspect.Parameter.empty, (name, param.name)
            hint = hints[param.name]
            assert hint in plain or typing.get_origin(hint) is typing.Literal, (name, param.name, hint)


@pytest.mark.parametrize("name", ["torchvision:convnext_tiny", "timm:vit_tiny_patch16_224"])
def test_library_family_builders_follow_the_same_option_rules(name):
    if name.startswith("timm:"):
        pytest.importorskip("timm")
    builder = MODELS.get(name)
    hints = typing.get_type_hints(builder)
    params = list(inspect.signature(builder).parameters.values())
    assert [p.name for p in params[:2]] == ["input_shape", "num_classes"]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not inspect.Parameter.empty
               for p in params[2:])
    assert hints["head_dropout"] is float or typing.get_origin(hints["head_dropout"]) is typing.Annotated
    assert MODELS.meta(name)["kind"] == "classifier"


def test_autoencoder_and_classifier_of_a_family_share_option_names():
    def options(name):
        return set(list(inspect.signature(MODELS.get(name)).parameters)[2:])

    for family in ("mlp", "conv", "tiny_mlp", "tiny_conv"):
        assert options(f"{family}_classifier") == options(f"{family}_autoencoder") | {"head_dropout"}


@pytest.mark.parametrize("family, options", [
    ("mlp", {"hidden": [16, 8], "latent": 4, "batch_norm": True}),
    ("conv", {"channels": [4, 8], "latent": 6}),
])
def test_classifier_loads_autoencoder_encoder_without_renaming(family, options):
    ae = build(f"{family}_autoencoder", **options)
    clf = build(f"{family}_classifier", **options)
    ae_keys = {k: v.shape for k, v in ae.state_dict().items() if k.startswith("encoder.")}
    clf_keys = {k: v.shape for k, v in clf.state_dict().items() if k.startswith("encoder.")}
    assert ae_keys == clf_keys
    clf.encoder.load_state_dict(ae.encoder.state_dict())
    for key, value in ae.encoder.state_dict().items():
        assert torch.equal(clf.encoder.state_dict()[key], value)
    # The whole autoencoder checkpoint minus the decoder loads; only the fresh head is missing.
    result = clf.load_state_dict({k: v for k, v in ae.state_dict().items() if k.startswith("encoder.")}, strict=False)
    assert sorted(result.missing_keys) == ["head.bias", "head.weight"] and not result.unexpected_keys
    assert {k.split(".")[0] for k in ae.state_dict()} == {"encoder", "decoder"}
    assert {k.split(".")[0] for k in clf.state_dict()} == {"encoder", "head"}


@pytest.mark.parametrize("name", MODELS.names())
def test_layer_of_is_monotone_and_in_range(name):
    encoder = build(name, (3, 32, 32)).encoder
    depths = [encoder.layer_of(param_name) for param_name, _ in encoder.named_parameters()]
    assert depths == sorted(depths)
    assert depths[0] == 0 and depths[-1] == encoder.num_layers - 1


def test_layer_of_names_each_depth():
    mlp = build("mlp_encoder", hidden=[16, 8], latent=4).encoder
    assert mlp.num_layers == 3
    names = ("blocks.0.linear.weight", "blocks.1.linear.bias", "to_latent.weight")
    assert [mlp.layer_of(n) for n in names] == [0, 1, 2]
    conv = build("conv_encoder", channels=[4, 8, 8]).encoder
    assert conv.num_layers == 4 and conv.layer_of("blocks.2.norm.weight") == 2 and conv.layer_of("to_latent.bias") == 3
    with pytest.raises(ValueError):
        mlp.layer_of("head.weight")


def test_resnet18_small_input_keeps_torchvision_names():
    model = build("resnet18_classifier", (1, 28, 28))
    encoder = model.encoder
    assert encoder.conv1.weight.shape == (64, 1, 3, 3) and isinstance(encoder.maxpool, torch.nn.Identity)
    assert encoder.out_features == 512 and model.head.in_features == 512
    keys = model.state_dict().keys()
    assert {"encoder.conv1.weight", "encoder.bn1.running_mean", "encoder.layer4.1.conv2.weight", "head.weight"} <= keys
    assert not any(k.startswith("encoder.fc.") for k in keys)
    assert [encoder.layer_of(n) for n in ("conv1.weight", "bn1.bias", "layer1.0.conv1.weight", "layer4.1.bn2.weight")] \
        == [0, 0, 1, 4]
    assert encoder.num_layers == 5


def test_resnet_without_small_input_uses_the_imagenet_stem():
    encoder = build("resnet18_encoder", (1, 28, 28), small_input=False).encoder
    assert encoder.conv1.weight.shape == (64, 1, 7, 7) and isinstance(encoder.maxpool, torch.nn.MaxPool2d)
    with torch.no_grad():
        assert encoder.eval()(torch.rand(1, 1, 28, 28)).shape == (1, 512)


@pytest.mark.parametrize("name", ["tiny_mlp_autoencoder", "tiny_mlp_classifier", "tiny_conv_autoencoder",
                                  "tiny_conv_classifier"])
def test_tiny_variants_are_tiny(name):
    count = sum(p.numel() for p in build(name).parameters())
    assert 100 < count < 5_000


def test_default_sizes_written_down():
    assert sum(p.numel() for p in build("tiny_mlp_classifier").parameters()) == 682
    assert sum(p.numel() for p in build("tiny_conv_autoencoder").parameters()) == 1233
    assert build("mlp_classifier").encoder.out_features == 64
    assert build("conv_encoder").encoder.out_features == 128


def test_conv_stage_sizes_round_up():
    assert stage_sizes(28, 28, 2) == [(28, 28), (14, 14), (7, 7)]
    assert stage_sizes(8, 7, 3) == [(8, 7), (4, 4), (2, 2), (1, 1)]


def test_summarize_lists_top_level_children():
    model = build("tiny_mlp_classifier")
    rows = summarize(model)
    assert rows == [("encoder", 592), ("head", 90)]
    assert sum(count for _, count in rows) == sum(p.numel() for p in model.parameters())


def test_batch_norm_dropout_and_activation_options_take_effect():
    plain = build("mlp_encoder", hidden=[16], latent=4).encoder
    rich = build("mlp_encoder", hidden=[16], latent=4, batch_norm=True, dropout=0.5, activation="gelu").encoder
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in plain.modules())
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in rich.modules())
    assert any(isinstance(m, torch.nn.Dropout) and m.p == 0.5 for m in rich.modules())
    assert any(isinstance(m, torch.nn.GELU) for m in rich.modules())
    conv = build("conv_encoder", channels=[4], batch_norm=False, activation="silu").encoder
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in conv.modules())
    assert any(isinstance(m, torch.nn.SiLU) for m in conv.modules())


def test_head_dropout_acts_only_in_training():
    model = build("tiny_mlp_classifier", head_dropout=0.5)
    x = torch.rand(4, 1, 8, 8)
    model.eval()
    expected = model.head(model.encoder(x))
    assert torch.equal(model(x), expected)
    model.train()
    assert not torch.allclose(model(x), model(x))


@pytest.mark.parametrize("name, options, key", [
    ("mlp_autoencoder", {"hidden": []}, "model.hidden"),
    ("mlp_classifier", {"hidden": [8, 0]}, "model.hidden"),
    ("mlp_encoder", {"latent": 0}, "model.latent"),
    ("mlp_autoencoder", {"dropout": 1.0}, "model.dropout"),
    ("tiny_mlp_classifier", {"head_dropout": -0.1}, "model.head_dropout"),
    ("mlp_autoencoder", {"activation": "tanh"}, "model.activation"),
    ("conv_autoencoder", {"channels": []}, "model.channels"),
    ("conv_classifier", {"latent": -1}, "model.latent"),
    ("resnet18_classifier", {"head_dropout": 1.5}, "model.head_dropout"),
])
def test_bad_option_values_name_the_key(name, options, key):
    with pytest.raises(UserError, match=key):
        build(name, **options)


def test_unknown_model_suggests_close_names():
    with pytest.raises(UserError, match="mlp_autoencoder"):
        MODELS.get("mlp_autoencodr")


def test_import_path_builder_resolves(tmp_path, monkeypatch):
    (tmp_path / "ptft_test_user_models.py").write_text(textwrap.dedent("""
        import torch
        from ptft.models.compose import EncoderOnly
        from ptft.models.mlp import MLPEncoder

        def wide(input_shape, num_classes, *, latent: int = 5):
            return EncoderOnly(MLPEncoder(input_shape[0] * input_shape[1] * input_shape[2], [7], latent))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        builder = MODELS.get("ptft_test_user_models:wide")
        assert builder((1, 8, 8), NUM_CLASSES, latent=3)(torch.rand(2, 1, 8, 8)).shape == (2, 3)
        with pytest.raises(UserError, match="no callable 'narrow'"):
            MODELS.get("ptft_test_user_models:narrow")
    finally:
        sys.modules.pop("ptft_test_user_models", None)


def test_importing_the_registry_imports_no_torch():
    code = ("import sys, typing, ptft.models as m; "
            "[(m.MODELS.meta(n), typing.get_type_hints(m.MODELS.get(n))) for n in m.MODELS.names()]; "
            "m.MODELS.describe(); print(sorted(k for k in ('torch', 'torchvision') if k in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_resolving_a_torchvision_name_imports_no_torch():
    code = ("import sys, inspect, ptft.models as m; b = m.MODELS.get('torchvision:swin_t'); inspect.signature(b); "
            "m.MODELS.describe(); print(sorted(k for k in ('torch', 'torchvision') if k in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
