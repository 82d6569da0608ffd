"""torchvision:<architecture> and timm:<name> backbones: split, shrink, layer depths, their weight files, the CLI."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torchvision
import yaml
from safetensors.torch import save_file
from torch import nn

from conftest import REPO, write_colour_images, write_yaml
from ptft import checkpoint as ckpt
from ptft.errors import CheckpointError, UserError
from ptft.models import MODELS
from ptft.models.backbone_names import TORCHVISION_FAMILIES, torchvision_names
from ptft.objectives import OBJECTIVES
from ptft.finetuning import param_groups
from ptft.weights import match_into, read_state_dict

timm = pytest.importorskip("timm")

NUM_CLASSES = 3
TIMM_VIT = "vit_tiny_patch16_224"
# One architecture per family: (name, the key prefix of torchvision's classifier Linear).
FAMILY_SAMPLES = [("resnet18", "fc."), ("regnet_x_400mf", "fc."), ("convnext_tiny", "classifier.2."),
                  ("efficientnet_b0", "classifier.1."), ("mobilenet_v3_small", "classifier.3."),
                  ("mnasnet0_5", "classifier.1."), ("shufflenet_v2_x0_5", "fc."), ("densenet121", "classifier."),
                  ("vit_b_16", "heads.head."), ("swin_t", "head.")]


# Fixed weights and inputs in every test (conftest.seeded_torch).
pytestmark = pytest.mark.usefixtures("seeded_torch")


def build(name: str, input_shape=(1, 32, 32), num_classes: int = NUM_CLASSES, **options):
    return MODELS.get(name)(input_shape, num_classes, **options)


def library_state(arch: str, **kwargs) -> dict[str, torch.Tensor]:
    """A state dict as torchvision's own constructor makes it (what its hub files hold)."""
    return torchvision.models.get_model(arch, weights=None, **kwargs).state_dict()


def library_keys(arch: str) -> set[str]:
    """The keys of torchvision's `arch`, built on the meta device (no memory, no init) where its init allows."""
    if arch.startswith("regnet"):  # RegNet's init reads tensor values
        return set(library_state(arch))
    with torch.device("meta"):
        return set(torchvision.models.get_model(arch, weights=None).state_dict())


