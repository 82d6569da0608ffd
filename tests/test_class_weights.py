"""objective.class_weights for the supervised objective: balanced (n / (C * n_c)) or one weight per class."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score
from torch import nn

from conftest import tiny_finetune_config, write_yaml
from ptft.data.batches import DeviceBatches
from ptft.errors import UserError
from ptft.objectives import EVAL_CHUNK_SIZE, OBJECTIVES

SHAPE = (1, 1, 2)  # two features as a 1x2 "image": the objective's interface, a linear model's problem


class LinearClassifier(nn.Module):
    """The classifier interface (encoder with out_features, head) around one linear layer."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.encoder = nn.Flatten()
        self.encoder.out_features = math.prod(SHAPE)
        self.head = nn.Linear(math.prod(SHAPE), num_classes)

    def forward(self, x):
        return self.head(self.encoder(x))


def supervised(num_classes: int = 3, **options):
    model = LinearClassifier(num_classes)
    return model, OBJECTIVES.get("supervised")(model, SHAPE, **options)


def imbalanced_blobs(counts: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Overlapping Gaussian blobs, `counts[c]` points of class c, as (N, 1, 1, 2) images and (N,) labels."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[0.0, 0.0], [1.5, 0.0]])
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    x = centres[y] + torch.randn(len(y), 2, generator=generator)
    return x.view(-1, *SHAPE), y


def train_and_score(class_weights, steps: int = 300, sampler: str = "random") -> float:
    """Macro-F1 on a balanced test set after SGD on a 10:1 imbalanced train set.

    Batches of 128: uniform draws with replacement (random), or data.sampler balanced's batches.
    """
    torch.manual_seed(0)
    model, objective = supervised(2, class_weights=class_weights)
    x, y = imbalanced_blobs([1000, 100], seed=1)
    objective.fit_to_labels(y)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    generator = torch.Generator().manual_seed(0)
    order = torch.Generator().manual_seed(2)
    balanced = DeviceBatches(x, y, 128, seed=2, sampler="balanced") if sampler == "balanced" else None
    for step in range(steps):
        if balanced is None:
            batch = torch.randint(len(y), (128,), generator=order)
            xb, yb = x[batch], y[batch]
        else:
            xb, yb = balanced.batch(step)
        loss, _ = objective(model, xb, yb, generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    test_x, test_y = imbalanced_blobs([1000, 1000], seed=3)
    with torch.no_grad():
        predictions = model(test_x).argmax(1)
    return f1_score(test_y.numpy(), predictions.numpy(), average="macro")


def test_balanced_weights_raise_macro_f1_on_a_10_to_1_imbalance(one_thread):
    plain, balanced = train_and_score(None), train_and_score("balanced")
    # Measured: 0.575 unweighted (most of the minority class is predicted as the majority), 0.780 balanced.
    assert balanced > plain + 0.1, (plain, balanced)


def test_balanced_weights_are_n_over_classes_times_class_count():
    _, objective = supervised(3, class_weights="balanced")
    objective.fit_to_labels(torch.tensor([0] * 60 + [1] * 30 + [2] * 10))
    expected = torch.tensor([100 / (3 * 60), 100 / (3 * 30), 100 / (3 * 10)])
    torch.testing.assert_close(objective.class_weight, expected)


def test_weighted_loss_is_cross_entropy_with_those_weights_and_accuracy_stays_unweighted():
    model, objective = supervised(3, class_weights=[1.0, 2.0, 5.0], label_smoothing=0.1)
    x, y = torch.randn(12, *SHAPE, generator=torch.Generator().manual_seed(0)), torch.arange(12) % 3
    loss, logs = objective(model, x, y, torch.Generator().manual_seed(0))
    logits = model(x)
    torch.testing.assert_close(loss, F.cross_entropy(logits, y, weight=torch.tensor([1.0, 2.0, 5.0]),
                                                     label_smoothing=0.1))
    assert logs["acc"] == (logits.argmax(1) == y).float().mean()


def test_weighted_validation_uses_a_fixed_chunk_size_and_plain_does_not():
    # A weighted mean per batch depends on where batches start; data.eval_batch_size may change on resume.
    assert supervised(3, class_weights="balanced")[1].eval_chunk_size == EVAL_CHUNK_SIZE
    assert supervised(3, class_weights=[1.0, 1.0, 2.0])[1].eval_chunk_size == EVAL_CHUNK_SIZE
    assert supervised(3)[1].eval_chunk_size is None


def test_fitting_is_a_no_op_without_balanced_weights():
    for weights in (None, [1.0, 2.0, 3.0]):
        _, objective = supervised(3, class_weights=weights)
        objective.fit_to_labels(torch.tensor([0, 0, 0, 1]))
        expected = None if weights is None else torch.tensor(weights)
        assert (objective.class_weight is None) if expected is None else torch.equal(objective.class_weight, expected)


def test_weights_are_not_saved_in_the_checkpoint():
    # They follow from the config and the recorded labelled subset; checkpoints keep one set of keys.
    _, objective = supervised(3, class_weights=[1.0, 2.0, 3.0])
    assert objective.state_dict() == {}


@pytest.mark.parametrize("weights, expected", [
    ([1.0, 2.0], "3 positive weights"),
    ([1.0, 0.0, 2.0], "3 positive weights"),
    ([1.0, -1.0, 2.0], "3 positive weights"),
    ([1.0, float("nan"), 2.0], "3 positive weights"),
])
def test_a_weight_list_needs_one_positive_weight_per_class(weights, expected):
    with pytest.raises(UserError, match=rf"objective\.class_weights: expected 'balanced' or {expected}"):
        supervised(3, class_weights=weights)


def test_balanced_needs_every_class_in_the_labelled_subset():
    _, objective = supervised(4, class_weights="balanced")
    with pytest.raises(UserError, match=r"objective\.class_weights: 'balanced' .* class\(es\) 1, 3 have none"):
        objective.fit_to_labels(torch.tensor([0, 0, 2]))


def test_balanced_weights_used_before_fitting_are_an_internal_error():
    model, objective = supervised(3, class_weights="balanced")
    with pytest.raises(RuntimeError, match="fit_to_labels"):
        objective(model, torch.zeros(2, *SHAPE), torch.tensor([0, 1]), torch.Generator())


def test_wrong_number_of_weights_exits_2_naming_the_key(ptft, tmp_path):
    cfg = tiny_finetune_config(tmp_path / "run", None, objective={"name": "supervised", "class_weights": [1, 2]})
    result = ptft("finetune", write_yaml(tmp_path / "ft.yaml", cfg), "--dry-run")
    assert result.code == 2
    assert "objective.class_weights" in result.stderr and "10 positive weights" in result.stderr
    assert "Traceback" not in result.stderr


def test_config_accepts_balanced_and_a_list_and_refuses_other_words(ptft, tmp_path):
    path = write_yaml(tmp_path / "ft.yaml", tiny_finetune_config(tmp_path / "run", None))
    assert "class_weights: balanced" in ptft("config", path, "objective.class_weights=balanced").stdout
    assert "class_weights: [1.0, 2.0]" in ptft("config", path, "objective.class_weights=[1, 2]").stdout
    refused = ptft("config", path, "objective.class_weights=inverse")
    assert refused.code == 2 and "objective.class_weights" in refused.stderr


@pytest.mark.parametrize("unlabelled", ["none", "fixmatch"])
def test_balanced_weights_finetune_through_the_cli(ptft, tmp_path, unlabelled):
    cfg = tiny_finetune_config(tmp_path / "run", None, objective={"name": "supervised", "class_weights": "balanced"},
                               finetune={"unlabelled": unlabelled, "unlabelled_ratio": 1})
    result = ptft("finetune", write_yaml(tmp_path / "ft.yaml", cfg))
    assert result.code == 0, result.stderr
    assert result.last_line.endswith(("step-00000005", "step-00000010"))
