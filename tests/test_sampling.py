"""data.sampler: balanced draws labelled batches with every class equally likely; per-class support shown."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_finetune_config, tiny_pretrain_config, write_yaml
from ptft.data import DATASETS
from ptft.data.batches import DeviceBatches
from test_class_weights import train_and_score
from test_imagefolder import save_image
from test_resume import _assert_bitwise_equal, _final_weights

COUNTS = [1000, 100]  # a 10:1 imbalance


def imbalanced(counts: list[int] = COUNTS) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 1, 1, 1) images holding their own index, and labels `counts[c]` times c, classes interleaved."""
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    y = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    return torch.arange(len(y), dtype=torch.float32).view(-1, 1, 1, 1), y


def balanced_batches(batch_size: int = 64, seed: int = 0, counts: list[int] = COUNTS) -> DeviceBatches:
    x, y = imbalanced(counts)
    return DeviceBatches(x, y, batch_size, seed, sampler="balanced")


def test_balanced_batches_draw_each_class_equally_often_on_a_10_to_1_imbalance():
    batches = balanced_batches()
    labels = torch.cat([batches.batch(step)[1] for step in range(200)])  # 12,800 draws
    share = torch.bincount(labels, minlength=2) / len(labels)
    # Uniform is 0.5 each; the standard error of 12,800 draws is 0.0044. Random batches would give 0.09.
    assert abs(share[1].item() - 0.5) < 0.02, share


def test_balanced_draws_are_uniform_within_a_class_and_cover_it():
    x, y = imbalanced([300, 30])
    batches = DeviceBatches(x, y, 64, seed=1, sampler="balanced")
    drawn = torch.cat([batches.batch(step)[0].view(-1).long() for step in range(400)])  # the images are indices
    rare = drawn[y[drawn] == 1]
    per_example = torch.bincount(rare, minlength=len(y))[y == 1].float()
    assert (per_example > 0).all()  # every rare example is drawn, not only a few
    assert per_example.std() / per_example.mean() < 0.2  # ~427 draws each: about 0.05 expected


def test_balanced_batches_pair_each_image_with_its_own_label():
    x, y = imbalanced()
    images, labels = DeviceBatches(x, y, 64, seed=0, sampler="balanced").batch(7)
    assert torch.equal(y[images.view(-1).long()], labels)


def test_same_step_draws_the_same_batch_so_resume_is_exact():
    first, resumed = balanced_batches(), balanced_batches()
    for step in (0, 5, 1234):
        assert torch.equal(first.batch(step)[0], resumed.batch(step)[0])
    assert not torch.equal(first.batch(0)[0], first.batch(1)[0])
    assert not torch.equal(first.batch(0)[0], balanced_batches(seed=1).batch(0)[0])


def test_shard_slices_partition_the_global_batch():
    batches = balanced_batches(batch_size=64)
    shards = [batches.shard(rank, 4) for rank in range(4)]
    for step in (0, 3, 40):
        parts = [shard.batch(step) for shard in shards]
        assert all(len(x) == 16 for x, _ in parts)
        global_x, global_y = batches.batch(step)
        assert torch.equal(torch.cat([x for x, _ in parts]), global_x)
        assert torch.equal(torch.cat([y for _, y in parts]), global_y)


def test_random_sampler_is_unchanged_shuffling_without_replacement():
    x, y = imbalanced()
    default, random = DeviceBatches(x, y, 100, seed=3), DeviceBatches(x, y, 100, seed=3, sampler="random")
    epoch = torch.cat([random.batch(step)[0].view(-1) for step in range(random.steps_per_epoch)])
    assert torch.equal(epoch.sort().values, x.view(-1))  # each example exactly once per epoch
    assert all(torch.equal(default.batch(s)[0], random.batch(s)[0]) for s in range(12))


def test_balanced_never_draws_a_class_the_labels_lack():
    x, y = imbalanced([50, 0, 5])
    labels = torch.cat([DeviceBatches(x, y, 32, seed=0, sampler="balanced").batch(s)[1] for s in range(50)])
    assert set(labels.tolist()) == {0, 2}


def test_balanced_sampler_raises_macro_f1_over_random_on_a_10_to_1_imbalance(one_thread):
    plain, balanced = train_and_score(None), train_and_score(None, sampler="balanced")
    # Measured: 0.575 with uniform batches (most of the rare class is predicted as the common one), 0.781 balanced.
    assert balanced > plain + 0.1, (plain, balanced)