def features_of(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval().encoder(x)


# ---- names and the registry --------------------------------------------------------------------

def test_written_down_torchvision_architectures_are_torchvisions_own():
    known = set(torchvision.models.list_models(module=torchvision.models))
    assert set(torchvision_names()) <= known
    left_out = known - set(torchvision_names())
    assert left_out == {"alexnet", "googlenet", "inception_v3", "maxvit_t", "squeezenet1_0", "squeezenet1_1"}
    assert len(TORCHVISION_FAMILIES) == 11


def test_family_names_are_classifiers_with_keyword_only_builtin_options():
    for name in ("torchvision:convnext_tiny", f"timm:{TIMM_VIT}"):
        assert MODELS.meta(name) == {"kind": "classifier"}
        assert name in MODELS and not MODELS.is_import_path(name)
    tv = MODELS.get("torchvision:resnet18")
    assert MODELS.get("torchvision:resnet18") is tv  # resolved once
    with pytest.raises(UserError, match="model.head_dropout"):
        tv((1, 32, 32), NUM_CLASSES, head_dropout=1.5)


def test_unknown_architecture_exits_2_with_close_matches(tmp_path, ptft):
    config = write_yaml(tmp_path / "c.yaml", {"model": {"name": "torchvision:convnxt_tiny"}, "train": {"max_steps": 1}})
    result = ptft("config", config)
    assert result.code == 2 and "Traceback" not in result.stderr
    assert "model.name" in result.stderr and "torchvision:convnext_tiny" in result.stderr
    typo = ptft("config", write_yaml(tmp_path / "t.yaml", {"model": {"name": "timm:vit_tiny_patch16_2244"},
                                                           "train": {"max_steps": 1}}))
    assert typo.code == 2 and "timm:vit_tiny_patch16_224" in typo.stderr


def test_missing_timm_extra_exits_2_naming_it(tmp_path):
    config = write_yaml(tmp_path / "c.yaml", {"model": {"name": f"timm:{TIMM_VIT}"}, "train": {"max_steps": 1}})
    # A fresh interpreter where `import timm` fails as if it were not installed.
    code = f"import sys; sys.modules['timm'] = None; sys.argv = ['ptft', 'config', {str(config)!r}]; " \
           "from ptft.cli import main; main()"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "model.name" in result.stderr and "pip install 'ptft[timm]'" in result.stderr


def test_models_lists_each_family_as_one_line(ptft):
    result = ptft("models")
    assert result.code == 0
    assert "torchvision:<architecture>" in result.stderr and "timm:<name>" in result.stderr
    assert "convnext_tiny" in result.stderr  # the family line says how a member is written


def test_validating_a_torchvision_name_imports_no_torch():
    code = ("import sys; from ptft.config import config_from_dict; "
            "cfg = config_from_dict({'model': {'name': 'torchvision:vit_b_16', 'head_dropout': 0.1}, "
            "'train': {'max_steps': 1}}, 'c.yaml'); "
            "print(cfg.model.options, 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "{'small_input': False, 'head_dropout': 0.1} False"


# ---- building: split, channels, small inputs, depths ---------------------------------------------

@pytest.mark.parametrize("arch, library_head", FAMILY_SAMPLES, ids=[a for a, _ in FAMILY_SAMPLES])
def test_each_family_splits_into_encoder_and_linear_head_for_grey_32px(arch, library_head):
    model = build(f"torchvision:{arch}")
    encoder = model.encoder
    x = torch.rand(2, 1, 32, 32)
    assert features_of(model, x).shape == (2, encoder.out_features)
    assert model(x).shape == (2, NUM_CLASSES)
    assert isinstance(model.head, nn.Linear) and model.head.in_features == encoder.out_features
    assert encoder.library_head == library_head
    # The encoder's keys are torchvision's, minus the classifier Linear; the stem takes 1 channel.
    keys = library_keys(arch) - {library_head + "weight", library_head + "bias"}
    assert {k[len("encoder."):] for k in model.state_dict() if k.startswith("encoder.")} == keys
    assert encoder.get_parameter(encoder.stem_weight).shape[1] == 1
    depths = [encoder.layer_of(name) for name, _ in encoder.named_parameters()]
    assert depths == sorted(depths) and depths[0] == 0 and depths[-1] == encoder.num_layers - 1
    assert set(depths) == set(range(encoder.num_layers))


def test_the_dropout_before_the_classifier_is_replaced_by_head_dropout():
    model = build("torchvision:mobilenet_v3_small", head_dropout=0.3)
    # torchvision's classifier is Linear, Hardswish, Dropout, Linear: the first two stay in the encoder.
    kinds = [type(m).__name__ for m in model.encoder.classifier]
    assert kinds == ["Linear", "Hardswish", "Identity", "Identity"] and model.encoder.out_features == 1024
    x = torch.rand(2, 1, 32, 32)
    model.train()
    assert torch.equal(model.encoder(x), model.encoder(x))  # no dropout left in the features
    assert model.head_dropout == 0.3


@pytest.mark.parametrize("arch, stride", [("efficientnet_b0", 1), ("regnet_x_400mf", 1), ("convnext_tiny", 2)])
def test_small_input_lowers_the_stem_stride_and_the_file_still_loads_whole(arch, stride):
    model = build(f"torchvision:{arch}", (3, 32, 32), small_input=True)
    stem = model.encoder.get_submodule(model.encoder.stem_weight.rsplit(".", 1)[0])
    assert stem.stride == (stride, stride)
    report = match_into(model, library_state(arch), load_head=False, strict=True)
    assert report.shape_mismatched == [] and report.missing == [] and len(report.skipped_head) == 2


def test_resnet_small_input_is_ptfts_stem_and_the_files_stem_names_the_option():
    model = build("torchvision:resnet18", small_input=True)
    assert model.encoder.conv1.weight.shape == (64, 1, 3, 3) and isinstance(model.encoder.maxpool, nn.Identity)
    with pytest.raises(CheckpointError, match="model.small_input=false"):
        match_into(model, library_state("resnet18"), load_head=False, strict=True, source="r18.pth")


@pytest.mark.parametrize("arch, message", [("vit_b_16", "data's image size"), ("swin_t", "pads its windows")])
def test_small_input_is_refused_where_the_architecture_has_none(arch, message):
    with pytest.raises(UserError, match=f"model.small_input: torchvision:{arch}.*{message}"):
        build(f"torchvision:{arch}", small_input=True)


def test_vit_takes_the_data_size_and_refuses_one_its_patches_do_not_divide():
    assert build("torchvision:vit_b_32", (3, 64, 64)).encoder.image_size == 64
    with pytest.raises(UserError, match="data.image_size"):
        build("torchvision:vit_b_16", (1, 8, 8))


def test_pretrained_preprocessing_is_recorded_from_the_libraries_metadata():
    tv = build("torchvision:resnet18").encoder.preprocessing
    assert tv["mean"] == [0.485, 0.456, 0.406] and tv["std"] == [0.229, 0.224, 0.225] and tv["crop_size"] == [224]
    tm = build(f"timm:{TIMM_VIT}").encoder.preprocessing
    assert tm["mean"] == [0.5, 0.5, 0.5] and tm["input_size"] == [3, 224, 224] and tm["interpolation"] == "bicubic"


def test_timm_model_uses_timms_in_chans_grid_and_pre_logits():
    model = build(f"timm:{TIMM_VIT}")
    encoder = model.encoder
    assert encoder.patch_embed.proj.weight.shape == (192, 1, 16, 16)  # timm's in_chans
    assert encoder.pos_embed.shape == (1, 1 + 2 * 2, 192)  # a 2x2 patch grid for 32 px
    x = torch.rand(2, 1, 32, 32)
    expected = encoder.forward_head(encoder.forward_features(x), pre_logits=True)
    assert torch.allclose(features_of(model, x), expected) and encoder.out_features == 192
    assert encoder.library_head == "head." and encoder.num_layers == 13


# ---- layer decay -------------------------------------------------------------------------------

def decayed_lrs(model, decay: float = 0.5, lr: float = 1.0) -> dict[str, float]:
    plan = SimpleNamespace(layer_decay=decay, head_lr=None)  # a FinetunePlan's lr settings
    groups = param_groups(model, nn.Module(), plan, lr)
    return {name: group["lr"] for group in groups for name, p in model.named_parameters()
            if any(p is q for q in group["params"])}


def test_layer_decay_of_a_conv_net_follows_the_formula():
    lrs = decayed_lrs(build("torchvision:resnet18"))
    # 5 layers: the stem is layer 0, layer<k> is k; lr * 0.5 ** (5 - layer), the head at lr.
    assert lrs["encoder.conv1.weight"] == 0.5 ** 5 and lrs["encoder.bn1.bias"] == 0.5 ** 5
    assert lrs["encoder.layer1.0.conv1.weight"] == 0.5 ** 4 and lrs["encoder.layer4.1.bn2.weight"] == 0.5 ** 1
    assert lrs["head.weight"] == 1.0


def test_layer_decay_of_a_vit_follows_the_formula():
    lrs = decayed_lrs(build("torchvision:vit_b_16"))
    # 14 layers: patch embedding, class token and position embedding 0, block i is i + 1, the final norm 13.
    for name in ("encoder.class_token", "encoder.conv_proj.weight", "encoder.encoder.pos_embedding"):
        assert lrs[name] == 0.5 ** 14
    assert lrs["encoder.encoder.layers.encoder_layer_0.ln_1.weight"] == 0.5 ** 13
    assert lrs["encoder.encoder.layers.encoder_layer_11.mlp.3.bias"] == 0.5 ** 2
    assert lrs["encoder.encoder.ln.weight"] == 0.5 ** 1 and lrs["head.bias"] == 1.0
    # timm's own grouping (group_matcher): 13 layers, the final norm with the last block.
    timm_lrs = decayed_lrs(build(f"timm:{TIMM_VIT}"))
    assert timm_lrs["encoder.patch_embed.proj.weight"] == timm_lrs["encoder.cls_token"] == 0.5 ** 13
    assert timm_lrs["encoder.blocks.0.attn.qkv.weight"] == 0.5 ** 12
    assert timm_lrs["encoder.blocks.11.mlp.fc2.bias"] == timm_lrs["encoder.norm.weight"] == 0.5


# ---- library weight files ----------------------------------------------------------------------

def test_torchvision_file_with_and_without_classifier_maps_to_encoder_and_head(tmp_path):
    state = library_state("mobilenet_v3_small")  # classifier: Linear, Hardswish, Dropout, Linear (the head)
    torch.save(state, tmp_path / "mobilenet_v3_small-047dcff4.pth")
    torch.save({k: v for k, v in state.items() if not k.startswith("classifier.3.")}, tmp_path / "headless.pth")
    model = build("torchvision:mobilenet_v3_small", (3, 32, 32))
    report = match_into(model, read_state_dict(tmp_path / "mobilenet_v3_small-047dcff4.pth"), load_head=False,
                        strict=True)
    assert report.skipped_head == ["head.weight", "head.bias"]
    assert report.missing == report.unexpected == report.adapted == report.shape_mismatched == []
    assert torch.equal(model.encoder.classifier[0].weight, state["classifier.0.weight"])  # part of the encoder
    headless = match_into(build("torchvision:mobilenet_v3_small", (3, 32, 32)),
                          read_state_dict(tmp_path / "headless.pth"), load_head=False, strict=True)
    assert headless.missing == ["head.weight", "head.bias"] and headless.skipped_head == []
    # Same classes and init.load_head: the library's classifier becomes the head.
    same = build("torchvision:mobilenet_v3_small", (3, 32, 32), num_classes=1000)
    match_into(same, read_state_dict(tmp_path / "mobilenet_v3_small-047dcff4.pth"), load_head=True, strict=True)
    assert torch.equal(same.head.weight, state["classifier.3.weight"])


def test_old_format_torchvision_files_load(tmp_path):
    # Before torchvision 0.13 a ViT's MLP was linear_1 / linear_2, batch norm files lacked the step counter,
    # and torch wrote the legacy (non-zip) serialization.
    state = library_state("vit_b_16", image_size=32)
    old = {k.replace(".mlp.0.", ".mlp.linear_1.").replace(".mlp.3.", ".mlp.linear_2."): v for k, v in state.items()}
    assert any(".mlp.linear_1." in k for k in old)
    torch.save(old, tmp_path / "vit_b_16-c867db91.pth", _use_new_zipfile_serialization=False)
    model = build("torchvision:vit_b_16", (3, 32, 32))
    report = match_into(model, read_state_dict(tmp_path / "vit_b_16-c867db91.pth"), load_head=False, strict=True)
    assert report.unexpected == report.missing == report.shape_mismatched == []
    first_mlp = state["encoder.layers.encoder_layer_0.mlp.0.weight"]
    assert torch.equal(model.encoder.encoder.layers[0].mlp[0].weight, first_mlp)
    resnet = {k: v for k, v in library_state("resnet18").items() if not k.endswith("num_batches_tracked")}
    torch.save(resnet, tmp_path / "resnet18-5c106cde.pth", _use_new_zipfile_serialization=False)
    report = match_into(build("torchvision:resnet18", (3, 32, 32)), read_state_dict(tmp_path / "resnet18-5c106cde.pth"),
                        load_head=False, strict=True)
    assert report.missing == [] and report.counts()["loaded"] == len(resnet) - 2


def test_old_densenet_file_names_are_renamed_as_torchvision_renames_them():
    state = library_state("densenet121")
    # Hub files from before torchvision 0.3 spell norm1 as norm.1 (torchvision's densenet loader renames them)
    # and predate batch norm's step counter.
    old = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))(\d)\.", r"\1.\2.", k): v for k, v in state.items()
           if not k.endswith("num_batches_tracked")}
    assert "features.denseblock1.denselayer1.norm.1.weight" in old
    report = match_into(build("torchvision:densenet121", (3, 32, 32)), old, load_head=False, strict=True)
    assert report.unexpected == report.missing == [] and len(report.skipped_head) == 2


