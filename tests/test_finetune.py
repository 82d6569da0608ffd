"""Finetuning end to end through the CLI: every weights source, exact key reports, what trains.

Sources are a tiny_mlp_autoencoder's weights (batch norm on, so running statistics are part of
the handoff) written as users have them, and a plain torchvision resnet18 state dict. Each
report is read back from the run's meta.json; frozen weights are compared bitwise.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import REPO, tiny_finetune_config, tiny_pretrain_config, write_yaml
from ptft.config import FinetuneSection, load_config
from ptft.errors import UserError
from ptft.models import MODELS
from ptft.finetuning import FinetunePlan, FreezeSchedule, finetune_plan, leaves_parameters_unused, param_groups

MODEL = {"name": "tiny_mlp_classifier", "batch_norm": True}
ENCODER_KEYS = ["encoder.blocks.0.linear.weight", "encoder.blocks.0.norm.weight", "encoder.blocks.0.norm.bias",
                "encoder.blocks.0.norm.running_mean", "encoder.blocks.0.norm.running_var",
                "encoder.blocks.0.norm.num_batches_tracked", "encoder.to_latent.weight", "encoder.to_latent.bias"]
DECODER_KEYS = [k.replace("encoder.", "decoder.").replace("to_latent", "to_output") for k in ENCODER_KEYS]
HEAD_KEYS = ["head.weight", "head.bias"]
# An autoencoder's weights into a classifier: the encoder loads, the decoder is left over, the head is new.
AUTOENCODER_REPORT = {"counts": {"loaded": 8, "adapted": 0, "skipped_head": 0, "missing": 2, "unexpected": 8,
                                 "shape_mismatched": 0},
                      "loaded": ENCODER_KEYS, "adapted": [], "skipped_head": [], "missing": HEAD_KEYS,
                      "unexpected": DECODER_KEYS, "shape_mismatched": []}
# torchvision resnet18: 122 keys; conv1 (3 input channels) and fc (1000 classes) need care.
RESNET18_KEYS = 122
RESNET18_BATCH_NORMS = 20


def tiny_weights(name: str, num_classes: int = 10) -> dict[str, torch.Tensor]:
    """A tiny model's weights, batch-norm statistics moved off their defaults by one batch."""
    with torch.random.fork_rng():
        torch.manual_seed(1)
        model = MODELS.get(name)((1, 8, 8), num_classes, batch_norm=True)
        model.train()(torch.rand(16, 1, 8, 8))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def finetune(ptft, tmp_path: Path, name: str, source, *overrides: str, init: dict | None = None, **sections):
    """`ptft finetune` on tiny digits from `source`; sections update tiny_finetune_config's."""
    sections = {"model": MODEL, "train": {"max_steps": 2, "eval_every_steps": 2}, **sections}
    cfg = tiny_finetune_config(tmp_path / "runs" / name, str(source), **sections)
    cfg["init"].update(init or {})
    return ptft("finetune", write_yaml(tmp_path / f"{name}.yaml", cfg), *overrides)


def weights_at(run_dir: Path, step: int | str = "last") -> dict[str, torch.Tensor]:
    name = step if isinstance(step, str) else f"step-{step:08d}"
    return load_file(run_dir / "checkpoints" / name / "model.safetensors")


def meta_of(result) -> dict:
    assert result.code == 0, result.stderr
    return json.loads((Path(result.last_line) / "meta.json").read_text())


def in_model_order(report: dict) -> dict:
    """The report with its unexpected keys in module order (a .safetensors file stores them sorted)."""
    depth = {name: i for i, name in enumerate(DECODER_KEYS)}
    return {**report, "unexpected": sorted(report["unexpected"], key=depth.__getitem__)}


def assert_same(a: dict, b: dict, keys) -> None:
    for key in keys:
        assert torch.equal(a[key], b[key]), f"{key} changed"


def assert_changed(a: dict, b: dict, keys) -> None:
    for key in keys:
        assert not torch.equal(a[key], b[key]), f"{key} did not change"


# ---- sources --------------------------------------------------------------------------------------

def _prefixed(state: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in state.items()}


