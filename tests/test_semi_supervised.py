"""Semi-supervised finetuning: FixMatch and pseudo-labelling on mixed labelled/unlabelled batches."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from conftest import tiny_finetune_config, tiny_pretrain_config, write_yaml

from ptft.data.mixed import MixedBatches
from ptft.data.tensors import TensorSplit
from ptft.objectives.semi_supervised import (ADAPTIVE_MOMENTUM, AdaptiveThreshold, DistributionAlignment,
                                             masked_pseudo_label_loss, semi_supervised, unlabelled_views)
from ptft.objectives.supervised import Supervised

SHAPE = (1, 8, 8)


class BrightnessClassifier(nn.Module):
    """Two classes; logits (10 * brightest pixel, 0), so a constant image of value v is class 0 with
    confidence sigmoid(10 v) under any view that keeps one pixel of it (shifts, crops, cutout do)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(10.0))
        self.encoder, self.head = nn.Identity(), nn.Identity()

    def forward(self, x):
        brightest = x.flatten(1).amax(1)  # (N,)
        return torch.stack([self.scale * brightest, torch.zeros_like(brightest)], 1)


def constant_images(values) -> torch.Tensor:
    return torch.tensor(values).view(-1, 1, 1, 1).expand(-1, *SHAPE).clone()


def finetune_cfg(method: str, threshold: float | str = 0.95, weight: float = 1.0, align: bool = False):
    return SimpleNamespace(unlabelled=method, confidence_threshold=threshold, unlabelled_weight=weight,
                           distribution_alignment=align)


# Confidences sigmoid(10 v): 0.731, 0.881, 0.9933, 0.99988.
UNLABELLED_VALUES = [0.1, 0.2, 0.5, 0.9]


@pytest.mark.parametrize("method", ["fixmatch", "pseudo_label"])
@pytest.mark.parametrize("threshold, confident", [(0.95, [2, 3]), (0.8, [1, 2, 3]), (0.5, [0, 1, 2, 3]),
                                                  (0.99995, [])])
def test_only_examples_at_or_above_the_threshold_train_on_their_pseudo_label(method, threshold, confident):
    model = BrightnessClassifier()
    objective = semi_supervised(Supervised(0.0), finetune_cfg(method, threshold, weight=2.0), SHAPE, 2)
    x = torch.cat([constant_images([0.3, 0.7]), constant_images(UNLABELLED_VALUES)])
    y = torch.tensor([1, 0, -1, -1, -1, -1])
    loss, logs = objective(model, x, y, torch.Generator().manual_seed(0))
    assert logs["mask_rate"].item() == pytest.approx(len(confident) / 4)
    # Every pseudo-label is class 0; the student's loss on a constant image of value v is
    # cross_entropy((10 v, 0), 0), summed over the confident ones and divided by all 4.
    values = torch.tensor(UNLABELLED_VALUES)
    per_example = F.cross_entropy(torch.stack([10 * values, torch.zeros(4)], 1), torch.zeros(4, dtype=torch.long),
                                  reduction="none")
    expected_unsup = per_example[confident].sum() / 4
    assert logs["unsup_loss"].item() == pytest.approx(expected_unsup.item(), rel=1e-5)
    supervised = F.cross_entropy(torch.tensor([[3.0, 0.0], [7.0, 0.0]]), torch.tensor([1, 0]))
    assert loss.item() == pytest.approx(supervised.item() + 2.0 * expected_unsup.item(), rel=1e-5)


def test_adaptive_thresholds_follow_freematchs_running_estimates():
    # A brute-force reference of FreeMatch's rule, step by step in float64: level tau and class
    # distribution p are running means (momentum lambda) from 1/C; class c's bar is tau * p_c / max p.
    torch.manual_seed(0)
    classes, lam = 4, ADAPTIVE_MOMENTUM
    thresholds = AdaptiveThreshold(classes)
    tau, p = 1 / classes, [1 / classes] * classes
    for _ in range(5):
        probs = torch.randn(16, classes).mul(3).softmax(1)
        got = thresholds(probs)
        rows = probs.double().tolist()
        tau = lam * tau + (1 - lam) * sum(max(row) for row in rows) / len(rows)
        p = [lam * pc + (1 - lam) * sum(row[c] for row in rows) / len(rows) for c, pc in enumerate(p)]
        expected = torch.tensor([tau * pc / max(p) for pc in p], dtype=torch.float64)
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-7)
    # The estimates are buffers: a checkpoint holds them, so --resume continues them.
    assert set(thresholds.state_dict()) == {"level", "class_probs"}