def test_vit_file_of_another_image_size_has_its_position_embedding_resampled():
    state = library_state("vit_b_16")  # 224 px: 1 + 14 * 14 positions
    model = build("torchvision:vit_b_16", (1, 32, 32))  # 1 + 2 * 2 positions, grey
    report = match_into(model, state, load_head=False, strict=True)
    assert sorted(report.adapted) == ["encoder.conv_proj.weight", "encoder.encoder.pos_embedding"]
    loaded = model.encoder.encoder.pos_embedding
    assert loaded.shape == (1, 5, 768)
    assert torch.equal(loaded[:, 0], state["encoder.pos_embedding"][:, 0])  # the class token's position is kept
    grid = state["encoder.pos_embedding"][0, 1:].reshape(14, 14, 768)
    assert torch.allclose(loaded[0, 1], grid[:7, :7].mean((0, 1)), atol=0.05)  # a smooth downsampling


@pytest.mark.parametrize("filename, headless", [("model.safetensors", False), ("pytorch_model.bin", False),
                                                ("model.safetensors", True)])
def test_timm_files_load_with_and_without_classifier(tmp_path, filename, headless):
    net = timm.create_model(TIMM_VIT, num_classes=0 if headless else 1000)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    path = tmp_path / filename
    save_file(state, path) if filename.endswith(".safetensors") else torch.save(state, path)
    model = build(f"timm:{TIMM_VIT}", (3, 32, 32))
    report = match_into(model, read_state_dict(path), load_head=False, strict=True)
    assert report.adapted == ["encoder.pos_embed"] and report.unexpected == report.shape_mismatched == []
    assert report.skipped_head == ([] if headless else ["head.weight", "head.bias"])
    assert torch.equal(model.encoder.blocks[3].attn.qkv.weight, state["blocks.3.attn.qkv.weight"])