def _write_source(kind: str, weights: dict, folder: Path) -> tuple[Path, dict]:
    """Save ptft-named `weights` as `kind` of file; return the path and the prefix_map it needs."""
    if kind == "safetensors":
        save_file(weights, folder / "model.safetensors")
        return folder / "model.safetensors", {}
    if kind == "prefix_map":
        renamed = {k.replace("encoder.", "backbone.", 1): v for k, v in weights.items()}
        torch.save(renamed, folder / "backbone.pth")
        return folder / "backbone.pth", {"backbone.": "encoder."}
    files = {
        "pt": ("weights.pt", weights),
        "bin": ("pytorch_model.bin", weights),
        "lightning": ("epoch=3-step=60.ckpt", {"state_dict": _prefixed(weights, "model."), "epoch": 3,
                                               "global_step": 60, "pytorch-lightning_version": "2.4.0",
                                               "hyper_parameters": {"lr": 0.01}}),
        "ddp": ("ddp.pth", _prefixed(weights, "module.")),
        "compiled": ("compiled.pt", _prefixed(weights, "_orig_mod.")),
    }
    filename, content = files[kind]
    torch.save(content, folder / filename)
    return folder / filename, {}


@pytest.mark.parametrize("kind", ["pt", "bin", "safetensors", "lightning", "ddp", "compiled", "prefix_map"])
def test_every_file_format_loads_the_encoder_with_an_exact_report(kind, tmp_path, ptft):
    source = tiny_weights("tiny_mlp_autoencoder")
    path, prefix_map = _write_source(kind, source, tmp_path)
    # A linear probe leaves the encoder as loaded: the final weights show the load itself.
    result = finetune(ptft, tmp_path, "ft", path, init={"prefix_map": prefix_map}, finetune={"mode": "linear_probe"})
    parent = meta_of(result)["parent"]
    assert in_model_order(parent["report"]) == AUTOENCODER_REPORT
    assert parent["hash"] == hashlib.sha256(path.read_bytes()).hexdigest() and parent["lineage"] == []
    assert_same(weights_at(tmp_path / "runs" / "ft"), source, ENCODER_KEYS)
    # The same report as a table on stderr, for people.
    assert re.search(r"loaded\W+8\W", result.stderr) and re.search(r"unexpected\W+8\W", result.stderr)


@pytest.mark.parametrize("target", ["run_dir", "step_dir"])
def test_ptft_run_and_step_directories_load_with_lineage(target, tmp_path, ptft):
    pretrain = tiny_pretrain_config(tmp_path / "runs" / "ae", model={"batch_norm": True},
                                    train={"max_steps": 2, "eval_every_steps": 2})
    assert ptft("pretrain", write_yaml(tmp_path / "ae.yaml", pretrain)).code == 0
    step_dir = (tmp_path / "runs" / "ae" / "checkpoints" / "step-00000002").resolve()
    source = tmp_path / "runs" / "ae" if target == "run_dir" else step_dir
    result = finetune(ptft, tmp_path, "ft", source, finetune={"mode": "linear_probe"})
    parent = meta_of(result)["parent"]
    assert in_model_order(parent["report"]) == AUTOENCODER_REPORT
    assert parent["path"] == str(step_dir) and parent["lineage"][-1]["stage"] == "pretrain"
    assert_same(weights_at(tmp_path / "runs" / "ft"), load_file(step_dir / "model.safetensors"), ENCODER_KEYS)


def test_missing_encoder_keys_are_fatal_unless_strict_is_false(tmp_path, ptft):
    partial = {k: v for k, v in tiny_weights("tiny_mlp_autoencoder").items() if "to_latent" not in k}
    torch.save(partial, tmp_path / "partial.pt")
    refused = finetune(ptft, tmp_path, "ft", tmp_path / "partial.pt")
    message = " ".join(refused.stderr.split())
    assert refused.code == 2 and "init.strict is true but 2 encoder.* key(s)" in message
    assert "encoder.to_latent.weight (missing)" in message and "init.strict=false" in message
    loaded = finetune(ptft, tmp_path, "ft", tmp_path / "partial.pt", "init.strict=false")
    report = meta_of(loaded)["parent"]["report"]
    assert report["counts"] == {"loaded": 6, "adapted": 0, "skipped_head": 0, "missing": 4, "unexpected": 8,
                                "shape_mismatched": 0}
    assert report["missing"] == ["encoder.to_latent.weight", "encoder.to_latent.bias", *HEAD_KEYS]


