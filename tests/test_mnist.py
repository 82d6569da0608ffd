"""Real MNIST from ../shared/data, end to end on a shrunken schedule (skips when the data is absent)."""

from __future__ import annotations

import json

from conftest import REPO


def test_mnist_pretrain_finetune_evaluate(shared_data, tmp_path, ptft):
    common = [f"data.root={shared_data}", "data.download=false"]
    pre = ptft("pretrain", REPO / "configs" / "mnist_ae.yaml", f"run.dir={tmp_path / 'ae'}", "train.epochs=null",
               "train.max_steps=30", "train.eval_every_steps=30", "model.hidden=[64]", *common)
    assert pre.code == 0, pre.stderr
    ft = ptft("finetune", REPO / "configs" / "mnist_finetune.yaml", f"run.dir={tmp_path / 'ft'}",
              f"init.checkpoint={pre.last_line}", "train.max_steps=20", "train.eval_every_steps=10",
              "model.hidden=[64]", *common)
    assert ft.code == 0, ft.stderr
    meta = json.loads((tmp_path / "ft" / "checkpoints" / "best" / "meta.json").read_text())
    assert meta["data"]["labelled_size"] == 100 and meta["data"]["dataset"] == "mnist"
    result = ptft("evaluate", tmp_path / "ft")
    assert result.code == 0, result.stderr
    metrics = json.loads(result.stdout)
    assert metrics["num_examples"] == 10_000 and metrics["accuracy"] > 0.3