# ---- through the CLI: pretrain, save, finetune from the run and from a library file -----------

@pytest.fixture(scope="module")
def colour_images(tmp_path_factory) -> Path:
    """RGB 32x32 images of 3 classes: 12 train, 3 test per class."""
    return write_colour_images(tmp_path_factory.mktemp("images"), 32, 12, 3)


def stage_config(run_dir: Path, images: Path, model: dict, **sections) -> dict:
    cfg = {
        "run": {"dir": str(run_dir), "seed": 0},
        "data": {"name": "imagefolder", "root": str(images), "batch_size": 8, "val_fraction": 0.25},
        "model": model,
        "optim": {"name": "sgd", "lr": 0.01, "momentum": 0.0},  # no optimizer state: small checkpoints
        "train": {"max_steps": 2, "eval_every_steps": 2, "log_every_steps": 1, "device": "cpu"},
        "checkpoint": {"keep_last": 1},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    return cfg


def pretrain_then_finetune(tmp_path, ptft, images: Path, model: dict, library_file: Path, objective: str):
    """Pretrain 2 steps, finetune from that run and from `library_file`; return the finetune metas."""
    pre = write_yaml(tmp_path / "pre.yaml", stage_config(tmp_path / "pre", images, model,
                                                         objective={"name": objective}))
    pretrained = ptft("pretrain", pre)
    assert pretrained.code == 0, pretrained.stderr
    metas = []
    for name, init in (("from_run", tmp_path / "pre"), ("from_file", library_file)):
        cfg = stage_config(tmp_path / name, images, model, init={"checkpoint": str(init)},
                           data={"labels_per_class": 4}, finetune={"layer_decay": 0.8})
        result = ptft("finetune", write_yaml(tmp_path / f"{name}.yaml", cfg))
        assert result.code == 0, result.stderr
        assert "loaded" in result.stderr  # the key report
        metas.append(ckpt.read_meta(ckpt.resolve_checkpoint(Path(result.last_line))))
    assert Path(pretrained.last_line).is_dir()
    return metas


def check_report(meta: dict, **counts) -> None:
    report = meta["parent"]["report"]
    assert {key: report["counts"][key] for key in counts} == counts, report["counts"]


def check_contrastive_parent(meta: dict) -> None:
    """A contrastive (or mae) run's weights: everything loads; only the objective's own parts are left behind."""
    check_report(meta, missing=0, shape_mismatched=0, adapted=0)
    assert meta["parent"]["report"]["unexpected"] and all(
        name.startswith("objective.") for name in meta["parent"]["report"]["unexpected"])


def test_resnet18_pretrains_and_finetunes_from_its_run_and_a_torchvision_file(tmp_path, ptft, colour_images):
    state = library_state("resnet18")
    torch.save(state, tmp_path / "resnet18-f37072fd.pth")
    from_run, from_file = pretrain_then_finetune(tmp_path, ptft, colour_images, {"name": "torchvision:resnet18"},
                                                 tmp_path / "resnet18-f37072fd.pth", "contrastive")
    check_contrastive_parent(from_run)
    check_report(from_file, loaded=len(state) - 2, skipped_head=2, missing=0, unexpected=0)
    assert from_file["model"] == {"name": "torchvision:resnet18", "kind": "classifier",
                                  "options": {"small_input": False, "head_dropout": 0.0}}


@pytest.mark.slow  # about 30 s of CPU: 28M parameters, three runs
def test_convnext_tiny_pretrains_and_finetunes_from_its_run_and_a_torchvision_file(tmp_path, ptft, colour_images):
    state = library_state("convnext_tiny")
    torch.save(state, tmp_path / "convnext_tiny-983f1562.pth")
    model = {"name": "torchvision:convnext_tiny", "small_input": True}
    from_run, from_file = pretrain_then_finetune(tmp_path, ptft, colour_images, model,
                                                 tmp_path / "convnext_tiny-983f1562.pth", "supervised")
    check_report(from_run, skipped_head=2, missing=0, unexpected=0, shape_mismatched=0)
    check_report(from_file, loaded=len(state) - 2, skipped_head=2, missing=0, unexpected=0)


def test_timm_vit_pretrains_and_finetunes_from_its_run_and_a_timm_safetensors_file(tmp_path, ptft, colour_images):
    state = timm.create_model(TIMM_VIT).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    from_run, from_file = pretrain_then_finetune(tmp_path, ptft, colour_images, {"name": f"timm:{TIMM_VIT}"},
                                                 tmp_path / "model.safetensors", "contrastive")
    check_contrastive_parent(from_run)
    check_report(from_file, loaded=len(state) - 3, adapted=1, skipped_head=2, missing=0)  # pos_embed: 224 -> 32 px


@pytest.mark.slow  # about 30 s of CPU: 86M parameters, three runs
def test_vit_b_16_pretrains_and_finetunes_from_its_run_and_a_torchvision_file(tmp_path, ptft, colour_images):
    state = library_state("vit_b_16")
    torch.save(state, tmp_path / "vit_b_16-c867db91.pth")
    from_run, from_file = pretrain_then_finetune(tmp_path, ptft, colour_images, {"name": "torchvision:vit_b_16"},
                                                 tmp_path / "vit_b_16-c867db91.pth", "supervised")
    check_report(from_run, missing=0, unexpected=0, shape_mismatched=0)
    check_report(from_file, loaded=len(state) - 3, adapted=1, skipped_head=2, missing=0)


@pytest.mark.slow  # about 10 s of CPU; tests/test_cli_e2e.py validates the file in the default suite
def test_shipped_resnet50_lpft_config_finetunes_a_torchvision_file(tmp_path, ptft, colour_images):
    state = library_state("resnet50")
    torch.save(state, tmp_path / "resnet50.pth")
    result = ptft("finetune", REPO / "configs" / "resnet50_lpft.yaml", f"run.dir={tmp_path / 'run'}",
                  f"data.root={colour_images}", "data.image_size=32", "data.labels_per_class=4",
                  "data.val_labels_per_class=2", "data.batch_size=8",
                  f"init.checkpoint={tmp_path / 'resnet50.pth'}", "train.max_steps=2", "train.eval_every_steps=2",
                  "finetune.unfreeze_at_step=1", "schedule.warmup_steps=0", "train.device=cpu")
    assert result.code == 0, result.stderr
    meta = ckpt.read_meta(ckpt.resolve_checkpoint(Path(result.last_line)))
    check_report(meta, loaded=len(state) - 2, skipped_head=2, missing=0, unexpected=0, shape_mismatched=0)
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["model"]["name"] == "torchvision:resnet50"
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2


# ---- grad checkpointing -------------------------------------------------------------------------

def saved_tensors_and_grads(model, x: torch.Tensor) -> tuple[int, dict[str, torch.Tensor]]:
    """How many tensors autograd kept for the backward pass, and the gradients it then computed."""
    saved = []

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same stochastic-depth draws in every pass
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(x).square().sum()
    loss.backward()
    return sum(saved), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("name", ["torchvision:convnext_tiny", f"timm:{TIMM_VIT}"])
def test_grad_checkpointing_keeps_fewer_activations_and_the_same_gradients(name):
    model = build(name).train()
    x = torch.rand(2, 1, 32, 32)
    kept, grads = saved_tensors_and_grads(model, x)
    model.encoder.set_grad_checkpointing(True)
    kept_checkpointed, grads_checkpointed = saved_tensors_and_grads(model, x)
    assert kept_checkpointed < kept / 2
    assert all(torch.equal(grads[n], grads_checkpointed[n]) for n in grads)
    model.encoder.set_grad_checkpointing(False)
    assert saved_tensors_and_grads(model, x)[0] == kept


def test_grad_checkpointing_is_refused_for_timm_networks_with_batch_norm():
    # torchvision networks are checkpointed by ptft, which keeps batch norm's statistics (test_backbone_memory.py).
    with pytest.raises(UserError, match="batch norm"):
        build("timm:resnet18").encoder.set_grad_checkpointing(True)


# ---- MAE: masked patches in token space --------------------------------------------------------

def test_mae_masks_the_same_patches_for_the_same_generator_and_patchify_is_row_major():
    from ptft.objectives.mae import patchify, random_keep

    kept, masked = random_keep(3, 16, 4, torch.Generator().manual_seed(5))
    again, _ = random_keep(3, 16, 4, torch.Generator().manual_seed(5))
    assert torch.equal(kept, again) and kept.shape == (3, 4)
    assert masked.sum(1).tolist() == [12, 12, 12] and not masked.gather(1, kept).any()
    x = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4)  # 2 channels, 2x2 patches of 2 px
    patches = patchify(x, 2)
    assert patches.shape == (1, 4, 8)
    assert patches[0, 1].tolist() == [2, 18, 3, 19, 6, 22, 7, 23]  # top-right patch, channels last per pixel


