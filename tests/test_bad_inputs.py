"""The catalogue of user mistakes: each ends in exit 2, one message naming the culprit, no traceback,
and no change to existing runs."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from conftest import tiny_finetune_config, tiny_pretrain_config, write_yaml
from ptft.rundir import LOCK_FILE


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.name == LOCK_FILE:  # holds the pid of the last process to lock the run, not the run
            continue
        digest.update(str(path.relative_to(root)).encode())
        if path.is_symlink():
            digest.update(str(path.readlink()).encode())
        elif path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def existing_run(tmp_path_factory):
    """A finished tiny pretrain run that no mistake below may touch."""
    from conftest import run_subprocess

    root = tmp_path_factory.mktemp("existing")
    config = write_yaml(root / "ae.yaml", tiny_pretrain_config(root / "runs" / "ae"))
    result = run_subprocess("pretrain", config)
    assert result.code == 0, result.stderr
    return root


def _config(tmp: Path, run: Path, **sections) -> Path:
    return write_yaml(tmp / "c.yaml", tiny_pretrain_config(run, **sections))


def _finetune(tmp: Path, run: Path, init, **sections) -> Path:
    return write_yaml(tmp / "ft.yaml", tiny_finetune_config(run, init, **sections))


def _text(tmp: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp / name
    path.write_text(text)
    return path


def _truncated_checkpoint(tmp: Path, existing: Path) -> Path:
    import shutil

    copy = tmp / "broken"
    shutil.copytree((existing / "runs" / "ae" / "checkpoints" / "best").resolve(), copy)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    return copy


def _foreign_file(tmp: Path) -> Path:
    import torch

    path = tmp / "other.pt"
    torch.save({"backbone.fc.weight": torch.zeros(2, 2)}, path)
    return path


def _supervised_run(tmp: Path) -> Path:
    """A tiny classifier pretrained with labels on digits' default split (data.split_seed=0)."""
    from ptft.config import load_config
    from ptft.stages import train

    config = _config(tmp, tmp / "sup", model={"name": "tiny_mlp_classifier"}, objective={"name": "supervised"},
                     train={"max_steps": 2, "eval_every_steps": 2})
    return train(load_config(config), "pretrain")


def _extends_cycle(tmp: Path) -> Path:
    _text(tmp, "extends: a.yaml\n", "b.yaml")
    return _text(tmp, "extends: b.yaml\n", "a.yaml")


