"""The online k-NN monitor: val/knn_acc against a brute-force reference, and as checkpoint.monitor."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from conftest import tiny_pretrain_config, write_yaml
from ptft.data.tensors import TensorSplit
from ptft.knn_monitor import KNN_K, KNN_TEMPERATURE, KnnMonitor

SHAPE = (1, 4, 4)


class LinearEncoderModel(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(SHAPE), 6))


def brute_force_knn_accuracy(bank_feats, bank_labels, feats, labels, k, temperature, num_classes) -> float:
    """One query at a time, in Python: the k most cosine-similar bank rows vote exp(similarity / T)."""
    correct = 0
    for query, label in zip(feats.tolist(), labels.tolist()):
        q = torch.tensor(query)
        similarities = [(float(q @ b / (q.norm() * b.norm())), int(c)) for b, c in zip(bank_feats, bank_labels)]
        votes = [0.0] * num_classes
        for similarity, c in sorted(similarities, key=lambda s: -s[0])[:k]:
            votes[c] += math.exp(similarity / temperature)
        correct += max(range(num_classes), key=lambda c: (votes[c], -c)) == label
    return correct / len(labels)


def test_knn_acc_matches_a_brute_force_reference_and_skips_unlabelled_bank_examples():
    g = torch.Generator().manual_seed(0)
    model = LinearEncoderModel().eval()
    bank_x, val_x = torch.rand((60, *SHAPE), generator=g), torch.rand((25, *SHAPE), generator=g)
    bank_y, val_y = torch.randint(0, 3, (60,), generator=g), torch.randint(0, 3, (25,), generator=g)
    bank_y[:10] = -1  # extra unlabelled images (stl10) are no neighbours
    metrics = KnnMonitor(TensorSplit(bank_x, bank_y), num_classes=3)(model, TensorSplit(val_x, val_y), batch_size=7)
    with torch.no_grad():
        expected = brute_force_knn_accuracy(model.encoder(bank_x[10:]), bank_y[10:], model.encoder(val_x), val_y,
                                            KNN_K, KNN_TEMPERATURE, 3)
    assert metrics == {"val/knn_acc": pytest.approx(expected)}
    assert 0 < expected < 1  # a check that can fail both ways


def test_knn_acc_picks_the_best_checkpoint_of_a_label_free_pretraining(tmp_path, ptft):
    config = write_yaml(tmp_path / "c.yaml", tiny_pretrain_config(
        tmp_path / "run", objective={"name": "vicreg"}, train={"max_steps": 12, "eval_every_steps": 3,
                                                               "knn_monitor": True},
        checkpoint={"monitor": "val/knn_acc", "keep_last": 1}))
    result = ptft("pretrain", config)
    assert result.code == 0, result.stderr
    evaluations = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
                   if "val/knn_acc" in r]
    assert [r["step"] for r in evaluations] == [3, 6, 9, 12]
    best = max(evaluations, key=lambda r: (r["val/knn_acc"], -r["step"]))  # the first of equal bests
    assert result.last_line.endswith(f"step-{best['step']:08d}")
    meta = json.loads((tmp_path / "run" / "checkpoints" / "best" / "meta.json").read_text())
    assert meta["best"]["monitor"] == "val/knn_acc" and meta["config"]["checkpoint"]["mode"] == "max"


def test_monitoring_knn_acc_without_the_monitor_is_refused_before_training(tmp_path, ptft):
    config = write_yaml(tmp_path / "c.yaml", tiny_pretrain_config(tmp_path / "run",
                                                                  checkpoint={"monitor": "val/knn_acc"}))
    result = ptft("pretrain", config)
    assert result.code == 2 and "checkpoint.monitor: 'val/knn_acc'" in result.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_large_bank_keeps_an_evenly_strided_subset_of_at_most_max_bank(monkeypatch):
    import ptft.knn_monitor as knn_monitor

    monkeypatch.setattr(knn_monitor, "MAX_BANK", 40)
    x, y = torch.arange(100.0).view(100, 1, 1, 1), torch.arange(100) % 4
    monitor = KnnMonitor(TensorSplit(x, y), num_classes=4)
    assert torch.equal(monitor.bank.x.flatten(), torch.arange(0.0, 100.0, 3))  # ceil(100 / 40) = 3: 34 rows
    assert torch.bincount(monitor.bank.y).tolist() == [9, 8, 8, 9]  # every class keeps its share