def test_mae_encodes_only_the_kept_patches_and_learns_from_the_masked_ones():
    model = build(f"timm:{TIMM_VIT}", (1, 64, 64))  # 16 patches, 4 kept at mask_ratio 0.75
    objective = OBJECTIVES.get("mae")(model, (1, 64, 64), decoder_dim=32, decoder_heads=2)
    seen = []
    model.encoder.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["keep"].shape),
                                            with_kwargs=True)
    x = torch.rand(2, 1, 64, 64)
    loss, _ = objective(model, x, None, torch.Generator().manual_seed(0))
    assert seen == [(2, 4)] and loss.item() > 0
    loss.backward()
    assert model.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0 and objective.mask_token.grad is not None
    again, _ = objective(model, x, None, torch.Generator().manual_seed(0))
    assert torch.equal(again, loss)  # all randomness from the generator


def test_mae_is_refused_for_an_encoder_without_patch_tokens(tmp_path, ptft, colour_images):
    cfg = stage_config(tmp_path / "run", colour_images, {"name": "torchvision:resnet18"}, objective={"name": "mae"})
    result = ptft("pretrain", write_yaml(tmp_path / "c.yaml", cfg))
    assert result.code == 2 and "Traceback" not in result.stderr
    assert "objective 'mae'" in result.stderr and "ViT" in result.stderr


