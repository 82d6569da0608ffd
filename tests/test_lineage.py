"""Lineage: init.checkpoint resolved once, parent facts and hashes, the split check against a ptft parent."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from ptft import checkpoint as ckpt
from ptft.errors import CheckpointError, DataError
from ptft.lineage import check_parent_split, parent_facts, resolve_init
from ptft.meta import CheckpointMeta
from ptft.weights import KeyReport

GRANDPARENT = {"path": "/runs/a/checkpoints/step-00000010", "stage": "pretrain", "step": 10, "config_hash": "aa",
               "hash": "bb"}
SPLIT = {"dataset": "digits", "split_seed": 0, "val_fraction": 0.1, "val_size": 145, "val_sha256": "v0"}
OTHER_SPLIT = {**SPLIT, "split_seed": 1, "val_sha256": "v1"}


def init(path) -> SimpleNamespace:
    return SimpleNamespace(checkpoint=str(path))


def parent_checkpoint(run_dir, objective: str = "reconstruction"):
    meta = CheckpointMeta(stage="pretrain", step=30, config_hash="cc", objective=objective, data=SPLIT,
                          lineage=[GRANDPARENT])
    return ckpt.save_checkpoint(run_dir, {"encoder.w": torch.ones(2)}, {}, meta, best=True, keep_last=1)


def test_a_ptft_checkpoint_resolves_once_to_its_step_directory_and_meta(tmp_path):
    step_dir = parent_checkpoint(tmp_path / "pre")
    for form in (tmp_path / "pre", tmp_path / "pre" / "checkpoints" / "best", step_dir):
        source = resolve_init(init(form))
        assert source.is_ptft and source.path == step_dir and source.given == str(form)
        assert source.meta.stage == "pretrain" and source.meta.step == 30


def test_a_foreign_weights_file_is_no_ptft_checkpoint_and_keeps_its_path(tmp_path):
    save_file({"encoder.w": torch.ones(2)}, tmp_path / "w.safetensors")
    torch.save({"encoder.w": torch.ones(2)}, tmp_path / "w.pt")
    (tmp_path / "link.pt").symlink_to(tmp_path / "w.pt")
    for name in ("w.safetensors", "w.pt", "link.pt", "absent.pt"):
        source = resolve_init(init(tmp_path / name))
        assert not source.is_ptft and source.meta is None and source.path == tmp_path / name
        assert not ckpt.is_ptft_checkpoint(tmp_path / name)


def test_a_broken_ptft_checkpoint_path_is_a_checkpoint_error_naming_it(tmp_path):
    step_dir = parent_checkpoint(tmp_path / "pre")
    step_dir.rename(step_dir.with_name("moved"))  # `best` and `last` now dangle
    assert ckpt.is_ptft_checkpoint(tmp_path / "pre" / "checkpoints" / "best")
    with pytest.raises(CheckpointError, match=r"best is dangling"):
        resolve_init(init(tmp_path / "pre" / "checkpoints" / "best"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"empty is not a checkpoint \(expected a step directory"):
        resolve_init(init(tmp_path / "empty"))


def test_parent_facts_of_a_ptft_checkpoint_extend_its_lineage_with_it(tmp_path):
    step_dir = parent_checkpoint(tmp_path / "pre")
    report = KeyReport(loaded=["encoder.w"])
    facts = parent_facts(resolve_init(init(tmp_path / "pre")), report)
    weights_hash = hashlib.sha256((step_dir / "model.safetensors").read_bytes()).hexdigest()
    assert facts == {
        "path": str(step_dir), "hash": weights_hash, "report": report.as_dict(),
        "lineage": [GRANDPARENT, {"path": str(step_dir), "stage": "pretrain", "step": 30, "config_hash": "cc",
                                  "hash": weights_hash}],
    }


def test_parent_facts_of_a_foreign_file_hash_the_file_and_start_a_lineage(tmp_path):
    save_file({"encoder.w": torch.ones(2)}, tmp_path / "w.safetensors")
    facts = parent_facts(resolve_init(init(tmp_path / "w.safetensors")), KeyReport())
    assert facts["path"] == str(tmp_path / "w.safetensors") and facts["lineage"] == []
    assert facts["hash"] == hashlib.sha256((tmp_path / "w.safetensors").read_bytes()).hexdigest()


def test_a_parent_split_another_way_is_refused_when_supervised_and_warned_when_label_free(tmp_path):
    label_free = resolve_init(init(parent_checkpoint(tmp_path / "ae")))
    supervised = resolve_init(init(parent_checkpoint(tmp_path / "sup", objective="supervised")))
    assert check_parent_split(SPLIT, label_free) is None and check_parent_split(SPLIT, supervised) is None
    warning = check_parent_split(OTHER_SPLIT, label_free)
    assert warning.startswith("warning: data.split_seed") and "saw them without labels" in warning
    with pytest.raises(DataError, match=r"data.split_seed.*was trained with their labels"):
        check_parent_split(OTHER_SPLIT, supervised)
    save_file({"encoder.w": torch.ones(2)}, tmp_path / "w.safetensors")
    assert check_parent_split(OTHER_SPLIT, resolve_init(init(tmp_path / "w.safetensors"))) is None
