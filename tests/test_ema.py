"""EMA of weights (train.ema_decay): the average torch computes is the one written down, validated, saved,
handed on and resumed bitwise."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_finetune_config, tiny_pretrain_config, write_yaml
from ptft.assembly import build_run, build_tracker, build_train_parts
from ptft.config import load_config
from ptft.engine import fit
from ptft.meta import CheckpointMeta
from ptft.runtime import seed_everything

CPU = torch.device("cpu")
DECAY = 0.9
# Batch norm (averaged buffers), dropout and denoising noise (every step consumes randomness).
NOISY_BN = dict(model={"name": "tiny_mlp_autoencoder", "dropout": 0.1, "batch_norm": True},
                objective={"name": "denoising", "noise": "gaussian", "std": 0.2})


def _ema_config(run_dir: Path, **train) -> dict:
    return tiny_pretrain_config(run_dir, train={"ema_decay": DECAY, **train}, schedule={"name": "constant"},
                                **NOISY_BN)


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(Path(checkpoint).resolve() / "model.safetensors")


def _state(checkpoint: Path) -> dict:
    return torch.load(Path(checkpoint).resolve() / "state.pt", weights_only=True)


def _assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), f"{key} differs"


def test_ema_after_n_steps_equals_the_hand_computed_average_of_each_steps_weights(tmp_path):
    # accumulate=2: an update per optimizer step, never per micro-batch.
    cfg = load_config(write_yaml(tmp_path / "ema.yaml", _ema_config(tmp_path / "run", max_steps=12, accumulate=2)))
    seed_everything(cfg.run.seed)
    run = build_run(cfg, CPU, stage="pretrain")
    parts, settings = build_train_parts(run)
    seen = []  # the trained weights (and batch-norm buffers) after each optimizer step
    parts.optimizer.register_step_post_hook(
        lambda *_: seen.append({k: v.detach().clone() for k, v in parts.model.state_dict().items()}))
    Path(cfg.run.dir).mkdir(parents=True)
    result = fit(parts, settings, Path(cfg.run.dir), tracker=build_tracker(cfg), meta_base=CheckpointMeta())

    assert len(seen) == 12 and parts.ema.updates == 12
    expected = dict(seen[0])  # E_1 = W_1, then E_t = decay * E_{t-1} + (1 - decay) * W_t
    for weights in seen[1:]:
        expected = {k: DECAY * expected[k] + (1 - DECAY) * w if w.is_floating_point() else expected[k]
                    for k, w in weights.items()}
    averaged = parts.ema.model.state_dict()
    for key, value in expected.items():
        if value.is_floating_point():
            torch.testing.assert_close(averaged[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert any("running_mean" in key for key in expected)  # the buffers were averaged too
    _assert_bitwise_equal(_weights(result.last), {k: v.contiguous() for k, v in averaged.items()})


def test_a_step_the_fp16_scaler_skipped_leaves_the_ema_alone():
    from ptft.ema import ModelEma
    from ptft.engine import LoopSettings, _optimizer_step
    from ptft.rng import StepRandomness

    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.ones_(model.weight)

    class Step(torch.nn.Module):  # step 1's gradient is infinite: the scaler skips that update
        def forward(self, x, y, generator):
            return (model.weight * torch.where(x == 1, torch.inf, 1.0)).sum(), {}

    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    parts = SimpleNamespace(step_module=Step(), optimizer=optimizer, device=CPU,
                            scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
                            scaler=torch.amp.GradScaler("cpu", enabled=True, init_scale=2.0**8),
                            batches=SimpleNamespace(batch=lambda i: (torch.full((1,), float(i)), torch.zeros(1))),
                            ema=ModelEma(model, torch.nn.Module(), DECAY))
    settings = LoopSettings(total_steps=3, steps_per_epoch=100, eval_every=10, log_every=10, save_every=None,
                            accumulate=1, grad_clip=None, precision="fp32", keep_last=1, seed=0, eval_batch_size=4)
    rng = StepRandomness(0, CPU)
    for step in range(3):
        _optimizer_step(parts, settings, step, rng)
    assert parts.ema.updates == 2
    # W: 0 after step 0, unchanged by the skipped step 1, -1 after step 2.
    assert parts.ema.model.weight.item() == pytest.approx(DECAY * 0.0 + (1 - DECAY) * -1.0)


def test_resumed_ema_run_ends_bitwise_equal_to_the_unbroken_run(tmp_path, ptft):
    whole = write_yaml(tmp_path / "whole.yaml", _ema_config(tmp_path / "whole", max_steps=20))
    broken = write_yaml(tmp_path / "broken.yaml", _ema_config(tmp_path / "broken", max_steps=13))
    assert ptft("pretrain", whole).code == 0
    assert ptft("pretrain", broken).code == 0  # stopped at step 13, between validations
    resumed = ptft("pretrain", broken, "train.max_steps=20", "--resume")
    assert resumed.code == 0, resumed.stderr
    ends = [tmp_path / run / "checkpoints" / "last" for run in ("whole", "broken")]
    _assert_bitwise_equal(_weights(ends[0]), _weights(ends[1]))  # the average
    _assert_bitwise_equal(_state(ends[0])["ema"]["model"], _state(ends[1])["ema"]["model"])  # the trained weights
    assert _state(ends[1])["ema"]["n_averaged"] == 20
    bests = [(tmp_path / run / "checkpoints" / "best").resolve().name for run in ("whole", "broken")]
    assert bests[0] == bests[1]


def test_the_handed_on_checkpoint_holds_the_average_not_the_trained_weights(tmp_path, ptft):
    result = ptft("pretrain", write_yaml(tmp_path / "ema.yaml", _ema_config(tmp_path / "run")))
    assert result.code == 0, result.stderr
    handed_on = Path(result.last_line)
    saved, trained = _weights(handed_on), _state(handed_on)["ema"]["model"]
    assert saved.keys() == trained.keys()
    assert any(not torch.equal(saved[k], trained[k]) for k in saved if saved[k].is_floating_point())
    meta = json.loads((handed_on / "meta.json").read_text())
    assert meta["ema"] == {"decay": DECAY}
    # Validation scored the average: evaluating the saved weights gives the logged val/loss of that step.
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = next(r["val/loss"] for r in records if r["step"] == meta["step"] and "val/loss" in r)
    assert meta["metrics"]["val/loss"] == logged


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])  # finetune: a linear probe, its head on features
def test_val_loss_logged_with_ema_is_the_averaged_models_loss(tmp_path, stage):
    from ptft.scoring import evaluate_objective

    config = _ema_config(tmp_path / "run", max_steps=10) if stage == "pretrain" else tiny_finetune_config(
        tmp_path / "run", None, train={"ema_decay": DECAY}, finetune={"mode": "linear_probe"})
    cfg = load_config(write_yaml(tmp_path / "ema.yaml", config))
    seed_everything(cfg.run.seed)
    run = build_run(cfg, CPU, stage=stage)
    parts, settings = build_train_parts(run)
    Path(cfg.run.dir).mkdir(parents=True)
    fit(parts, settings, Path(cfg.run.dir), tracker=build_tracker(cfg), meta_base=CheckpointMeta())
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    averaged = evaluate_objective(parts, parts.val, settings)
    trained = evaluate_objective(SimpleNamespace(**{**vars(parts), "ema": None}), parts.val, settings)
    assert logged["val/loss"] == averaged["val/loss"] != trained["val/loss"]


def test_finetuning_from_an_ema_pretrain_loads_the_average(tmp_path, ptft):
    pre = ptft("pretrain", write_yaml(tmp_path / "pre.yaml", _ema_config(tmp_path / "pre")))
    assert pre.code == 0, pre.stderr
    # A linear probe keeps the encoder (and its batch-norm statistics) as loaded, so it shows what was loaded.
    config = tiny_finetune_config(tmp_path / "ft", pre.last_line, train={"ema_decay": 0.5},
                                  model={"name": "tiny_mlp_classifier", "batch_norm": True},
                                  finetune={"mode": "linear_probe"})
    ft = ptft("finetune", write_yaml(tmp_path / "ft.yaml", config))
    assert ft.code == 0, ft.stderr
    averaged, trained = _weights(pre.last_line), _state(pre.last_line)["ema"]["model"]
    finetuned = _weights(ft.last_line)
    encoder = [key for key in averaged if key.startswith("encoder.")]
    assert encoder and all(torch.equal(finetuned[key], averaged[key]) for key in encoder)
    assert any(not torch.equal(finetuned[key], trained[key]) for key in encoder)
    assert json.loads((Path(ft.last_line) / "meta.json").read_text())["ema"] == {"decay": 0.5}
    evaluated = ptft("evaluate", ft.last_line)
    assert evaluated.code == 0, evaluated.stderr


@pytest.mark.parametrize("value", ["1", "0", "-0.5", "1.5", "fast"])
def test_an_ema_decay_outside_zero_to_one_exits_2_naming_the_key(tmp_path, ptft, value):
    config = write_yaml(tmp_path / "ema.yaml", tiny_pretrain_config(tmp_path / "run"))
    result = ptft("pretrain", config, f"train.ema_decay={value}")
    assert result.code == 2
    assert "train.ema_decay" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_run_without_ema_writes_no_ema_field_and_old_meta_loads(tmp_path, ptft):
    from ptft.meta import CheckpointMeta

    result = ptft("pretrain", write_yaml(tmp_path / "plain.yaml", tiny_pretrain_config(tmp_path / "run")))
    assert result.code == 0, result.stderr
    meta = json.loads((Path(result.last_line) / "meta.json").read_text())
    assert "ema" not in meta and "ema" not in _state(result.last_line)
    assert CheckpointMeta.from_json(meta).ema is None


@pytest.mark.slow
def test_two_process_ema_run_saves_the_average_of_one_process(tmp_path, ptft):
    from test_distributed import EQUIVALENT, torchrun

    # Deterministic per-example losses (no noise, no batch norm): the runs agree up to summation order.
    settings = {**EQUIVALENT, "train": {**EQUIVALENT["train"], "ema_decay": DECAY}}
    single = write_yaml(tmp_path / "single.yaml", tiny_pretrain_config(tmp_path / "single", **settings))
    ddp = write_yaml(tmp_path / "ddp.yaml", tiny_pretrain_config(tmp_path / "ddp", **settings))
    assert ptft("pretrain", single).code == 0
    result = torchrun("pretrain", ddp)
    assert result.code == 0, result.stderr
    ends = [tmp_path / run / "checkpoints" / "last" for run in ("ddp", "single")]
    for ours, theirs in ((_weights(ends[0]), _weights(ends[1])),
                         (_state(ends[0])["ema"]["model"], _state(ends[1])["ema"]["model"])):
        assert ours.keys() == theirs.keys()  # the EMA wraps the module DDP wraps: no `module.` prefix
        for key in ours:
            torch.testing.assert_close(ours[key], theirs[key], atol=1e-5, rtol=0)
    assert _state(ends[0])["ema"]["n_averaged"] == 12