def test_no_matching_key_exits_2_naming_the_prefixes_found_and_the_fix(tmp_path, ptft):
    # A LightningModule holding the network as `self.net`, itself a backbone and a neck.
    renamed = {k.replace("encoder.", "net.backbone.", 1).replace("decoder.", "net.neck.", 1): v
               for k, v in tiny_weights("tiny_mlp_autoencoder").items()}
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": _prefixed(renamed, "model.")}, path)
    refused = finetune(ptft, tmp_path, "ft", path, "init.strict=false")  # not even a partial load asked for
    assert refused.code == 2 and "Traceback" not in refused.stderr
    message = " ".join(refused.stderr.split())
    assert "prefixes are model.net.backbone. (8), model.net.neck. (8)" in message
    assert "init.prefix_map={model.net.backbone.: encoder.}" in message
    # The suggestion, taken as written, works (and the failed try left no run behind).
    fixed = finetune(ptft, tmp_path, "ft", path, "init.prefix_map={model.net.backbone.: encoder.}")
    assert meta_of(fixed)["parent"]["report"]["counts"]["loaded"] == 8


def test_weights_of_another_architecture_exit_2_saying_so(torchvision_resnet18, tmp_path, ptft):
    refused = finetune(ptft, tmp_path, "ft", torchvision_resnet18)
    assert refused.code == 2 and "Traceback" not in refused.stderr
    message = " ".join(refused.stderr.split())
    assert f"None of its {RESNET18_KEYS - 2} encoder.* keys is one of the model's" in message
    assert "file: encoder.conv1.weight" in message and "model: encoder.blocks.0.linear.weight" in message
    assert "another architecture; set model.name" in message


# ---- data splits across stages -------------------------------------------------------------------

def pretrained_run(ptft, tmp_path: Path, name: str, supervised: bool) -> Path:
    """A 2-step pretrain on digits' default split: with labels (a classifier) or without (an autoencoder)."""
    model = {"name": "tiny_mlp_classifier" if supervised else "tiny_mlp_autoencoder", "batch_norm": True}
    objective = {"name": "supervised" if supervised else "reconstruction"}
    cfg = tiny_pretrain_config(tmp_path / "runs" / name, model=model, objective=objective,
                               train={"max_steps": 2, "eval_every_steps": 2})
    result = ptft("pretrain", write_yaml(tmp_path / f"{name}.yaml", cfg))
    assert result.code == 0, result.stderr
    return tmp_path / "runs" / name


@pytest.mark.parametrize("override, key, values", [
    ("data.split_seed=3", "data.split_seed", ("0", "3")),
    ("data.val_fraction=0.2", "data.val_fraction", ("0.1", "0.2"))])
def test_validating_on_a_supervised_parents_training_images_exits_2(override, key, values, tmp_path, ptft):
    parent = pretrained_run(ptft, tmp_path, "sup", supervised=True)
    refused = finetune(ptft, tmp_path, "ft", parent, override)
    assert refused.code == 2 and "Traceback" not in refused.stderr and refused.stdout == ""
    message = " ".join(refused.stderr.split())
    setting = key.removeprefix("data.")
    assert f"{key}:" in message and "trained with their labels" in message
    assert f"{setting} {values[1]}" in message and f"{setting} {values[0]}" in message  # this run's, the parent's
    assert f"set {key}={values[0]}" in message  # the fix
    assert not (tmp_path / "runs" / "ft").exists()
    # The dry run says the same; the parent's split is accepted.
    assert finetune(ptft, tmp_path, "ft", parent, override, "--dry-run").code == 2
    assert meta_of(finetune(ptft, tmp_path, "ft", parent))["parent"]["lineage"][-1]["stage"] == "pretrain"


