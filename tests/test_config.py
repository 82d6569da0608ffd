"""Config loading: extends, overrides, every kind of error message, round trips, hashes, diffs.

The registries are small local fakes (builders that must never run), so these tests do not
depend on the real models, datasets or objectives; one test checks the real mlp_autoencoder.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Annotated, Literal

import pydantic
import pytest
import yaml

from ptft.config import (Config, config_diff, config_from_dict, config_hash, config_to_yaml, load_config,
                         parse_override, validation)
from ptft.errors import ConfigError, UserError
from ptft.registry import Registry

REAL_REGISTRIES = validation.load_registries
MODELS = Registry("model", allow_import_path=True)
OBJECTIVES = Registry("objective")
DATASETS = Registry("dataset")
OPTIMIZERS = Registry("optimizer")
SCHEDULES = Registry("schedule")


def _never_built(*args, **kwargs):
    raise AssertionError("config validation must not build anything")


@MODELS.register(name="mlp_autoencoder", kind="autoencoder")
def fake_ae(input_shape, num_classes, *, hidden: list[int] = [8], latent: int = 4):
    return _never_built()


@MODELS.register(name="mlp_classifier", kind="classifier")
def fake_classifier(input_shape, num_classes, *, hidden: list[int] = [8], head_dropout: float = 0.0):
    return _never_built()


@MODELS.register(name="conv_autoencoder", kind="autoencoder")
def fake_conv_ae(input_shape, num_classes, *, channels: list[int] = [4]):
    return _never_built()


@MODELS.register(name="mlp_encoder", kind="encoder")
def fake_encoder(input_shape, num_classes, *, latent: int = 4):
    return _never_built()


def plugin_model(input_shape, num_classes, *, width: int):
    """Not registered: reached as `module:plugin_model`; `width` has no default."""
    return _never_built()


def ranged_model(input_shape, num_classes, *, width: Annotated[int, pydantic.Field(ge=2)] = 4,
                 sizes: Annotated[list[Annotated[int, pydantic.Field(ge=1)]], pydantic.Field(min_length=1)] = [1]):
    """Not registered: reached as `module:ranged_model`; ranges declared in the annotations."""
    return _never_built()


@OBJECTIVES.register(name="reconstruction", model_kinds=("autoencoder",))
def fake_reconstruction(model, input_shape):
    return _never_built()


@OBJECTIVES.register(name="denoising", model_kinds=("autoencoder",))
def fake_denoising(model, input_shape, *, noise: Literal["gaussian", "mask"] = "gaussian", std: float = 0.3):
    return _never_built()


@OBJECTIVES.register(name="contrastive", model_kinds=("autoencoder", "classifier", "encoder"))
def fake_contrastive(model, input_shape, *, crop_scale: tuple[float, float] = (0.5, 1.0), temperature: float = 0.2):
    return _never_built()


@OBJECTIVES.register(name="supervised", model_kinds=("classifier",))
def fake_supervised(model, input_shape, *, label_smoothing: float = 0.0):
    return _never_built()


for _registry, _names in [(DATASETS, ["digits", "mnist"]), (OPTIMIZERS, ["adam", "sgd"]),
                          (SCHEDULES, ["constant", "cosine"])]:
    for _name in _names:
        _registry.add(_name, _never_built)

FAKES = validation.Registries(MODELS, OBJECTIVES, DATASETS, OPTIMIZERS, SCHEDULES)
MINIMAL = {"train": {"max_steps": 5}}


@pytest.fixture(autouse=True)
def fake_registries(monkeypatch):
    monkeypatch.setattr(validation, "load_registries", lambda: FAKES)


def write(path: Path, content: dict | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False))
    return path


def problems(path: Path, overrides=()) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path, overrides)
    assert caught.value.source == str(path)
    return caught.value.problems


def with_minimal(**sections) -> dict:
    return {**MINIMAL, **sections}


# ---- defaults, extends, overrides ---------------------------------------------------------------

def test_minimal_file_gets_every_default(tmp_path):
    cfg = load_config(write(tmp_path / "exp.yaml", MINIMAL))
    assert cfg.run.dir == "runs/exp" and cfg.run.seed == 0
    data = cfg.data
    assert (data.name, data.batch_size, data.val_fraction, data.label_fraction) == ("digits", 128, 0.1, None)
    assert (cfg.model.name, cfg.model.options) == ("mlp_autoencoder", {"hidden": [8], "latent": 4})
    assert (cfg.objective.name, cfg.objective.options) == ("reconstruction", {})
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.betas) == ("adam", 1e-3, (0.9, 0.999))
    assert (cfg.schedule.name, cfg.schedule.step_size, cfg.schedule.gamma) == ("constant", 1000, 0.1)
    assert (cfg.train.max_steps, cfg.train.epochs, cfg.train.device, cfg.train.precision) == (5, None, "auto", "fp32")
    assert (cfg.init.checkpoint, cfg.init.prefix_map, cfg.finetune.mode, cfg.finetune.freeze) == (None, {}, "full", [])
    assert (cfg.checkpoint.keep_last, cfg.checkpoint.monitor, cfg.checkpoint.mode) == (2, "val/loss", "min")


def test_auto_objective_follows_the_models_kind(tmp_path):
    cfg = load_config(write(tmp_path / "c.yaml", with_minimal(model={"name": "mlp_classifier"})))
    assert (cfg.objective.name, cfg.objective.options) == ("supervised", {"label_smoothing": 0.0})


def test_extends_deep_merges_bases_relative_to_the_including_file(tmp_path):
    write(tmp_path / "bases" / "common.yaml", {"optim": {"name": "sgd", "lr": 0.1, "momentum": 0.5}, **MINIMAL})
    write(tmp_path / "bases" / "ae.yaml", {"extends": "common.yaml", "model": {"hidden": [16, 8]}})
    child = write(tmp_path / "exp" / "child.yaml", {"extends": "../bases/ae.yaml", "optim": {"lr": 0.2}})
    cfg = load_config(child)
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.momentum) == ("sgd", 0.2, 0.5)
    assert cfg.model.options == {"hidden": [16, 8], "latent": 4}
    assert cfg.run.dir == "runs/child"


def test_extends_list_merges_first_to_last_then_the_file(tmp_path):
    write(tmp_path / "a.yaml", {"optim": {"lr": 0.1, "weight_decay": 0.1}, "data": {"batch_size": 4}, **MINIMAL})
    write(tmp_path / "b.yaml", {"optim": {"lr": 0.2}, "data": {"batch_size": 8}})
    cfg = load_config(write(tmp_path / "c.yaml", {"extends": ["a.yaml", "b.yaml"], "data": {"batch_size": 16}}))
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.data.batch_size) == (0.2, 0.1, 16)


def test_extends_naming_another_builder_drops_the_bases_options(tmp_path):
    write(tmp_path / "ae.yaml", with_minimal(model={"name": "mlp_autoencoder", "hidden": [16]},
                                             objective={"name": "denoising", "std": 0.5}))
    child = write(tmp_path / "conv.yaml", {"extends": "ae.yaml", "model": {"name": "conv_autoencoder"},
                                           "objective": {"name": "denoising", "noise": "mask"}})
    cfg = load_config(child)
    assert (cfg.model.name, cfg.model.options) == ("conv_autoencoder", {"channels": [4]})
    assert cfg.objective.options == {"noise": "mask", "std": 0.5}


def test_extends_missing_base_names_it_and_the_including_file(tmp_path):
    path = write(tmp_path / "c.yaml", {"extends": "base.yaml", **MINIMAL})
    assert problems(path) == [f"{path}: extends 'base.yaml', but {tmp_path / 'base.yaml'} does not exist"]


def test_extends_cycle_names_the_chain(tmp_path):
    write(tmp_path / "b.yaml", {"extends": "a.yaml"})
    a = write(tmp_path / "a.yaml", {"extends": "b.yaml"})
    assert problems(a) == [f"extends cycle: {a} -> {tmp_path / 'b.yaml'} -> {tmp_path / 'a.yaml'}"]


def test_extends_of_the_wrong_type(tmp_path):
    path = write(tmp_path / "c.yaml", {"extends": 3, **MINIMAL})
    assert problems(path) == [f"{path}: extends: expected a file name or a list of file names, got 3"]


@pytest.mark.parametrize("text, expected", [
    ("optim.lr=0.01", (["optim", "lr"], 0.01)),
    ("model.hidden=[256,128]", (["model", "hidden"], [256, 128])),
    ("init.checkpoint=null", (["init", "checkpoint"], None)),
    ("train.device=cuda:1", (["train", "device"], "cuda:1")),
    ("init.prefix_map={backbone.: encoder.}", (["init", "prefix_map"], {"backbone.": "encoder."})),
    ("data.download=true", (["data", "download"], True)),
    ("run.dir=runs/a=b", (["run", "dir"], "runs/a=b")),
])
def test_parse_override_reads_the_value_as_yaml(text, expected):
    assert parse_override(text) == expected


@pytest.mark.parametrize("text", ["optim.lr", "=3", "a..b=1", "optim.lr=", "1a.b=2", "optim.lr =1", "model.hidden=[1"])
def test_parse_override_rejects_malformed_text_naming_it_and_the_form(text):
    with pytest.raises(ConfigError) as caught:
        parse_override(text)
    assert len(caught.value.problems) == 1
    assert caught.value.problems[0].startswith(f"override {text!r}: ")
    assert "expected KEY=VALUE" in caught.value.problems[0]


def test_overrides_of_every_kind_are_applied(tmp_path):
    path = write(tmp_path / "c.yaml", with_minimal(init={"checkpoint": "runs/ae"}, optim={"lr": 0.5}))
    cfg = load_config(path, ["optim.lr=0.01", "model.hidden=[16, 8]", "init.checkpoint=null", "train.max_steps=7",
                             "finetune.freeze=[encoder.*]", "init.prefix_map={a.: encoder.}", "optim.lr=0.02"])
    assert (cfg.optim.lr, cfg.model.options["hidden"], cfg.train.max_steps) == (0.02, [16, 8], 7)
    assert cfg.init.checkpoint is None
    assert (cfg.finetune.freeze, cfg.init.prefix_map) == (["encoder.*"], {"a.": "encoder."})


def test_override_naming_another_model_starts_from_its_defaults(tmp_path):
    path = write(tmp_path / "c.yaml", with_minimal(model={"name": "mlp_autoencoder", "hidden": [16]}))
    cfg = load_config(path, ["model.channels=[2]", "model.name=conv_autoencoder"])
    assert (cfg.model.name, cfg.model.options) == ("conv_autoencoder", {"channels": [2]})
    assert load_config(path, ["model.name=mlp_autoencoder"]).model.options == {"hidden": [16], "latent": 4}


# ---- error messages ---------------------------------------------------------------------------

@pytest.mark.parametrize("content, expected", [
    (None, "{path}: no such config file"),
    ("", "{path}: the file is empty; expected a mapping of config sections such as 'train:'"),
    ("# all commented out\n", "{path}: the file is empty; expected a mapping of config sections such as 'train:'"),
    ("- 1\n- 2\n", "{path}: expected a mapping of config sections at the top level, got [1, 2]"),
    ("run:\n  dir: a\n seed: 2\n", "{path}:3:2: YAML syntax error: expected <block end>, but found"),
    ("run:\n  dir: [a\n", "{path}:3:1: YAML syntax error: expected ',' or ']', but got '<stream end>'"),
    ("x: !!python/object:os.system 1\n", "{path}:1:4: YAML syntax error: could not determine a constructor"),
    (b"\xff\xfe", "{path}: is not UTF-8 text, expected a YAML config file"),
])
def test_file_problems_name_the_file(tmp_path, content, expected):
    path = tmp_path / "c.yaml"
    if content is not None:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    [problem] = problems(path)
    assert problem.startswith(expected.format(path=path))


def test_directory_and_unreadable_file_are_named(tmp_path, monkeypatch):
    assert problems(tmp_path) == [f"{tmp_path}: is a directory, expected a YAML config file"]
    path = write(tmp_path / "c.yaml", MINIMAL)

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", refuse)
    assert problems(path) == [f"{path}: cannot read the config file (Permission denied)"]


OPTIM_KEYS = "name, lr, weight_decay, momentum, nesterov, betas"


@pytest.mark.parametrize("sections, expected", [
    ({"optim": {"lrr": 0.1}}, "optim.lrr: unknown key; did you mean 'optim.lr'?"),
    ({"optim": {"zzz": 1}}, f"optim.zzz: unknown key; known keys: {OPTIM_KEYS}"),
    ({"optim": {1: 2}}, f"optim.1: unknown key; known keys: {OPTIM_KEYS}"),
    ({"trian": {"max_steps": 3}}, "trian: unknown section; did you mean 'train'?"),
    ({"optim": 3}, "optim: expected a mapping of keys, got 3"),
    ({"optim": {"lr": -1}}, "optim.lr: expected a number > 0, got -1"),
    ({"optim": {"lr": "fast"}}, "optim.lr: expected a number > 0, got 'fast'"),
    ({"optim": {"momentum": 1}}, "optim.momentum: expected a number in [0, 1), got 1"),
    ({"optim": {"betas": [0.9, 1.0]}}, "optim.betas: expected a list of 2 numbers in [0, 1), got [0.9, 1.0]"),
    ({"optim": {"nesterov": "maybe"}}, "optim.nesterov: expected true or false, got 'maybe'"),
    ({"data": {"val_fraction": 1}}, "data.val_fraction: expected a number in (0, 1), got 1"),
    ({"data": {"label_fraction": 0}}, "data.label_fraction: expected a number in (0, 1] or null, got 0"),
    ({"data": {"batch_size": 0}}, "data.batch_size: expected an integer >= 1, got 0"),
    ({"schedule": {"min_lr_ratio": 2}}, "schedule.min_lr_ratio: expected a number in [0, 1], got 2"),
    ({"train": {"max_steps": "many"}}, "train.max_steps: expected an integer >= 1 or null, got 'many'"),
    ({"train": {"max_steps": 2.5}}, "train.max_steps: expected an integer >= 1 or null, got 2.5"),
    ({"train": {"max_steps": 1, "device": "gpu"}},
     "train.device: expected auto, cpu, cuda, cuda:N or mps, got 'gpu'"),
    ({"finetune": {"mode": "probe"}}, "finetune.mode: expected one of 'full', 'linear_probe', got 'probe'"),
    ({"init": {"prefix_map": [1]}}, "init.prefix_map: expected a mapping of names to strings, got [1]"),
    ({"run": {"dir": None}}, "run.dir: expected a string, got null"),
    ({"model": {"hiden": [8]}}, "model.hiden: unknown key; did you mean 'model.hidden'?"),
    ({"model": {"hidden": ["a"]}}, "model.hidden: expected a list of integers, got ['a']"),
    ({"model": {"name": 3}}, "model.name: expected a model name, got 3"),
    ({"model": {"name": f"{__name__}:plugin_model"}}, "model.width: required; expected an integer"),
    ({"objective": {"name": "denoising", "noise": "salt"}},
     "objective.noise: expected one of 'gaussian', 'mask', got 'salt'"),
    ({"data": {"label_fraction": 0.5, "labels_per_class": 2}},
     "data.label_fraction, data.labels_per_class: set at most one of the two label budgets"),
    ({"train": {"epochs": 2, "max_steps": 5}}, "train.epochs, train.max_steps: set exactly one of the two; got both"),
    ({"train": {}}, "train.epochs, train.max_steps: set exactly one of the two; got neither"),
    ({"finetune": {"mode": "linear_probe", "freeze": ["encoder.*"]}},
     "finetune.mode, finetune.freeze: linear_probe already freezes the whole encoder; leave freeze empty"),
    ({"finetune": {"unfreeze_at_step": 10}}, "finetune.unfreeze_at_step, finetune.freeze: nothing is frozen to "
                                             "unfreeze (mode full, freeze empty); set freeze or mode linear_probe"),
    ({"model": {"name": "mlp_encoder"}}, "objective.name: 'auto' cannot choose an objective for model 'mlp_encoder' "
                                         "(kind 'encoder'); set objective.name to one of contrastive, denoising, "
                                         "reconstruction, supervised"),
    ({"model": {"name": "mlp_classifier"}, "objective": {"name": "reconstruction"}},
     "objective.name: objective 'reconstruction' trains autoencoder models, but model.name 'mlp_classifier' is a "
     "model of kind 'classifier'; choose a matching model.name or objective.name"),
])
def test_value_problems_name_the_dotted_key_expectation_and_value(tmp_path, sections, expected):
    assert problems(write(tmp_path / "c.yaml", with_minimal(**sections))) == [expected]


@pytest.mark.parametrize("sections, expected", [
    ({"data": {"batch_size": True}}, "data.batch_size: expected an integer >= 1, got true"),
    ({"train": {"max_steps": True}}, "train.max_steps: expected an integer >= 1 or null, got true"),
    ({"optim": {"lr": True}}, "optim.lr: expected a number > 0, got true"),
    ({"optim": {"betas": [False, 0.9]}}, "optim.betas: expected a list of 2 numbers in [0, 1), got [false, 0.9]"),
    ({"model": {"hidden": [True, 8]}}, "model.hidden: expected a list of integers, got [true, 8]"),
    ({"objective": {"name": "denoising", "std": False}}, "objective.std: expected a number, got false"),
])
def test_booleans_are_not_read_as_numbers(tmp_path, sections, expected):
    # Python's bool is an int, so pydantic's lax mode would read true as 1 and false as 0.0.
    assert problems(write(tmp_path / "c.yaml", with_minimal(**sections))) == [expected]


def test_yaml_1_1_exponents_are_read_as_numbers_and_booleans_stay_booleans(tmp_path):
    text = ("train:\n  max_steps: 5\n  grad_clip: 1e0\n  compile: true\n"
            "optim:\n  lr: 1e-3\n  nesterov: false\nobjective:\n  name: denoising\n  std: 5e-2\n")
    path = write(tmp_path / "c.yaml", text)
    assert yaml.safe_load(text)["optim"]["lr"] == "1e-3"  # YAML 1.1 wants a dot before the exponent
    cfg = load_config(path, ["schedule.min_lr_ratio=1e-2", "data.download=true"])
    assert (cfg.optim.lr, cfg.train.grad_clip, cfg.objective.options["std"], cfg.schedule.min_lr_ratio) == (
        0.001, 1.0, 0.05, 0.01)
    assert (cfg.train.compile, cfg.optim.nesterov, cfg.data.download) == (True, False, True)


@pytest.mark.parametrize("sections, key, registry, name", [
    ({"model": {"name": "mlp_autoencodr"}}, "model.name", MODELS, "mlp_autoencodr"),
    ({"objective": {"name": "reconstrution"}}, "objective.name", OBJECTIVES, "reconstrution"),
    ({"data": {"name": "mnsit"}}, "data.name", DATASETS, "mnsit"),
    ({"optim": {"name": "adamm"}}, "optim.name", OPTIMIZERS, "adamm"),
    ({"schedule": {"name": "cosin"}}, "schedule.name", SCHEDULES, "cosin"),
])
def test_unknown_registry_names_use_the_registrys_message(tmp_path, sections, key, registry, name):
    expected = f"{key}: {registry.unknown_message(name)}"
    assert "; did you mean '" in expected
    assert problems(write(tmp_path / "c.yaml", with_minimal(**sections))) == [expected]


def test_problems_from_overrides_name_the_override(tmp_path):
    path = write(tmp_path / "c.yaml", with_minimal(optim={"lr": -1}))
    assert problems(path, ["optim.lrr=0.1", "model.hidden=[a]", "train.epochs=0", "model.name=mlp_autoencodr"]) == [
        "model.name (from override 'model.name=mlp_autoencodr'): " + MODELS.unknown_message("mlp_autoencodr"),
        "optim.lr: expected a number > 0, got -1",
        "optim.lrr (from override 'optim.lrr=0.1'): unknown key; did you mean 'optim.lr'?",
        "train.epochs (from override 'train.epochs=0'): expected an integer >= 1 or null, got 0",
    ]
    assert problems(path, ["optim.lr=0.1", "model.hidden=[a]"]) == [
        "model.hidden (from override 'model.hidden=[a]'): expected a list of integers, got ['a']"]


def test_all_problems_of_a_file_are_reported_together(tmp_path):
    path = write(tmp_path / "c.yaml", {"optim": {"lrr": 0.1}, "data": {"batch_size": 0}, "train": {}})
    assert problems(path) == [
        "data.batch_size: expected an integer >= 1, got 0",
        "optim.lrr: unknown key; did you mean 'optim.lr'?",
        "train.epochs, train.max_steps: set exactly one of the two; got neither",
    ]


def test_malformed_overrides_are_reported_with_the_files_problems(tmp_path):
    path = write(tmp_path / "c.yaml", with_minimal(optim={"lr": 0}))
    found = problems(path, ["optim.lr", "data.batch_size=0"])
    assert found[0].startswith("override 'optim.lr': expected KEY=VALUE")
    assert found[1:] == ["data.batch_size (from override 'data.batch_size=0'): expected an integer >= 1, got 0",
                         "optim.lr: expected a number > 0, got 0"]


def test_config_error_message_lists_the_file_and_every_problem(tmp_path):
    path = write(tmp_path / "c.yaml", {"optim": {"lr": 0}})
    with pytest.raises(UserError) as caught:
        load_config(path)
    assert str(caught.value).splitlines() == [
        f"invalid config {path}: 2 problem(s)", "  - optim.lr: expected a number > 0, got 0",
        "  - train.epochs, train.max_steps: set exactly one of the two; got neither"]


# ---- writing back, hashing, diffing ------------------------------------------------------------

def rich_config(tmp_path) -> Config:
    return load_config(write(tmp_path / "rich.yaml", {
        "model": {"name": "mlp_classifier", "hidden": [16, 8]},
        "objective": {"name": "contrastive", "crop_scale": [0.3, 0.9]},
        "init": {"checkpoint": "runs/ae", "prefix_map": {"backbone.": "encoder."}},
        "finetune": {"freeze": ["encoder.layers.0.*"], "unfreeze_at_step": 3, "head_lr": 0.1},
        "optim": {"betas": [0.8, 0.9], "lr": 1.0e-05}, "train": {"epochs": 2, "grad_clip": 1.0},
    }))


def test_yaml_round_trip_gives_an_equal_config_and_hash(tmp_path):
    cfg = rich_config(tmp_path)
    assert cfg.objective.options["crop_scale"] == (0.3, 0.9)
    text = config_to_yaml(cfg)
    assert "model:\n  name: mlp_classifier\n  hidden: [16, 8]\n  head_dropout: 0.0\nobjective:\n" in text
    again = config_from_dict(yaml.safe_load(text), "RUN_DIR/config.yaml")
    assert again == cfg and config_hash(again) == config_hash(cfg)
    assert load_config(write(tmp_path / "saved" / "config.yaml", text)) == cfg


def test_json_dump_is_flat_and_loads_back(tmp_path):
    cfg = load_config(write(tmp_path / "c.yaml", MINIMAL))
    dumped = cfg.model_dump(mode="json")
    assert dumped["model"] == {"name": "mlp_autoencoder", "hidden": [8], "latent": 4}
    assert dumped["objective"] == {"name": "reconstruction"}
    assert config_from_dict(dumped, "meta.json") == cfg


def test_config_from_dict_defaults_and_problems(tmp_path):
    data = {"train": {"max_steps": 3}}
    cfg = config_from_dict(data, "meta.json", overrides=["optim.lr=0.5"])
    assert (cfg.run.dir, cfg.optim.lr) == ("runs/default", 0.5)
    assert data == {"train": {"max_steps": 3}}
    with pytest.raises(ConfigError) as caught:
        config_from_dict([1], "meta.json")
    assert caught.value.problems == ["meta.json: expected a mapping of config sections, got [1]"]
    assert caught.value.source == "meta.json"


def test_config_hash_ignores_run_dir_only(tmp_path):
    cfg = rich_config(tmp_path)
    digest = config_hash(cfg)
    assert len(digest) == 64 and int(digest, 16) >= 0
    moved = cfg.model_copy(update={"run": cfg.run.model_copy(update={"dir": "elsewhere"})})
    assert config_hash(moved) == digest
    reseeded = cfg.model_copy(update={"run": cfg.run.model_copy(update={"seed": 1})})
    assert config_hash(reseeded) != digest


def test_config_diff_lists_the_dotted_keys_that_differ(tmp_path):
    path = write(tmp_path / "c.yaml", MINIMAL)
    base = load_config(path)
    assert config_diff(base, load_config(path)) == []
    changed = load_config(path, ["optim.lr=0.5", "model.hidden=[2]", "run.dir=x", "init.prefix_map={a.: b.}"])
    assert config_diff(base, changed) == ["init.prefix_map", "model.hidden", "optim.lr", "run.dir"]
    other_model = load_config(path, ["model.name=conv_autoencoder"])
    assert config_diff(base, other_model) == ["model.channels", "model.hidden", "model.latent", "model.name"]


def test_config_is_frozen_and_changed_by_copy(tmp_path):
    cfg = load_config(write(tmp_path / "c.yaml", MINIMAL))
    with pytest.raises(pydantic.ValidationError):
        cfg.optim.lr = 1.0
    with pytest.raises(pydantic.ValidationError):
        cfg.optim = cfg.optim
    faster = cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"lr": 0.5})})
    assert (faster.optim.lr, cfg.optim.lr) == (0.5, 1e-3)


def test_import_path_builders_are_validated_like_registered_ones(tmp_path):
    name = f"{__name__}:plugin_model"
    path = write(tmp_path / "c.yaml", with_minimal(model={"name": name, "width": 3}, objective={"name": "contrastive"}))
    cfg = load_config(path)
    assert (cfg.model.name, cfg.model.options) == (name, {"width": 3})
    assert problems(path, ["model.widht=3"]) == [
        "model.widht (from override 'model.widht=3'): unknown key; did you mean 'model.width'?"]
    assert problems(path, ["objective.name=auto"]) == [
        f"objective.name (from override 'objective.name=auto'): 'auto' cannot choose an objective for model "
        f"'{name}' (no registered kind); set objective.name to one of "
        f"contrastive, denoising, reconstruction, supervised"]


def test_every_section_field_is_documented():
    # The README's config reference is generated from these descriptions.
    for section in Config.model_fields.values():
        for name, field in section.annotation.model_fields.items():
            assert field.description, f"{section.annotation.__name__}.{name} has no docstring"


def test_importing_config_does_not_import_torch():
    code = "import ptft.config, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_real_mlp_autoencoder_options_are_validated(tmp_path, monkeypatch):
    for module in ("ptft.models", "ptft.objectives", "ptft.data", "ptft.optim"):
        pytest.importorskip(module)
    monkeypatch.setattr(validation, "load_registries", REAL_REGISTRIES)
    path = write(tmp_path / "c.yaml", with_minimal(model={"name": "mlp_autoencoder", "hidden": [32], "latent": 8}))
    cfg = load_config(path)
    assert cfg.model.options["hidden"] == [32] and cfg.model.options["latent"] == 8
    assert cfg.objective.name == "reconstruction"
    assert problems(path, ["model.hiden=[8]"]) == [
        "model.hiden (from override 'model.hiden=[8]'): unknown key; did you mean 'model.hidden'?"]


# ---- checkpoint.mode from the monitored metric --------------------------------------------------

@pytest.mark.parametrize("monitor, mode", [("val/loss", "min"), ("val/acc", "max"), ("val/knn_acc", "max"),
                                           ("val/accuracy", "max"), ("val/macro_f1", "max"), ("val/psnr", "max"),
                                           ("val/mse", "min"), ("val/recon_error", "min")])
def test_checkpoint_mode_is_inferred_from_the_monitored_metric_and_written_out(tmp_path, monitor, mode):
    cfg = load_config(write(tmp_path / "c.yaml", with_minimal(checkpoint={"monitor": monitor})))
    assert cfg.checkpoint.mode == mode
    assert yaml.safe_load(config_to_yaml(cfg))["checkpoint"] == {
        "every_steps": None, "keep_last": 2, "monitor": monitor, "mode": mode}


def test_checkpoint_mode_contradicting_a_known_metric_names_both_keys(tmp_path):
    path = write(tmp_path / "c.yaml", with_minimal(checkpoint={"monitor": "val/acc", "mode": "min"}))
    assert problems(path) == [
        "checkpoint.mode, checkpoint.monitor: mode 'min' would keep the worst checkpoint: a larger val/acc is "
        "better; set mode: max or leave mode out"]
    assert problems(write(tmp_path / "d.yaml", MINIMAL), ["checkpoint.mode=max"]) == [
        "checkpoint.mode, checkpoint.monitor (from override 'checkpoint.mode=max'): mode 'max' would keep the worst "
        "checkpoint: a smaller val/loss is better; set mode: min or leave mode out"]


def test_metric_of_unknown_direction_asks_for_checkpoint_mode(tmp_path):
    path = write(tmp_path / "c.yaml", with_minimal(checkpoint={"monitor": "val/sharpness"}))
    assert problems(path) == [
        "checkpoint.mode: required for monitor 'val/sharpness', whose direction ptft does not know: "
        "min if smaller is better, max if larger is"]
    assert load_config(path, ["checkpoint.mode=max"]).checkpoint.mode == "max"


def test_saved_config_with_mode_min_for_val_loss_loads_unchanged(tmp_path):
    saved = load_config(write(tmp_path / "c.yaml", MINIMAL)).model_dump(mode="json")
    assert saved["checkpoint"] == {"every_steps": None, "keep_last": 2, "monitor": "val/loss", "mode": "min"}
    assert config_from_dict(saved, "config.yaml").checkpoint.mode == "min"


# ---- import paths in a config read from a run ---------------------------------------------------

def test_config_from_a_run_refuses_import_paths_the_user_did_not_name(tmp_path, monkeypatch):
    name = f"{__name__}:plugin_model"
    saved = load_config(write(tmp_path / "c.yaml", with_minimal(
        model={"name": name, "width": 3}, objective={"name": "contrastive"}))).model_dump(mode="json")
    monkeypatch.delenv("PTFT_TRUSTED_IMPORTS", raising=False)
    with pytest.raises(ConfigError) as caught:
        config_from_dict(saved, "run/meta.json", ["optim.lr=-1"])
    assert caught.value.problems == [
        f"model.name: {name!r} would import module {__name__!r}, named by this file rather than by your own config "
        f"or command line, so ptft does not import it; if you trust that module, allow it with "
        f"PTFT_TRUSTED_IMPORTS={__name__} (comma-separated module names)",
        "optim.lr (from override 'optim.lr=-1'): expected a number > 0, got -1"]
    assert config_from_dict(saved, "run/meta.json", [f"model.name={name}"]).model.options == {"width": 3}
    assert config_from_dict(saved, "run/meta.json", trusted_imports=[name]).model.name == name
    monkeypatch.setenv("PTFT_TRUSTED_IMPORTS", f"elsewhere, {__name__}")
    assert config_from_dict(saved, "run/meta.json").model.name == name


def test_builder_option_ranges_declared_in_annotations_are_checked(tmp_path):
    name = f"{__name__}:ranged_model"
    path = write(tmp_path / "c.yaml", with_minimal(model={"name": name}, objective={"name": "contrastive"}))
    assert load_config(path).model.options == {"width": 4, "sizes": [1]}
    assert problems(path, ["model.width=1", "model.sizes=[]"]) == [
        "model.width (from override 'model.width=1'): expected an integer >= 2, got 1",
        "model.sizes (from override 'model.sizes=[]'): expected a non-empty list of integers >= 1, got []"]