# Each case: (id, function(tmp, existing) -> argv, expected substrings of stderr).
CASES = [
    ("missing file", lambda t, e: ["pretrain", t / "nope.yaml"], ["nope.yaml"]),
    ("directory as config", lambda t, e: ["pretrain", t], ["{tmp}"]),
    ("empty file", lambda t, e: ["pretrain", _text(t, "")], ["c.yaml", "empty"]),
    ("not a mapping", lambda t, e: ["pretrain", _text(t, "- 1\n- 2\n")], ["c.yaml", "mapping"]),
    ("yaml syntax", lambda t, e: ["pretrain", _text(t, "run:\n  dir: [unclosed\n")], ["c.yaml:", "YAML"]),
    ("unknown section", lambda t, e: ["pretrain", _text(t, "trian:\n  max_steps: 3\n")], ["trian", "train"]),
    ("unknown key", lambda t, e: ["pretrain", _config(t, t / "r", optim={"lrr": 0.1})], ["optim.lrr", "optim.lr"]),
    ("wrong type", lambda t, e: ["pretrain", _config(t, t / "r", optim={"lr": "fast"})], ["optim.lr", "fast"]),
    ("negative lr", lambda t, e: ["pretrain", _config(t, t / "r"), "optim.lr=-1"], ["optim.lr", "-1"]),
    ("zero lr", lambda t, e: ["pretrain", _config(t, t / "r"), "optim.lr=0"], ["optim.lr"]),
    ("label_fraction > 1", lambda t, e: ["pretrain", _config(t, t / "r"), "data.label_fraction=1.5"],
     ["data.label_fraction"]),
    ("label_fraction 0", lambda t, e: ["pretrain", _config(t, t / "r"), "data.label_fraction=0"],
     ["data.label_fraction"]),
    ("batch_size 0", lambda t, e: ["pretrain", _config(t, t / "r"), "data.batch_size=0"], ["data.batch_size"]),
    ("too many labels per class", lambda t, e: ["finetune", _finetune(t, t / "r", None), "data.labels_per_class=5000"],
     ["data.labels_per_class", "5000"]),
    # Both in one file (an override of one replaces the file's other).
    ("epochs and max_steps", lambda t, e: ["pretrain", _config(t, t / "r", train={"epochs": 2})],
     ["train.epochs", "train.max_steps"]),
    ("neither epochs nor max_steps", lambda t, e: ["pretrain", _config(t, t / "r"), "train.max_steps=null"],
     ["train.epochs", "train.max_steps"]),
    ("fp16 on cpu", lambda t, e: ["pretrain", _config(t, t / "r"), "train.precision=fp16", "train.device=cpu"],
     ["train.precision", "fp16"]),
    ("linear probe with freeze", lambda t, e: ["finetune", _finetune(t, t / "r", None),
                                               "finetune.mode=linear_probe", "finetune.freeze=[encoder.*]"],
     ["finetune.freeze"]),
    ("override without =", lambda t, e: ["pretrain", _config(t, t / "r"), "optim.lr"], ["optim.lr", "KEY=VALUE"]),
    ("override without key", lambda t, e: ["pretrain", _config(t, t / "r"), "=3"], ["=3"]),
    ("override empty segment", lambda t, e: ["pretrain", _config(t, t / "r"), "a..b=1"], ["a..b=1"]),
    ("override unknown key", lambda t, e: ["pretrain", _config(t, t / "r"), "train.max_step=3"],
     ["train.max_step", "train.max_steps"]),
    ("override wrong type", lambda t, e: ["pretrain", _config(t, t / "r"), "train.max_steps=many"],
     ["train.max_steps", "many"]),
    ("unknown model", lambda t, e: ["pretrain", _config(t, t / "r"), "model.name=mlp_autoencodr"],
     ["model.name", "mlp_autoencoder"]),
    ("unknown dataset", lambda t, e: ["pretrain", _config(t, t / "r"), "data.name=mnsit"], ["data.name", "mnist"]),
    ("unknown objective", lambda t, e: ["pretrain", _config(t, t / "r"), "objective.name=reconstrution"],
     ["objective.name", "reconstruction"]),
    ("unknown optimizer", lambda t, e: ["pretrain", _config(t, t / "r"), "optim.name=adamm"], ["optim.name", "adam"]),
    ("unknown model option", lambda t, e: ["pretrain", _config(t, t / "r"), "model.hiden=[8]"],
     ["model.hiden", "model.hidden"]),
    ("extends missing", lambda t, e: ["pretrain", _text(t, "extends: base.yaml\n")], ["base.yaml"]),
    ("extends cycle", lambda t, e: ["pretrain", _extends_cycle(t)], ["a.yaml", "b.yaml"]),
    ("init checkpoint missing", lambda t, e: ["finetune", _finetune(t, t / "r", str(t / "no-such-run"))],
     ["no-such-run"]),
    ("init not a checkpoint", lambda t, e: ["finetune", _finetune(t, t / "r", str(t))], ["{tmp}"]),
    ("init truncated", lambda t, e: ["finetune", _finetune(t, t / "r", str(_truncated_checkpoint(t, e)))],
     ["model.safetensors"]),
    ("init keys match nothing", lambda t, e: ["finetune", _finetune(t, t / "r", str(_foreign_file(t)))],
     ["backbone."]),
    ("init incompatible architecture", lambda t, e: ["finetune", _finetune(t, t / "r", str(e / "runs" / "ae")),
                                                     "model.name=tiny_conv_classifier"], ["encoder"]),
    ("run dir holds a run", lambda t, e: ["pretrain", e / "ae.yaml"], ["already holds a run", "--resume"]),
    ("run dir not writable", lambda t, e: ["pretrain", _config(t, _text(t, "a file", "blocker") / "run")],
     ["run.dir", "not writable"]),
    ("resume without checkpoint", lambda t, e: ["pretrain", _config(t, t / "fresh"), "--resume"],
     ["--resume", "no checkpoint"]),
    ("resume with changed model", lambda t, e: ["pretrain", e / "ae.yaml", "--resume", "model.hidden=[16]"],
     ["model.hidden"]),
    ("data root without files", lambda t, e: ["pretrain", _config(t, t / "r", data={"name": "mnist", "root": str(t)})],
     ["MNIST", "train-images-idx3-ubyte"]),
    ("cuda where there is none", lambda t, e: ["pretrain", _config(t, t / "r"), "train.device=cuda"],
     ["train.device", "cuda"]),
    ("bad device string", lambda t, e: ["pretrain", _config(t, t / "r"), "train.device=gpu"], ["train.device", "gpu"]),
    ("evaluate a stranger", lambda t, e: ["evaluate", t], ["{tmp}"]),
    ("evaluate missing target", lambda t, e: ["evaluate", t / "nothing"], ["nothing"]),
    ("evaluate bad split", lambda t, e: ["evaluate", e / "runs" / "ae", "--split", "train"], ["--split", "train"]),
    ("inspect a stranger", lambda t, e: ["inspect", t], ["{tmp}"]),
    ("freeze pattern matches nothing", lambda t, e: ["finetune", _finetune(t, t / "r", None),
                                                     "finetune.freeze=[encodr.*]"], ["encodr.*"]),
    ("monitor not logged", lambda t, e: ["pretrain", _config(t, t / "r"), "checkpoint.monitor=val/accuracy"],
     ["checkpoint.monitor", "val/accuracy"]),
    # A dry run builds data and model: it catches what needs them, without training.
    ("dry run: monitor not logged", lambda t, e: ["pretrain", _config(t, t / "r"), "checkpoint.monitor=val/acc",
                                                  "--dry-run"], ["checkpoint.monitor", "val/acc", "val/loss"]),
    ("dry run: freeze pattern matches nothing", lambda t, e: ["finetune", _finetune(t, t / "r", None),
                                                              "finetune.freeze=[encodr.*]", "--dry-run"],
     ["encodr.*", "encoder.blocks.0.linear.weight"]),
    ("dry run: init keys match nothing", lambda t, e: ["finetune", _finetune(t, t / "r", str(_foreign_file(t))),
                                                       "--dry-run"], ["backbone."]),
    ("dry run: init incompatible architecture", lambda t, e: ["finetune", _finetune(t, t / "r", str(e / "runs" / "ae")),
                                                              "model.name=tiny_conv_classifier", "--dry-run"],
     ["encoder"]),
    ("split differs from a supervised parent",
     lambda t, e: ["finetune", _finetune(t, t / "r", str(_supervised_run(t))), "data.split_seed=7"],
     ["data.split_seed:", "split_seed 7", "val_fraction", "set data.split_seed=0"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_user_mistake_exits_2_naming_the_culprit(case, tmp_path, existing_run, ptft):
    _, make_args, expected = case
    before = _tree_digest(existing_run / "runs")
    result = ptft(*make_args(tmp_path, existing_run))
    assert result.code == 2, f"exit {result.code}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    assert "Traceback" not in result.stderr
    for text in (e.replace("{tmp}", str(tmp_path)) for e in expected):
        assert text in result.stderr, f"{text!r} not in: {result.stderr}"
    assert result.stdout == ""
    assert _tree_digest(existing_run / "runs") == before


def test_debug_env_shows_traceback_for_user_errors(tmp_path, ptft, monkeypatch):
    monkeypatch.setenv("PTFT_DEBUG", "1")
    result = ptft("pretrain", tmp_path / "nope.yaml")
    assert result.code == 2 and "Traceback" in result.stderr
