"""The training loop on its own: `fit` over the parts `ptft pretrain` / `finetune` build (ptft.assembly).

Each test builds a tiny digits run with `build_run` + `build_train_parts`, watches the model
from hooks (what is frozen, which modules train) and reads back what `fit` wrote.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_finetune_config, tiny_pretrain_config, write_yaml
from ptft.assembly import Run, build_run, build_tracker, build_train_parts
from ptft.config import load_config
from ptft.engine import FitResult, fit
from ptft.errors import NonFiniteLossError
from ptft.meta import CheckpointMeta
from ptft.runtime import seed_everything


@pytest.fixture
def build(tmp_path):
    """build(config, stage, *overrides) -> (run, parts, settings), on the CPU, as the stages build them."""

    def make(config: dict, stage: str = "pretrain", *overrides: str):
        cfg = load_config(write_yaml(tmp_path / f"{stage}.yaml", config), list(overrides))
        seed_everything(cfg.run.seed)
        run = build_run(cfg, torch.device("cpu"), stage=stage)
        parts, settings = build_train_parts(run)
        return run, parts, settings

    return make


def run_fit(run: Run, parts, settings) -> FitResult:
    Path(run.cfg.run.dir).mkdir(parents=True)  # as the stage's run-directory checks leave it
    return fit(parts, settings, Path(run.cfg.run.dir), tracker=build_tracker(run.cfg),
               meta_base=CheckpointMeta(stage=run.stage))


def on_training_forward(model: torch.nn.Module, record) -> None:
    """Call record(model) before each training forward of `model` (validation runs in inference mode)."""
    model.register_forward_pre_hook(lambda module, args: None if torch.is_inference_mode_enabled() else record(module))


def step_dirs(run_dir: Path) -> list[str]:
    return sorted(path.name for path in (run_dir / "checkpoints").glob("step-*"))


def test_fit_runs_every_step_and_saves_last_and_best_on_schedule(build, tmp_path):
    config = tiny_pretrain_config(tmp_path / "run", checkpoint={"every_steps": 4, "keep_last": 10})
    run, parts, settings = build(config)  # 20 steps, validation at 10 and 20, a record every 5
    calls = []
    on_training_forward(parts.model, lambda model: calls.append(1))
    result = run_fit(run, parts, settings)
    assert result.step == 20 and len(calls) == 20 and not result.stopped_early
    # Every 4 steps, and at each validation that improved on the best (10 is the first: always).
    run_dir = tmp_path / "run"
    saved = step_dirs(run_dir)
    assert {f"step-{s:08d}" for s in (4, 8, 10, 12, 16, 20)} == set(saved)
    assert result.last == (run_dir / "checkpoints" / "last").resolve() == run_dir / "checkpoints" / "step-00000020"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [5, 10, 15, 20]
    validated = {r["step"]: r["val/loss"] for r in records if "val/loss" in r}
    best_step = min(validated, key=validated.get)
    assert result.best == (run_dir / "checkpoints" / "best").resolve() == run_dir / "checkpoints" / f"step-{best_step:08d}"


def test_freeze_schedule_is_honoured_at_the_unfreeze_step(build, tmp_path):
    config = tiny_finetune_config(tmp_path / "run", None, model={"name": "tiny_mlp_classifier", "batch_norm": True},
                                  finetune={"mode": "linear_probe", "unfreeze_at_step": 3},
                                  train={"max_steps": 5, "eval_every_steps": 5})
    run, parts, settings = build(config, "finetune")
    encoder = parts.model.encoder
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    seen = []

    def record(model):
        norms = [m for m in encoder.modules() if isinstance(m, torch.nn.BatchNorm1d)]
        seen.append((not any(p.requires_grad for p in encoder.parameters()), all(not m.training for m in norms)))
        if len(seen) == 3:  # the last frozen step: the encoder, running statistics included, is untouched
            assert all(torch.equal(v, before[k]) for k, v in encoder.state_dict().items())

    on_training_forward(parts.model, record)
    run_fit(run, parts, settings)
    # (encoder frozen, its batch norms in eval mode) per step 0..4: steps 0-2 frozen, from step 3 on training.
    assert seen == [(True, True)] * 3 + [(False, False)] * 2
    assert all(p.requires_grad for p in parts.model.head.parameters())


def test_evaluation_does_not_change_the_train_mode_state_of_training_steps(build, tmp_path):
    modes = {}
    for eval_every in (1, 100):  # validation after every step, or only after the last
        config = tiny_finetune_config(tmp_path / f"every{eval_every}", None,
                                      model={"name": "tiny_mlp_classifier", "batch_norm": True, "dropout": 0.1},
                                      # The per-step path: on precomputed features the model never runs in training.
                                      finetune={"mode": "linear_probe", "precompute_features": False},
                                      train={"max_steps": 4, "eval_every_steps": eval_every})
        run, parts, settings = build(config, "finetune")
        seen = modes.setdefault(eval_every, [])
        on_training_forward(parts.model, lambda model: seen.append([m.training for m in model.modules()]))
        run_fit(run, parts, settings)
    assert modes[1] == modes[100] and len(modes[1]) == 4
    assert len({tuple(step) for step in modes[1]}) == 1  # the same modes at every step
    assert True in modes[1][0] and False in modes[1][0]  # training, with the frozen batch norm in eval mode


def test_non_finite_loss_stops_the_run_naming_the_step(build, tmp_path):
    config = tiny_pretrain_config(tmp_path / "run", checkpoint={"every_steps": 5})
    run, parts, settings = build(config)
    calls = []

    def poison(module, args, output):  # the 7th training forward returns NaN
        if not torch.is_inference_mode_enabled():
            calls.append(1)
            return output * float("nan") if len(calls) == 7 else output

    parts.model.register_forward_hook(poison)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 7; .*step-00000005"):
        run_fit(run, parts, settings)
    run_dir = tmp_path / "run"
    assert step_dirs(run_dir) == ["step-00000005"]  # stopped at the record of step 10, before its save
    weights = load_file((run_dir / "checkpoints" / "last").resolve() / "model.safetensors")
    assert all(t.isfinite().all() for t in weights.values())
