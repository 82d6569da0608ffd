"""A linear probe frozen for the whole run trains its head on features the encoder computed once.

Each run here finetunes tiny_conv_classifier (batch norm, head dropout: both paths draw the same
dropout masks per step) on digits from a tiny_conv_autoencoder pretrained once per module, through
the real CLI. The per-step path (`finetune.precompute_features=false`, no augmentation) is the
reference the feature path must match.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_finetune_config, tiny_pretrain_config, write_yaml
from ptft.assembly import MONITOR_PROBE_EXAMPLES
from ptft.config import load_config
from ptft.finetuning import FinetunePlan

PER_STEP = "finetune.precompute_features=false"


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A tiny_conv_autoencoder checkpoint: the encoder the probes start from (not a random one)."""
    from ptft.stages import train

    root = tmp_path_factory.mktemp("pretrain")
    config = tiny_pretrain_config(root / "run", model={"name": "tiny_conv_autoencoder"},
                                  train={"max_steps": 10, "eval_every_steps": 10})
    return train(load_config(write_yaml(root / "pretrain.yaml", config)), "pretrain")


def probe_config(tmp_path: Path, name: str, init: Path, **sections) -> Path:
    config = tiny_finetune_config(tmp_path / name, str(init),
                                  data={"labels_per_class": 5, "batch_size": 20},
                                  model={"name": "tiny_conv_classifier", "head_dropout": 0.2},
                                  finetune={"mode": "linear_probe"},
                                  train={"max_steps": 12, "eval_every_steps": 6, "log_every_steps": 6}, **sections)
    return write_yaml(tmp_path / f"{name}.yaml", config)


def weights(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    return load_file(Path(checkpoint) / "model.safetensors")


def val_losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [record["val/loss"] for record in records if "val/loss" in record]


def test_probe_on_features_hands_on_the_head_the_per_step_probe_learns(tmp_path, ptft, pretrained):
    on_features = ptft("finetune", probe_config(tmp_path, "features", pretrained))
    per_step = ptft("finetune", probe_config(tmp_path, "per_step", pretrained), PER_STEP)
    assert on_features.code == per_step.code == 0, on_features.stderr + per_step.stderr
    fast, slow = weights(on_features.last_line), weights(per_step.last_line)
    # The whole classifier is saved: the encoder, exactly the pretrained one in both, and the head.
    assert fast.keys() == slow.keys() and {"head.weight", "head.bias"} < fast.keys()
    pretrained_encoder = {key: value for key, value in weights(pretrained).items() if key.startswith("encoder.")}
    assert pretrained_encoder and all(torch.equal(fast[key], value) for key, value in pretrained_encoder.items())
    assert all(torch.equal(fast[key], slow[key]) for key in fast if key.startswith("encoder."))
    torch.testing.assert_close(fast["head.weight"], slow["head.weight"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast["head.bias"], slow["head.bias"], rtol=1e-4, atol=1e-5)
    assert val_losses(tmp_path / "features") == pytest.approx(val_losses(tmp_path / "per_step"), rel=1e-5)
    # evaluate reads the checkpoint as any classifier's, and finds what the per-step probe's gives.
    evaluated = [ptft("evaluate", tmp_path / name) for name in ("features", "per_step")]
    assert [result.code for result in evaluated] == [0, 0], evaluated[0].stderr
    fast_metrics, slow_metrics = (json.loads(result.stdout) for result in evaluated)
    assert fast_metrics["accuracy"] == slow_metrics["accuracy"]
    assert fast_metrics["loss"] == pytest.approx(slow_metrics["loss"], rel=1e-5)


def test_encoder_runs_once_per_example_not_once_per_step(tmp_path, ptft, pretrained, monkeypatch):
    import ptft.assembly as assembly

    seen: list[int] = []  # examples per encoder forward
    build = assembly.build_model_for

    def counted(cfg, data):
        model = build(cfg, data)
        model.encoder.register_forward_hook(lambda module, args, output: seen.append(len(output)))
        return model

    monkeypatch.setattr(assembly, "build_model_for", counted)
    config = probe_config(tmp_path, "features", pretrained)
    assert ptft("finetune", config).code == 0
    from ptft.data import build_data

    data = build_data(load_config(config).data, torch.device("cpu"))
    # Once over the labelled subset and val, plus the few examples that tell validation's metric names.
    assert sum(seen) == len(data.labelled.y) + len(data.val.y) + MONITOR_PROBE_EXAMPLES
    seen.clear()
    assert ptft("finetune", config, PER_STEP, "--overwrite").code == 0
    assert sum(seen) > 12 * 20 + 2 * len(data.val.y)  # every step's batch and every validation


def test_stopped_probe_resumes_bitwise_equal_to_an_unbroken_one(tmp_path, ptft, pretrained):
    # On resume init.checkpoint is not loaded: the features must come from the resumed encoder.
    unbroken = ptft("finetune", probe_config(tmp_path, "long", pretrained))
    short = probe_config(tmp_path, "short", pretrained)
    assert unbroken.code == 0 and ptft("finetune", short, "train.max_steps=6").code == 0
    resumed = ptft("finetune", short, "--resume")
    assert resumed.code == 0, resumed.stderr
    long, short_end = (weights(tmp_path / name / "checkpoints" / "last") for name in ("long", "short"))
    assert long.keys() == short_end.keys()
    assert all(torch.equal(long[key], short_end[key]) for key in long)


def test_augmentation_options_warn_once_that_the_probe_ignores_them(tmp_path, ptft, pretrained):
    short = "train.max_steps=2"
    augmented = ptft("finetune", probe_config(tmp_path, "augmented", pretrained,
                                              objective={"name": "supervised", "max_shift": 0.1, "flip": True}), short)
    assert augmented.code == 0, augmented.stderr
    assert augmented.stderr.count("without augmentation") == 1
    assert "objective.max_shift=0.1, objective.flip=True are not used" in augmented.stderr
    assert "finetune.precompute_features=false" in augmented.stderr
    plain = ptft("finetune", probe_config(tmp_path, "plain", pretrained), short)
    per_step = ptft("finetune", probe_config(tmp_path, "per_step", pretrained, objective={"max_shift": 0.1}),
                    PER_STEP, short)
    assert plain.code == per_step.code == 0
    assert "without augmentation" not in plain.stderr + per_step.stderr


@pytest.mark.parametrize(("finetune", "on_features"), [
    ({"mode": "linear_probe"}, True),
    ({"mode": "linear_probe", "precompute_features": False}, False),
    ({"mode": "linear_probe", "unfreeze_at_step": 5}, False),  # LP-FT: the encoder trains later
    ({"mode": "linear_probe", "unlabelled": "fixmatch"}, False),  # needs fresh views of unlabelled images
    ({"mode": "full"}, False),
])
def test_only_a_probe_frozen_for_the_whole_run_trains_on_features(tmp_path, finetune, on_features):
    cfg = load_config(write_yaml(tmp_path / "c.yaml", tiny_finetune_config(tmp_path / "run", None, finetune=finetune)))
    assert FinetunePlan.from_config(cfg.finetune).probe_on_features is on_features