def test_another_split_of_a_label_free_parent_is_one_warning(tmp_path, ptft):
    parent = pretrained_run(ptft, tmp_path, "ae", supervised=False)
    result = finetune(ptft, tmp_path, "ft", parent, "data.split_seed=3")
    assert result.code == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "data.split_seed" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: ") and "without labels" in warnings[0]
    assert "split_seed 3" in warnings[0] and "split_seed 0" in warnings[0]
    same = finetune(ptft, tmp_path, "same", parent)
    assert same.code == 0 and "data.split_seed" not in same.stderr


# ---- heads ----------------------------------------------------------------------------------------

def test_other_number_of_classes_gets_a_fresh_head_even_with_load_head(tmp_path, ptft):
    path = tmp_path / "five_classes.pt"
    torch.save(tiny_weights("tiny_mlp_classifier", num_classes=5), path)
    report = meta_of(finetune(ptft, tmp_path, "ft", path, init={"load_head": True}))["parent"]["report"]
    assert report["counts"] == {"loaded": 8, "adapted": 0, "skipped_head": 2, "missing": 0, "unexpected": 0,
                                "shape_mismatched": 0}


@pytest.mark.parametrize("load_head", [False, True])
def test_load_head_keeps_a_compatible_head(load_head, tmp_path, ptft):
    source = tiny_weights("tiny_mlp_classifier")
    path = tmp_path / "classifier.pt"
    torch.save(source, path)
    # The head frozen for the run: what it ends as is what it started as.
    result = finetune(ptft, tmp_path, "ft", path, init={"load_head": load_head}, finetune={"freeze": ["head.*"]})
    counts = meta_of(result)["parent"]["report"]["counts"]
    assert (counts["loaded"], counts["skipped_head"]) == ((10, 0) if load_head else (8, 2))
    final = weights_at(tmp_path / "runs" / "ft")
    assert all(torch.equal(final[k], source[k]) == load_head for k in HEAD_KEYS)


# ---- torchvision ResNet ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def torchvision_resnet18(tmp_path_factory) -> Path:
    """A plain `torch.save(torchvision.models.resnet18().state_dict())` file."""
    torchvision = pytest.importorskip("torchvision")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        state = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path_factory.mktemp("torchvision") / "resnet18.pth"
    torch.save(state, path)
    return path


RESNET = {"model": {"name": "resnet18_classifier", "small_input": False},
          "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.0}}


def test_torchvision_resnet18_loads_into_a_grey_imagenet_stem(torchvision_resnet18, tmp_path, ptft):
    result = finetune(ptft, tmp_path, "ft", torchvision_resnet18, finetune={"mode": "linear_probe"}, **RESNET)
    report = meta_of(result)["parent"]["report"]
    assert report["counts"] == {"loaded": RESNET18_KEYS - 3, "adapted": 1, "skipped_head": 2, "missing": 0,
                                "unexpected": 0, "shape_mismatched": 0}
    assert report["adapted"] == ["encoder.conv1.weight"] and report["skipped_head"] == HEAD_KEYS
    # Linear probe: every encoder tensor, batch-norm statistics included, is still the file's.
    source = torch.load(torchvision_resnet18, weights_only=True)
    final = weights_at(tmp_path / "runs" / "ft")
    assert torch.equal(final["encoder.conv1.weight"], source["conv1.weight"].sum(dim=1, keepdim=True))
    encoder = [k for k in final if k.startswith("encoder.") and k != "encoder.conv1.weight"]
    assert len(encoder) == RESNET18_KEYS - 3
    assert all(torch.equal(final[k], source[k[len("encoder."):]]) for k in encoder)


@pytest.fixture(scope="module")
def original_torchvision_resnet18(torchvision_resnet18, tmp_path_factory) -> Path:
    """torchvision's original ImageNet files (resnet18-5c106cde.pth) predate num_batches_tracked."""
    state = torch.load(torchvision_resnet18, weights_only=True)
    path = tmp_path_factory.mktemp("torchvision_v1") / "resnet18-5c106cde.pth"
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, path)
    return path