def test_a_per_class_threshold_is_the_pseudo_labels_own():
    probs = torch.tensor([[0.7, 0.3], [0.3, 0.7], [0.55, 0.45], [0.4, 0.6]])
    student = torch.zeros(4, 2)
    # Class 0 needs 0.6, class 1 needs 0.65: examples 0 (0.7 >= 0.6) and 1 (0.7 >= 0.65) pass,
    # 2 (0.55 < 0.6) and 3 (0.6 < 0.65) do not.
    _, mask_rate = masked_pseudo_label_loss(probs, student, torch.tensor([0.6, 0.65]))
    assert mask_rate.item() == 0.5


def test_adaptive_thresholds_let_more_pseudo_labels_train_early_than_a_fixed_bar():
    model = BrightnessClassifier()
    x = torch.cat([constant_images([0.3, 0.7]), constant_images(UNLABELLED_VALUES)])
    y = torch.tensor([1, 0, -1, -1, -1, -1])
    fixed = semi_supervised(Supervised(0.0), finetune_cfg("fixmatch", 0.95), SHAPE, 2)
    adaptive = semi_supervised(Supervised(0.0), finetune_cfg("fixmatch", "adaptive"), SHAPE, 2)
    assert isinstance(adaptive.threshold, AdaptiveThreshold)
    _, fixed_logs = fixed(model, x, y, torch.Generator().manual_seed(0))
    _, adaptive_logs = adaptive(model, x, y, torch.Generator().manual_seed(0))
    # The bar starts near 1/C = 0.5: every unlabelled image (confidence >= 0.73) trains, not 2 of 4.
    assert fixed_logs["mask_rate"].item() == 0.5 and adaptive_logs["mask_rate"].item() == 1.0


def test_distribution_alignment_rescales_by_prior_over_running_mean():
    torch.manual_seed(0)
    align = DistributionAlignment(3)
    align.fit_prior(torch.tensor([0, 0, 1, 1, 2, 2, 2, 2]))  # prior 1/4, 1/4, 1/2
    running = [1 / 3] * 3
    for _ in range(3):
        probs = torch.randn(8, 3).mul(2).softmax(1)
        got = align(probs)
        rows = probs.double().tolist()
        running = [ADAPTIVE_MOMENTUM * r + (1 - ADAPTIVE_MOMENTUM) * sum(row[c] for row in rows) / len(rows)
                   for c, r in enumerate(running)]
        raw = [[q * prior / r for q, prior, r in zip(row, [0.25, 0.25, 0.5], running)] for row in rows]
        expected = torch.tensor([[v / sum(row) for v in row] for row in raw], dtype=torch.float64)
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-7)
    # The running mean is saved with the checkpoint; the prior is refitted from the labels at every start.
    assert set(align.state_dict()) == {"running"}


def test_distribution_alignment_lifts_a_class_the_model_under_predicts():
    align = DistributionAlignment(2)
    align.fit_prior(torch.tensor([0, 1]))
    align.running.copy_(torch.tensor([0.8, 0.2]))  # the model has been calling 80% of images class 0
    aligned = align(torch.tensor([[0.6, 0.4]]))
    assert aligned[0, 1] > 0.5  # 0.4 for a class seen a quarter as often as class 0 now wins


def test_validation_is_the_supervised_objective_alone():
    model = BrightnessClassifier()
    supervised = Supervised(0.0)
    objective = semi_supervised(supervised, finetune_cfg("fixmatch"), SHAPE, 2).eval()
    x, y = constant_images([0.3, 0.7, 0.1]), torch.tensor([1, 0, 0])
    loss, logs = objective(model, x, y, torch.Generator().manual_seed(0))
    expected, expected_logs = supervised.eval()(model, x, y, torch.Generator().manual_seed(0))
    assert loss.item() == expected.item() and logs.keys() == expected_logs.keys() == {"acc"}