@pytest.mark.parametrize("unlabelled", ["none", "fixmatch"])
def test_balanced_finetune_resumed_equals_one_long_run_and_differs_from_random(ptft, tmp_path, unlabelled):
    def config(name: str, steps: int, sampler: str = "balanced") -> Path:
        cfg = tiny_finetune_config(tmp_path / name, None, data={"sampler": sampler},
                                   train={"max_steps": steps, "eval_every_steps": 3},
                                   finetune={"unlabelled": unlabelled, "unlabelled_ratio": 1})
        return write_yaml(tmp_path / f"{name}.yaml", cfg)

    for name, steps, sampler in [("long", 6, "balanced"), ("short", 3, "balanced"), ("random", 6, "random")]:
        assert ptft("finetune", config(name, steps, sampler)).code == 0
    resumed = ptft("finetune", config("short", 3), "train.max_steps=6", "--resume")
    assert resumed.code == 0, resumed.stderr
    _assert_bitwise_equal(_final_weights(tmp_path / "long"), _final_weights(tmp_path / "short"))
    random, balanced = _final_weights(tmp_path / "random"), _final_weights(tmp_path / "long")
    assert not torch.equal(random["head.weight"], balanced["head.weight"])  # the key reaches the batches
    assert "sampler: balanced" in (tmp_path / "long" / "config.yaml").read_text()


@pytest.mark.parametrize("objective", ["reconstruction", "denoising"])
def test_balanced_sampler_for_a_label_free_objective_exits_2_naming_the_key(ptft, tmp_path, objective):
    cfg = tiny_pretrain_config(tmp_path / "run", data={"sampler": "balanced"}, objective={"name": objective})
    result = ptft("pretrain", write_yaml(tmp_path / "pre.yaml", cfg), "--dry-run")
    assert result.code == 2
    assert "data.sampler" in result.stderr and objective in result.stderr and "random" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_unknown_sampler_is_a_config_error_naming_the_key(ptft, tmp_path):
    path = write_yaml(tmp_path / "ft.yaml", tiny_finetune_config(tmp_path / "run", None))
    result = ptft("config", path, "data.sampler=weighted")
    assert result.code == 2 and "data.sampler" in result.stderr and "balanced" in result.stderr


def test_evaluate_reports_each_class_support_in_its_metrics_json(ptft, tmp_path):
    cfg = tiny_finetune_config(tmp_path / "run", None, train={"max_steps": 2, "eval_every_steps": 2})
    assert ptft("finetune", write_yaml(tmp_path / "ft.yaml", cfg)).code == 0
    printed = json.loads(ptft("evaluate", tmp_path / "run").last_line)
    written = json.loads((tmp_path / "run" / "eval" / "test" / "metrics.json").read_text())
    support = [written["per_class"][str(c)]["support"] for c in range(10)]
    test_labels = DATASETS.get("digits")(tmp_path, False).test_y
    assert support == torch.bincount(test_labels, minlength=10).tolist()  # true labels per class
    assert sum(support) == written["num_examples"] == len(test_labels)
    assert printed["per_class"] == written["per_class"]


def image_classes(root: Path, counts: dict[str, int]) -> Path:
    for value, (name, count) in enumerate(counts.items()):
        for i in range(count):
            save_image(root / "train" / name / f"{i:03d}.png", 100 * value + i)
        save_image(root / "test" / name / "t.png", 100 * value + 90)
    return root


@pytest.mark.parametrize("counts, shown", [({"common": 30, "rare": 6}, True), ({"a": 12, "b": 10}, False)])
def test_finetune_prints_the_labelled_class_counts_when_they_are_imbalanced(ptft, tmp_path, counts, shown):
    data = {"name": "imagefolder", "root": str(image_classes(tmp_path / "images", counts)),
            "cache_dir": str(tmp_path / "cache"), "val_fraction": 0.2, "batch_size": 8, "labels_per_class": None}
    cfg = tiny_finetune_config(tmp_path / "run", None, data=data, train={"max_steps": 2, "eval_every_steps": 2})
    result = ptft("finetune", write_yaml(tmp_path / "ft.yaml", cfg), "--dry-run")
    assert result.code == 0, result.stderr
    names = list(counts)
    assert ("labelled examples per class" in result.stderr) is shown
    if shown:  # 20% of each class held out for validation: 24 and 5 left
        assert f"{names[0]} 24" in result.stderr and f"{names[1]} 5" in result.stderr
        assert "data.sampler" in result.stderr  # the note says what to do about it