def test_original_torchvision_file_without_batch_counters_loads_strictly(original_torchvision_resnet18, tmp_path,
                                                                         ptft):
    result = finetune(ptft, tmp_path, "ft", original_torchvision_resnet18, finetune={"mode": "linear_probe"},
                      **RESNET)
    report = meta_of(result)["parent"]["report"]
    counters = RESNET18_BATCH_NORMS  # the file lacks one num_batches_tracked per batch-norm layer
    assert report["counts"] == {"loaded": RESNET18_KEYS - counters - 3, "adapted": 1, "skipped_head": 2,
                                "missing": 0, "unexpected": 0, "shape_mismatched": 0}
    final = weights_at(tmp_path / "runs" / "ft")
    assert sum(k.endswith("num_batches_tracked") for k in final) == counters
    assert int(final["encoder.bn1.num_batches_tracked"]) == 0  # linear probe: frozen norms count nothing


def test_imagenet_stem_into_the_small_input_stem_names_model_small_input_false(torchvision_resnet18, tmp_path, ptft):
    small = {**RESNET, "model": {"name": "resnet18_classifier", "small_input": True}, "train": {"max_steps": 1}}
    refused = finetune(ptft, tmp_path, "ft", torchvision_resnet18, **small)
    assert refused.code == 2 and "Traceback" not in refused.stderr
    message = " ".join(refused.stderr.split())
    assert "encoder.conv1.weight (file 64x3x7x7, model 64x1x3x3)" in message
    assert "model.small_input=false" in message and "init.strict=false" in message
    # The fix as the message words it.
    fixed = finetune(ptft, tmp_path, "ft", torchvision_resnet18, "model.small_input=false", **small)
    assert meta_of(fixed)["parent"]["report"]["counts"]["shape_mismatched"] == 0
    # Or keep the small stem and train it from scratch, loading the rest.
    lenient = finetune(ptft, tmp_path, "lenient", torchvision_resnet18, "init.strict=false", **small)
    report = meta_of(lenient)["parent"]["report"]
    assert report["counts"] == {"loaded": RESNET18_KEYS - 3, "adapted": 0, "skipped_head": 2, "missing": 0,
                                "unexpected": 0, "shape_mismatched": 1}
    assert report["shape_mismatched"] == [{"name": "encoder.conv1.weight", "file": [64, 3, 7, 7],
                                           "model": [64, 1, 3, 3]}]


# ---- what trains ----------------------------------------------------------------------------------

EVERY_STEP = {"checkpoint": {"every_steps": 1, "keep_last": 10}}


@pytest.fixture
def autoencoder_file(tmp_path) -> tuple[Path, dict]:
    source = tiny_weights("tiny_mlp_autoencoder")
    torch.save(source, tmp_path / "ae.pt")
    return tmp_path / "ae.pt", source


def test_linear_probe_trains_only_the_head(autoencoder_file, tmp_path, ptft):
    path, source = autoencoder_file
    assert finetune(ptft, tmp_path, "ft", path, finetune={"mode": "linear_probe"}, **EVERY_STEP).code == 0
    first, second = weights_at(tmp_path / "runs" / "ft", 1), weights_at(tmp_path / "runs" / "ft", 2)
    assert_same(first, source, ENCODER_KEYS)
    assert_same(second, source, ENCODER_KEYS)  # running_mean, running_var, num_batches_tracked too
    assert_changed(first, second, HEAD_KEYS)


def test_freeze_patterns_freeze_exactly_what_they_name(autoencoder_file, tmp_path, ptft):
    path, source = autoencoder_file
    result = finetune(ptft, tmp_path, "ft", path, finetune={"freeze": ["encoder.blocks.0.*"]}, **EVERY_STEP)
    assert result.code == 0, result.stderr
    first, second = weights_at(tmp_path / "runs" / "ft", 1), weights_at(tmp_path / "runs" / "ft", 2)
    block0 = [k for k in ENCODER_KEYS if k.startswith("encoder.blocks.0.")]
    assert len(block0) == 6
    assert_same(second, source, block0)
    assert_changed(second, source, ["encoder.to_latent.weight", "encoder.to_latent.bias"])
    assert_changed(first, second, HEAD_KEYS)


