"""meta.json as one typed record: the keys on disk stay, old checkpoints load, a run's facts are fixed once."""

from __future__ import annotations

import json
from types import SimpleNamespace

from conftest import tiny_pretrain_config, write_yaml
from ptft.config import config_from_dict, config_hash
from ptft.data.images import RULES_VERSION
from ptft.meta import CheckpointMeta, meta_json_bytes, run_meta

# The keys every checkpoint's meta.json has held since format 1 (README, docs): readers rely on them.
META_KEYS = {"stage", "config_hash", "config", "model", "objective", "data", "inputs", "versions", "parent",
             "lineage", "step", "epoch", "metrics", "best", "format_version"}
LINEAGE = [{"config_hash": "42517bd5", "hash": "c9be6f77", "path": "/runs/pre/checkpoints/step-00000030",
            "stage": "pretrain", "step": 30}]
# A finetune checkpoint's meta.json as ptft wrote it before meta.json had a typed record (config cut short).
PREVIOUS_FORMAT = {
    "best": {"monitor": "val/loss", "step": 10, "value": 2.333106279373169},
    "config": {"run": {"dir": "/runs/ft", "seed": 0}, "model": {"name": "tiny_mlp_classifier"}},
    "config_hash": "e0c38235", "epoch": 10.0, "format_version": 1,
    "data": {"dataset": "digits", "split_seed": 0, "val_fraction": 0.1, "val_size": 145, "val_sha256": "f2cc42af"},
    "inputs": {"class_names": [str(i) for i in range(10)], "shape": [1, 8, 8]},
    "lineage": LINEAGE,
    "metrics": {"val/acc": 0.16551724076271057, "val/loss": 2.333106279373169},
    "model": {"kind": "classifier", "name": "tiny_mlp_classifier", "options": {"hidden": [8], "latent": 8}},
    "objective": "supervised",
    "parent": {"hash": "c9be6f77", "lineage": LINEAGE, "path": "/runs/pre/checkpoints/step-00000030",
               "report": {"counts": {"loaded": 4}, "loaded": ["encoder.to_latent.weight"]}},
    "stage": "finetune", "step": 10,
    "versions": {"ptft": "0.1.0", "python": "3.11.7", "torch": "2.14.1"},
}


def test_a_meta_json_of_the_previous_format_loads_and_writes_back_byte_identical():
    text = json.dumps(PREVIOUS_FORMAT, sort_keys=True, indent=2) + "\n"  # the previous writer, verbatim
    meta = CheckpointMeta.from_json(json.loads(text))
    assert (meta.stage, meta.step, meta.epoch, meta.objective) == ("finetune", 10, 10.0, "supervised")
    assert meta.lineage == LINEAGE and meta.parent["lineage"] == LINEAGE
    assert meta.best == {"monitor": "val/loss", "step": 10, "value": 2.333106279373169}
    assert set(meta.to_json()) == META_KEYS
    assert meta_json_bytes(meta) == text.encode()


def test_an_older_meta_json_lacking_later_keys_loads_with_their_defaults():
    older = {key: PREVIOUS_FORMAT[key] for key in ("config", "config_hash", "format_version", "stage", "step")}
    older["surplus"] = "a key this ptft does not know"
    meta = CheckpointMeta.from_json(older)
    assert meta.step == 10 and meta.config == PREVIOUS_FORMAT["config"]
    assert meta.inputs is None and meta.parent is None and meta.lineage == [] and meta.metrics == {}
    assert "surplus" not in meta.to_json()


def test_an_older_checkpoint_without_recorded_inputs_still_inspects_and_evaluates(tmp_path, ptft):
    config = write_yaml(tmp_path / "c.yaml", tiny_pretrain_config(tmp_path / "run", train={"max_steps": 5}))
    assert ptft("pretrain", config).code == 0
    meta_file = tmp_path / "run" / "checkpoints" / "last" / "meta.json"
    written = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({k: v for k, v in written.items() if k != "inputs"}))
    inspected = ptft("inspect", tmp_path / "run" / "checkpoints" / "last", "--json")
    assert inspected.code == 0, inspected.stderr
    assert json.loads(inspected.stdout)["step"] == 5
    evaluated = ptft("evaluate", tmp_path / "run", "--split", "val")
    assert evaluated.code == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["step"] == 5


def test_run_meta_fixes_the_run_facts_and_at_adds_where_a_checkpoint_stands(tmp_path):
    cfg = config_from_dict(tiny_pretrain_config(tmp_path / "run"), "c.yaml")
    data = SimpleNamespace(fingerprint={"dataset": "digits"}, input_shape=(1, 8, 8), class_names=["0", "1"],
                           normalization=None, stored_size=None)
    base = run_meta(cfg, "pretrain", data, parent=None)
    meta = base.at(step=20, epoch=2.123456, metrics={"val/loss": 0.5},
                   best={"monitor": "val/loss", "value": 0.5, "step": 20})
    written = json.loads(meta_json_bytes(meta))
    assert set(written) == META_KEYS
    assert written["config_hash"] == config_hash(cfg) and written["config"] == cfg.model_dump(mode="json")
    assert written["model"] == {"name": "tiny_mlp_autoencoder", "options": cfg.model.options, "kind": "autoencoder"}
    assert written["inputs"] == {"shape": [1, 8, 8], "class_names": ["0", "1"], "normalize": None,
                                 "pixel_rules": RULES_VERSION, "decoded_size": None}
    assert (written["step"], written["epoch"], written["parent"], written["lineage"]) == (20, 2.1235, None, [])
    assert base.step is None and base.metrics == {}  # `at` returns a copy


def test_a_resumed_run_keeps_the_parent_and_lineage_it_started_with(tmp_path):
    cfg = config_from_dict(tiny_pretrain_config(tmp_path / "run"), "c.yaml")
    data = SimpleNamespace(fingerprint={}, input_shape=(1, 8, 8), class_names=[], normalization=None,
                           stored_size=None)
    parent = {"path": "/runs/pre/checkpoints/step-00000030", "hash": "c9be6f77", "lineage": LINEAGE}
    saved = run_meta(cfg, "finetune", data, parent)
    resumed = run_meta(cfg, "finetune", data, parent=None).with_lineage_of(saved)
    assert resumed.parent == parent and resumed.lineage == LINEAGE


def test_a_checkpoint_from_before_data_resize_is_read_with_the_stretch_it_was_trained_with(tmp_path):
    from ptft.evaluation import resolve_target

    config = write_yaml(tmp_path / "c.yaml", tiny_pretrain_config(tmp_path / "run", train={"max_steps": 2}))
    from ptft.stages import train
    from ptft.config import load_config

    train(load_config(config), "pretrain")
    meta_file = tmp_path / "run" / "checkpoints" / "last" / "meta.json"
    written = json.loads(meta_file.read_text())
    assert written["config"]["data"]["resize"] == "crop"  # today's default, recorded
    _, cfg, _ = resolve_target(str(tmp_path / "run"), [])
    assert cfg.data.resize == "crop"
    del written["config"]["data"]["resize"]  # as a checkpoint written before the key existed
    meta_file.write_text(json.dumps(written))
    _, cfg, _ = resolve_target(str(tmp_path / "run"), [])
    assert cfg.data.resize == "stretch"
    _, cfg, _ = resolve_target(str(tmp_path / "run"), ["data.resize=crop"])  # the user's word still wins
    assert cfg.data.resize == "crop"
