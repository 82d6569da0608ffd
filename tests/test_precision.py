"""Mixed precision changes the arithmetic of the model, nothing else: views, schedule and logs stay put."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from conftest import tiny_finetune_config, tiny_pretrain_config, write_yaml
from ptft.objectives.augment import Augment
from ptft.runtime import autocast

CPU = torch.device("cpu")
# Every kind of view: resampling (affine_grid's matmul and grid_sample), a blur convolution,
# colour arithmetic, cutout and noise; several of these autocast would run in bf16.
SIMCLR_LIKE = Augment(crop_scale=(0.3, 1.0), max_rotation=15.0, max_shift=0.1, flip_p=0.5, brightness=0.4,
                      contrast=0.4, saturation=0.4, hue=0.1, grayscale_p=0.2, blur_p=0.5, blur_kernel=3,
                      solarize_p=0.2, cutout=2, noise_std=0.05)


def test_augmented_views_are_the_same_in_fp32_and_bf16_for_one_seed():
    x = torch.rand(16, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    views = {}
    for precision in ("fp32", "bf16"):
        generator = torch.Generator().manual_seed(1)
        with autocast(precision, CPU):
            views[precision] = SIMCLR_LIKE(x, generator)
    assert views["bf16"].dtype == torch.float32
    assert torch.equal(views["fp32"], views["bf16"])


def _parts_with_fp16_scaler(grad_of_step):
    """An engine TrainParts stand-in: one weight, SGD, a step schedule, an enabled (CPU) GradScaler."""
    from ptft.engine import LoopSettings

    weight = torch.nn.Parameter(torch.ones(1))
    optimizer = torch.optim.SGD([{"params": [weight], "lr": 1.0, "name": "body"}])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** step)

    class Step(torch.nn.Module):
        def forward(self, x, y, generator):
            return (weight * grad_of_step(x)).sum(), {}

    batches = SimpleNamespace(batch=lambda i: (torch.full((1,), float(i)), torch.zeros(1)), steps_per_epoch=100)
    parts = SimpleNamespace(step_module=Step(), scaler=torch.amp.GradScaler("cpu", enabled=True, init_scale=2.0**8),
                            optimizer=optimizer, scheduler=scheduler, batches=batches, device=CPU)
    settings = LoopSettings(total_steps=3, steps_per_epoch=100, eval_every=10, log_every=10, save_every=None,
                            accumulate=1, grad_clip=None, precision="fp32", keep_last=1, seed=0, eval_batch_size=4)
    return parts, settings, weight


def test_scheduler_does_not_advance_on_a_step_the_fp16_scaler_skipped():
    from ptft.engine import _optimizer_step
    from ptft.rng import StepRandomness

    # Step 1's gradient is infinite: the scaler skips the update and lowers its scale.
    parts, settings, weight = _parts_with_fp16_scaler(lambda x: torch.where(x == 1, torch.inf, 1.0))
    rng = StepRandomness(0, CPU)
    lrs = []
    for step in range(3):
        _optimizer_step(parts, settings, step, rng)
        lrs.append(parts.optimizer.param_groups[0]["lr"])
    assert lrs == [0.5, 0.5, 0.25]  # the skipped step 1 left the schedule where it was
    assert parts.scheduler.last_epoch == 2
    assert weight.item() == pytest.approx(1.0 - 1.0 - 0.5)  # updates at lr 1 (step 0) and 0.5 (step 2) only


def test_logged_lr_names_each_group_when_their_rates_differ(tmp_path, ptft):
    single = write_yaml(tmp_path / "ae.yaml", tiny_pretrain_config(tmp_path / "ae", train={"max_steps": 5}))
    assert ptft("pretrain", single).code == 0
    record = json.loads((tmp_path / "ae" / "metrics.jsonl").read_text().splitlines()[0])
    assert "lr" in record and not any(key.startswith("lr/") for key in record)  # old metrics stay readable

    two = write_yaml(tmp_path / "ft.yaml", tiny_finetune_config(tmp_path / "ft", None, finetune={"head_lr": 0.5},
                                                                train={"max_steps": 5}))
    result = ptft("finetune", two)
    assert result.code == 0, result.stderr
    record = json.loads((tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()[0])
    assert record["lr/head"] == pytest.approx(0.5) and record["lr/body"] == pytest.approx(0.05)
    assert "lr" not in record  # one number would hide which group it is