@pytest.mark.parametrize("dry_run", [True, False])
def test_freeze_pattern_matching_nothing_exits_2_naming_parameters_before_any_work(dry_run, autoencoder_file,
                                                                                    tmp_path, ptft):
    flags = ["--dry-run"] if dry_run else []
    result = finetune(ptft, tmp_path, "ft", autoencoder_file[0], *flags, finetune={"freeze": ["encoder.layer1.*"]})
    assert result.code == 2 and "Traceback" not in result.stderr and result.stdout == ""
    message = " ".join(result.stderr.split())
    assert "finetune.freeze" in message and "'encoder.layer1.*' matches no parameter" in message
    assert "encoder.blocks.0.linear.weight" in message  # a few real names to pattern on
    assert not (tmp_path / "runs" / "ft").exists()


def test_dry_run_loads_init_weights_and_prints_the_key_report(autoencoder_file, tmp_path, ptft):
    result = finetune(ptft, tmp_path, "ft", autoencoder_file[0], "--dry-run")
    assert result.code == 0, result.stderr
    assert re.search(r"loaded\W+8\W", result.stderr) and re.search(r"unexpected\W+8\W", result.stderr)
    assert not (tmp_path / "runs" / "ft").exists()
    partial = {k: v for k, v in autoencoder_file[1].items() if "to_latent" not in k}
    torch.save(partial, tmp_path / "partial.pt")
    refused = finetune(ptft, tmp_path, "ft", tmp_path / "partial.pt", "--dry-run")
    assert refused.code == 2 and "init.strict is true but 2 encoder.* key(s)" in " ".join(refused.stderr.split())
    assert refused.stdout == "" and not (tmp_path / "runs" / "ft").exists()


def test_linear_probe_without_init_warns_of_a_random_encoder(tmp_path, ptft):
    result = finetune(ptft, tmp_path, "ft", None, "init.checkpoint=null", finetune={"mode": "linear_probe"})
    assert result.code == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "random" in line]
    assert len(warnings) == 1 and "init.checkpoint" in warnings[0] and "linear_probe" in warnings[0]
    full = finetune(ptft, tmp_path, "full", None, "init.checkpoint=null")
    assert full.code == 0 and "random" not in full.stderr  # from scratch in full mode is nothing to warn of


UNFREEZE = {"finetune": {"mode": "linear_probe", "unfreeze_at_step": 2}, **EVERY_STEP}


def test_unfreeze_at_step_unfreezes_there_and_resumes_exactly(autoencoder_file, tmp_path, ptft):
    path, source = autoencoder_file
    long = finetune(ptft, tmp_path, "long", path, "train.max_steps=4", **UNFREEZE)
    assert long.code == 0, long.stderr
    at = {step: weights_at(tmp_path / "runs" / "long", step) for step in (2, 3, 4)}
    assert_same(at[2], source, ENCODER_KEYS)  # steps 0 and 1 trained the head only
    assert_changed(at[3], source, ENCODER_KEYS)  # from step 2 on, everything (batch-norm statistics too)
    # Stopped before the unfreeze step and after it, then resumed: the same weights, bitwise.
    for stop in (1, 3):
        name = f"stop{stop}"
        assert finetune(ptft, tmp_path, name, path, f"train.max_steps={stop}", **UNFREEZE).code == 0
        resumed = ptft("finetune", tmp_path / f"{name}.yaml", "train.max_steps=4", "--resume")
        assert resumed.code == 0, resumed.stderr
        assert_same(weights_at(tmp_path / "runs" / name), at[4], at[4].keys())


def plan(**finetune) -> FinetunePlan:
    return FinetunePlan.from_config(FinetuneSection(**finetune))


def test_freeze_schedule_freezes_its_patterns_until_the_unfreeze_step():
    schedule = plan(freeze=["encoder.blocks.*"], unfreeze_at_step=3).freeze
    assert [schedule.frozen_at(step) for step in (0, 2, 3, 10)] == [("encoder.blocks.*",)] * 2 + [()] * 2
    assert plan(mode="linear_probe").freeze == FreezeSchedule(("encoder.*",), None)
    assert plan().freeze.frozen_at(0) == ()


def test_only_finetuning_has_a_plan_and_it_needs_a_supervised_classifier(tmp_path):
    classifier = load_config(write_yaml(tmp_path / "c.yaml", tiny_finetune_config(tmp_path / "c", None)))
    assert finetune_plan(classifier, "pretrain") is None
    assert finetune_plan(classifier, "finetune") == plan()
    autoencoder = load_config(write_yaml(tmp_path / "a.yaml", tiny_pretrain_config(tmp_path / "a")))
    with pytest.raises(UserError, match="model.name: finetune trains a classifier"):
        finetune_plan(autoencoder, "finetune")