def test_unlabelled_none_keeps_the_supervised_objective():
    supervised = Supervised(0.0)
    assert semi_supervised(supervised, finetune_cfg("none"), SHAPE, 2) is supervised


def test_strong_views_change_images_more_than_weak_views():
    views = unlabelled_views((1, 28, 28))
    x = torch.rand((64, 1, 28, 28), generator=torch.Generator().manual_seed(0))
    weak = (views.weak(x, torch.Generator().manual_seed(1)) - x).abs().mean()
    strong = (views.strong(x, torch.Generator().manual_seed(1)) - x).abs().mean()
    assert 0 < weak < strong
    assert views.strong.cutout == 10 and views.weak.flip_p == 0.0  # a mirrored digit may be another digit
    rgb = unlabelled_views((3, 32, 32))
    assert rgb.weak.flip_p == 0.5  # a mirrored photo is still a photo
    assert rgb.strong.saturation > 0 and views.strong.saturation == 0  # colour jitter where there is colour
    photos = torch.rand((64, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    assert rgb.strong(photos, torch.Generator().manual_seed(1)).shape == photos.shape


def _splits(n_labelled=30, n_unlabelled=200):
    g = torch.Generator().manual_seed(0)
    labelled = TensorSplit(torch.rand((n_labelled, *SHAPE), generator=g), torch.arange(n_labelled) % 10)
    # The pool keeps its true labels (DataBundle.unlabelled does); mixed batches must hide them.
    unlabelled = TensorSplit(torch.rand((n_unlabelled, *SHAPE), generator=g), torch.arange(n_unlabelled) % 10)
    return labelled, unlabelled


def test_a_mixed_batch_is_the_labelled_batch_then_ratio_times_as_many_unlabelled():
    labelled, unlabelled = _splits()
    batches = MixedBatches.from_splits(labelled, unlabelled, batch_size=4, ratio=3, seed=0)
    assert batches.steps_per_epoch == 30 // 4  # an epoch is the labelled stream's
    for step in (0, 1, 7, 50):
        x, y = batches.batch(step)
        assert x.shape == (16, *SHAPE) and y.shape == (16,)
        assert (y[:4] >= 0).all() and (y[4:] == -1).all()
        assert all(any(torch.equal(row, l) for l in labelled.x) for row in x[:4])
        assert all(any(torch.equal(row, u) for u in unlabelled.x) for row in x[4:])


def test_mixed_batches_are_pure_functions_of_the_step():
    labelled, unlabelled = _splits()
    first = MixedBatches.from_splits(labelled, unlabelled, batch_size=4, ratio=3, seed=0)
    again = MixedBatches.from_splits(labelled, unlabelled, batch_size=4, ratio=3, seed=0)
    for step in (60, 3, 60, 0):  # any order: a resumed run asks for its step first
        assert all(torch.equal(a, b) for a, b in zip(first.batch(step), again.batch(step)))
    other = MixedBatches.from_splits(labelled, unlabelled, batch_size=4, ratio=3, seed=1)
    assert not torch.equal(first.batch(3)[0], other.batch(3)[0])


def test_two_shards_together_hold_the_single_process_batch():
    labelled, unlabelled = _splits()
    whole = MixedBatches.from_splits(labelled, unlabelled, batch_size=4, ratio=3, seed=0)
    shards = [whole.shard(rank, 2) for rank in range(2)]
    x, y = whole.batch(5)
    parts = [shard.batch(5) for shard in shards]
    assert all(len(px) == 8 and (py[:2] >= 0).all() and (py[2:] == -1).all() for px, py in parts)
    assert torch.equal(torch.cat([parts[0][0][:2], parts[1][0][:2]]), x[:4])
    assert torch.equal(torch.cat([parts[0][0][2:], parts[1][0][2:]]), x[4:])


# Through the CLI: FixMatch on digits with 2 labels per class, 40 unlabelled images per batch.
FIXMATCH = {"unlabelled": "fixmatch", "unlabelled_ratio": 2, "confidence_threshold": 0.5}


def _finetune_config(tmp_path: Path, name: str, init: str | None, **sections) -> Path:
    sections["finetune"] = {**FIXMATCH, **sections.get("finetune", {})}
    return write_yaml(tmp_path / f"{name}.yaml", tiny_finetune_config(tmp_path / name, init, **sections))


def _last_weights(run_dir: Path) -> dict:
    return load_file((run_dir / "checkpoints" / "last").resolve() / "model.safetensors")


RUNNING_ESTIMATES = [{}, {"confidence_threshold": "adaptive", "distribution_alignment": True}]


@pytest.mark.parametrize("finetune", RUNNING_ESTIMATES, ids=["fixed", "adaptive+aligned"])
def test_fixmatch_finetune_resumed_halfway_ends_bitwise_equal(tmp_path, ptft, finetune):
    settings = dict(train={"max_steps": 12, "eval_every_steps": 3, "log_every_steps": 3},
                    checkpoint={"every_steps": 3}, finetune=finetune)
    full = _finetune_config(tmp_path, "full", None, **settings)
    half = _finetune_config(tmp_path, "half", None, **settings)
    assert ptft("finetune", full).code == 0
    assert ptft("finetune", half, "train.max_steps=6").code == 0
    resumed = ptft("finetune", half, "train.max_steps=12", "--resume")
    assert resumed.code == 0, resumed.stderr
    a, b = _last_weights(tmp_path / "full"), _last_weights(tmp_path / "half")
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> str:
    """A tiny autoencoder pretrained on digits: the checkpoint to finetune from."""
    from conftest import run_subprocess

    root = tmp_path_factory.mktemp("pretrain")
    config = write_yaml(root / "ae.yaml", tiny_pretrain_config(root / "ae", train={"max_steps": 4}))
    result = run_subprocess("pretrain", config)
    assert result.code == 0, result.stderr
    return result.last_line


@pytest.mark.parametrize("method", ["fixmatch", "pseudo_label"])
@pytest.mark.parametrize("init", ["scratch", "pretrained", "lpft"])
def test_semi_supervised_finetune_composes_with_every_init(tmp_path, ptft, pretrained, method, init):
    finetune = {"unlabelled": method}
    if init == "lpft":
        finetune.update(mode="linear_probe", unfreeze_at_step=3)
    config = _finetune_config(tmp_path, "run", None if init == "scratch" else pretrained, finetune=finetune,
                              train={"max_steps": 6, "eval_every_steps": 3})
    result = ptft("finetune", config)
    assert result.code == 0, result.stderr
    meta = json.loads((tmp_path / "run" / "checkpoints" / "last" / "meta.json").read_text())
    assert meta["config"]["finetune"]["unlabelled"] == method
    assert (meta["parent"] is None) == (init == "scratch")
    # Validation is the supervised objective's: its loss and accuracy, nothing unlabelled.
    assert set(meta["metrics"]) == {"val/loss", "val/acc"}
    # Training learned from unlabelled images: the loop records how many passed the threshold.
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "train/loss" in r]
    assert logged and all(0 <= r["train/mask_rate"] <= 1 and r["train/unsup_loss"] >= 0 for r in logged)


@pytest.mark.parametrize("value", ["auto", "1.5"])
def test_a_threshold_neither_a_probability_nor_adaptive_is_refused_naming_the_key(tmp_path, ptft, value):
    config = _finetune_config(tmp_path, "run", None)
    result = ptft("finetune", config, f"finetune.confidence_threshold={value}")
    assert result.code == 2 and "Traceback" not in result.stderr
    assert "finetune.confidence_threshold" in result.stderr and "'adaptive'" in result.stderr
    assert not (tmp_path / "run").exists()


def test_unlabelled_loss_with_weight_0_is_refused_naming_both_keys(tmp_path, ptft):
    config = _finetune_config(tmp_path, "run", None, finetune={"unlabelled_weight": 0})
    result = ptft("finetune", config)
    assert result.code == 2
    assert "finetune.unlabelled, finetune.unlabelled_weight" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow  # two gloo processes: about 20 s of CPU
@pytest.mark.parametrize("finetune", RUNNING_ESTIMATES, ids=["fixed", "adaptive+aligned"])
def test_fixmatch_finetune_runs_under_torchrun_and_resumes_with_one_process(tmp_path, ptft, finetune):
    from test_distributed import torchrun

    config = _finetune_config(tmp_path, "ddp", None, train={"max_steps": 6, "eval_every_steps": 3},
                              checkpoint={"every_steps": 3}, finetune=finetune)
    # Each rank takes half of the labelled and half of the unlabelled part of every batch.
    result = torchrun("finetune", config, "train.max_steps=3")
    assert result.code == 0, result.stderr
    assert result.stdout.count("step-") == 1  # rank 0 alone prints the checkpoint path
    resumed = ptft("finetune", config, "--resume")
    assert resumed.code == 0, resumed.stderr
    assert json.loads((tmp_path / "ddp" / "checkpoints" / "last" / "meta.json").read_text())["step"] == 6


@pytest.mark.parametrize("data", ["digits", "imagefolder"])
def test_shipped_ssl_configs_run_end_to_end_with_only_data_overrides(tmp_path, ptft, data):
    from conftest import REPO
    from test_imagefolder import image_tree

    if data == "imagefolder":
        root = image_tree(tmp_path / "images", per_class=14, unlabelled=6)
        overrides = ["data.name=imagefolder", f"data.root={root}", "data.image_size=16"]
    else:
        overrides = ["data.name=digits"]
    short = ["train.max_steps=4", "train.eval_every_steps=2"]  # a smoke test: the recipe's length aside
    pretrained = ptft("pretrain", REPO / "configs" / "ssl_pretrain.yaml", *overrides, *short,
                      f"run.dir={tmp_path / 'pre'}")
    assert pretrained.code == 0, pretrained.stderr
    records = (tmp_path / "pre" / "metrics.jsonl").read_text()
    assert '"val/knn_acc"' in records
    # The recipe, its from-scratch baseline, and its labels alone (the study's rows): each one override away.
    for name, init, unlabelled in [("ssl", pretrained.last_line, "fixmatch"), ("scratch", "null", "fixmatch"),
                                   ("labels", pretrained.last_line, "none")]:
        finetuned = ptft("finetune", REPO / "configs" / "ssl_finetune.yaml", *overrides, *short,
                         f"init.checkpoint={init}", f"finetune.unlabelled={unlabelled}", f"run.dir={tmp_path / name}")
        assert finetuned.code == 0, finetuned.stderr
        assert ('"train/mask_rate"' in (tmp_path / name / "metrics.jsonl").read_text()) == (unlabelled != "none")
        metrics = json.loads(ptft("evaluate", finetuned.last_line).last_line)
        assert 0 <= metrics["accuracy"] <= 1
    # The denoising pretraining hands over the same encoder: a strict load into ssl_finetune.yaml's classifier
    # fails if its restated widths drift from ssl_pretrain.yaml's.
    denoised = ptft("pretrain", REPO / "configs" / "ssl_pretrain_denoising.yaml", *overrides, *short,
                    f"run.dir={tmp_path / 'denoise'}")
    assert denoised.code == 0, denoised.stderr
    assert '"val/knn_acc"' in (tmp_path / "denoise" / "metrics.jsonl").read_text()
    finetuned = ptft("finetune", REPO / "configs" / "ssl_finetune.yaml", *overrides, *short,
                     f"init.checkpoint={denoised.last_line}", f"run.dir={tmp_path / 'from_denoise'}")
    assert finetuned.code == 0, finetuned.stderr
    parent = json.loads((tmp_path / "from_denoise" / "checkpoints" / "last" / "meta.json").read_text())["parent"]
    assert parent["path"].startswith(str(tmp_path / "denoise"))