def test_mae_pretrains_a_timm_vit_that_then_finetunes(tmp_path, ptft, colour_images):
    pre = stage_config(tmp_path / "mae", colour_images, {"name": f"timm:{TIMM_VIT}"},
                       objective={"name": "mae", "decoder_dim": 32, "decoder_heads": 2})
    pretrained = ptft("pretrain", write_yaml(tmp_path / "pre.yaml", pre))
    assert pretrained.code == 0, pretrained.stderr
    records = [json.loads(line) for line in (tmp_path / "mae" / "metrics.jsonl").read_text().splitlines()]
    assert any("val/loss" in r for r in records)
    cfg = stage_config(tmp_path / "ft", colour_images, {"name": f"timm:{TIMM_VIT}"},
                       init={"checkpoint": str(tmp_path / "mae")}, data={"labels_per_class": 4})
    finetuned = ptft("finetune", write_yaml(tmp_path / "ft.yaml", cfg))
    assert finetuned.code == 0, finetuned.stderr
    check_contrastive_parent(ckpt.read_meta(ckpt.resolve_checkpoint(Path(finetuned.last_line))))


def test_ptft_resnet18_classifier_weights_load_into_torchvision_resnet18():
    # ptft's own ResNet encoder keeps torchvision's names, so its runs start a torchvision:resnet18 as they are.
    source = build("resnet18_classifier").state_dict()
    model = build("torchvision:resnet18", small_input=True)
    report = match_into(model, source, load_head=True, strict=True)
    assert report.counts()["loaded"] == len(source) and report.missing == report.unexpected == []
    assert torch.equal(model.encoder.layer3[0].conv1.weight, source["encoder.layer3.0.conv1.weight"])