def test_ddp_looks_for_unused_parameters_when_something_is_frozen_at_the_start_or_the_objective_skips_some():
    class EncoderOnlyObjective(nn.Module):
        uses_only_encoder = True

    assert not leaves_parameters_unused(None, nn.Identity())
    assert not leaves_parameters_unused(plan(), nn.Identity())
    assert leaves_parameters_unused(plan(mode="linear_probe", unfreeze_at_step=5), nn.Identity())
    assert leaves_parameters_unused(None, EncoderOnlyObjective())


# ---- learning rates -------------------------------------------------------------------------------

def test_layer_decay_and_head_lr_follow_the_formula_on_resnet18():
    model = MODELS.get("resnet18_classifier")((1, 8, 8), 10)
    groups = param_groups(model, nn.Identity(), plan(head_lr=0.3, layer_decay=0.5), lr=0.1)
    # Encoder layer l of L = 5 (stem, layer1..layer4) trains at lr * decay ** (L - l); the head at head_lr.
    assert [(g["name"], g["lr"]) for g in groups] == [(f"encoder.layer{l}", 0.1 * 0.5 ** (5 - l)) for l in range(5)] + [
        ("head", 0.3)]
    group_of = {id(p): g["name"] for g in groups for p in g["params"]}
    assert len(group_of) == sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    named = dict(model.named_parameters())
    assert group_of[id(named["encoder.bn1.weight"])] == "encoder.layer0"
    assert group_of[id(named["encoder.layer3.1.conv2.weight"])] == "encoder.layer3"
    assert group_of[id(named["head.bias"])] == "head"


def test_without_decay_the_encoder_trains_at_lr_and_the_head_at_head_lr():
    model = MODELS.get("tiny_mlp_classifier")((1, 8, 8), 10)
    plain = param_groups(model, nn.Identity(), plan(), lr=0.1)
    assert [(g["name"], g["lr"], len(g["params"])) for g in plain] == [("body", 0.1, 4), ("head", 0.1, 2)]
    head = param_groups(model, nn.Identity(), plan(head_lr=1.0), lr=0.1)
    assert [(g["name"], g["lr"]) for g in head] == [("body", 0.1), ("head", 1.0)]


def test_layer_decay_needs_an_encoder_with_layers():
    class NoLayers(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder, self.head = nn.Linear(4, 3), nn.Linear(3, 2)

    with pytest.raises(UserError, match="finetune.layer_decay"):
        param_groups(NoLayers(), nn.Identity(), plan(layer_decay=0.5), lr=0.1)


def test_saved_optimizer_state_holds_the_decayed_learning_rates(autoencoder_file, tmp_path, ptft):
    result = finetune(ptft, tmp_path, "ft", autoencoder_file[0], "optim.lr=0.1",
                      finetune={"head_lr": 0.2, "layer_decay": 0.5})
    assert result.code == 0, result.stderr
    state = torch.load(Path(result.last_line) / "state.pt", weights_only=True)
    assert [(g["name"], g["lr"]) for g in state["optimizer"]["param_groups"]] == [
        ("encoder.layer0", 0.1 * 0.5 ** 2), ("encoder.layer1", 0.1 * 0.5), ("head", 0.2)]


# ---- the shipped config ---------------------------------------------------------------------------

@pytest.mark.slow
def test_resnet_finetune_config_runs_from_a_torchvision_file(torchvision_resnet18, shared_data, tmp_path, ptft):
    config = REPO / "configs" / "resnet_finetune.yaml"
    assert load_config(config).model.name == "resnet18_classifier"
    result = ptft("finetune", config, f"run.dir={tmp_path / 'run'}", f"init.checkpoint={torchvision_resnet18}",
                  f"data.root={shared_data}", "train.max_steps=2", "train.eval_every_steps=2")
    report = meta_of(result)["parent"]["report"]
    assert report["counts"]["loaded"] + report["counts"]["adapted"] == RESNET18_KEYS - 2
