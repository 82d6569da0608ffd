"""The same commands under torchrun: 2 gloo processes on the CPU train, save and evaluate like 1 process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import REPO, CliResult, tiny_pretrain_config, write_yaml
from ptft import distributed as dist
from ptft.rng import StepRandomness, step_seed
from ptft.errors import UserError

# Deterministic per-example losses (no noise, no batch norm): DDP's averaged slice gradients
# then equal the global batch's gradient, and the runs agree up to float summation order.
# accumulate and grad_clip exercise DDP's no_sync and clipping of the all-reduced gradient.
EQUIVALENT = dict(train={"max_steps": 12, "eval_every_steps": 6, "log_every_steps": 3, "accumulate": 2,
                         "grad_clip": 1.0},
                  checkpoint={"every_steps": 4, "keep_last": 2})


def torchrun(*args: str, nproc: int = 2, timeout: float = 180) -> CliResult:
    """`torchrun --standalone --nproc_per_node=N -m ptft ARGS...`, one thread per process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "ptft", *map(str, args)]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=timeout, env=env)
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def _last_weights(run_dir: Path) -> dict:
    return load_file((run_dir / "checkpoints" / "last").resolve() / "model.safetensors")


def _assert_weights_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()  # no `module.` prefix from DDP
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0, msg=lambda m: f"{key}: {m}")


def _layout(run_dir: Path) -> dict[str, str]:
    """Relative path -> what it is (pointers by their target), for every entry of a run directory."""
    return {str(p.relative_to(run_dir)): (os.readlink(p) if p.is_symlink() else "dir" if p.is_dir() else "file")
            for p in sorted(run_dir.rglob("*"))}


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# In the default run again: ranks now leave the process group together (a barrier before
# destroy_process_group); without it a rank sometimes aborted at gloo teardown, and 30 repeats
# on an idle machine plus 10 runs of every 2-process test under load were then all clean.
def test_two_processes_train_save_and_evaluate_like_one(tmp_path, ptft):
    single = write_yaml(tmp_path / "single.yaml", tiny_pretrain_config(tmp_path / "single", **EQUIVALENT))
    ddp = write_yaml(tmp_path / "ddp.yaml", tiny_pretrain_config(tmp_path / "ddp", **EQUIVALENT))
    assert ptft("pretrain", single).code == 0
    result = torchrun("pretrain", ddp)
    assert result.code == 0, result.stderr
    assert result.stdout.splitlines() == [str(tmp_path / "ddp" / "checkpoints" / "step-00000012")]  # rank 0 only
    assert _layout(tmp_path / "ddp") == _layout(tmp_path / "single")
    _assert_weights_close(_last_weights(tmp_path / "ddp"), _last_weights(tmp_path / "single"))
    saved = yaml.safe_load((tmp_path / "ddp" / "config.yaml").read_text())
    assert saved == {**yaml.safe_load((tmp_path / "single" / "config.yaml").read_text()),
                     "run": {**saved["run"], "dir": str(tmp_path / "ddp")}}
    ddp_log, single_log = _metrics(tmp_path / "ddp"), _metrics(tmp_path / "single")
    assert [r.keys() for r in ddp_log] == [r.keys() for r in single_log]
    def measured(record: dict) -> dict:  # perf/*: wall-clock throughput, never equal between two runs
        return {k: v for k, v in record.items() if not k.startswith("perf/")}

    for ours, theirs in zip(ddp_log, single_log):  # train/loss reduced over ranks, val/* as one process
        assert measured(ours) == pytest.approx(measured(theirs), rel=1e-5, abs=1e-7)
    evaluated = [json.loads(ptft("evaluate", tmp_path / run).last_line) for run in ("ddp", "single")]
    for key in ("mse", "psnr", "knn_accuracy", "linear_probe_accuracy"):
        assert evaluated[0][key] == pytest.approx(evaluated[1][key], rel=1e-4), key


@pytest.mark.slow
@pytest.mark.parametrize("first, then", [(2, 1), (1, 2)])
def test_checkpoint_of_n_processes_resumes_with_m(tmp_path, ptft, first, then):
    reference = write_yaml(tmp_path / "ref.yaml", tiny_pretrain_config(tmp_path / "ref", **EQUIVALENT))
    config = write_yaml(tmp_path / "c.yaml", tiny_pretrain_config(tmp_path / "run", **EQUIVALENT))
    launch = {1: lambda *a: ptft(*a), 2: lambda *a: torchrun(*a)}
    assert ptft("pretrain", reference).code == 0
    assert launch[first]("pretrain", config, "train.max_steps=8").code == 0
    resumed = launch[then]("pretrain", config, "--resume")
    assert resumed.code == 0, resumed.stderr
    assert "resuming" in resumed.stderr and resumed.last_line.endswith("step-00000012")
    _assert_weights_close(_last_weights(tmp_path / "run"), _last_weights(tmp_path / "ref"))
    steps = [r["step"] for r in _metrics(tmp_path / "run")]
    assert steps == sorted(set(steps)) and steps[-1] == 12  # one record a step, written by rank 0 alone


def _assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


@pytest.mark.slow
def test_two_process_run_with_dropout_resumes_bitwise_equal(tmp_path):
    # Dropout draws from each rank's global torch RNG; rank 1's stream must not depend on where
    # the run was last started. Accumulation: two forward passes, two streams a step.
    settings = dict(model={"name": "tiny_mlp_autoencoder", "dropout": 0.3},
                    train={"max_steps": 8, "eval_every_steps": 4, "log_every_steps": 2, "accumulate": 2},
                    checkpoint={"every_steps": 2})
    reference = write_yaml(tmp_path / "ref.yaml", tiny_pretrain_config(tmp_path / "ref", **settings))
    config = write_yaml(tmp_path / "c.yaml", tiny_pretrain_config(tmp_path / "run", **settings))
    assert torchrun("pretrain", reference).code == 0
    assert torchrun("pretrain", config, "train.max_steps=4").code == 0
    resumed = torchrun("pretrain", config, "--resume")
    assert resumed.code == 0, resumed.stderr
    assert resumed.last_line.endswith("step-00000008")
    _assert_bitwise_equal(_last_weights(tmp_path / "run"), _last_weights(tmp_path / "ref"))


@pytest.mark.slow
def test_evaluate_under_torchrun_prints_and_writes_once(tmp_path, ptft):
    config = write_yaml(tmp_path / "c.yaml", tiny_pretrain_config(tmp_path / "run"))
    assert ptft("pretrain", config).code == 0
    alone = json.loads(ptft("evaluate", tmp_path / "run", "--out", tmp_path / "alone.json").last_line)
    result = torchrun("evaluate", tmp_path / "run", "--out", tmp_path / "ddp.json")
    assert result.code == 0, result.stderr
    assert len(result.stdout.splitlines()) == 1
    together = json.loads(result.stdout)
    assert {**together, "files": None} == {**alone, "files": None}


@pytest.mark.slow
def test_non_finite_loss_stops_every_rank_with_exit_2(tmp_path):
    config = write_yaml(tmp_path / "c.yaml", tiny_pretrain_config(
        tmp_path / "run", train={"max_steps": 50, "eval_every_steps": 5}, optim={"name": "sgd", "lr": 1e30},
        model={"name": "tiny_mlp_classifier"}, objective={"name": "supervised"}))
    result = torchrun("pretrain", config, timeout=120)  # a hung rank would time out here
    assert result.code != 0 and "non-finite loss at step" in result.stderr, result.stderr
    assert "NonFiniteLossError" not in result.stderr  # reported as a user error, no worker traceback
    last = tmp_path / "run" / "checkpoints" / "last"
    if last.exists():
        assert all(t.isfinite().all() for t in load_file(last.resolve() / "model.safetensors").values())


@pytest.mark.slow
def test_objectives_and_freezing_that_leave_parameters_unused_run_under_ddp(tmp_path, ptft):
    contrastive = write_yaml(tmp_path / "con.yaml", tiny_pretrain_config(
        tmp_path / "con", objective={"name": "contrastive"}, train={"max_steps": 4, "eval_every_steps": 2}))
    assert torchrun("pretrain", contrastive).code == 0
    probe = dict(data={"name": "digits", "batch_size": 64}, model={"name": "tiny_mlp_classifier"},
                 objective={"name": "supervised"}, finetune={"mode": "linear_probe", "unfreeze_at_step": 4},
                 train={"max_steps": 8, "eval_every_steps": 4})
    config = {**tiny_pretrain_config(tmp_path / "ddp", **probe), "init": {"checkpoint": str(tmp_path / "con")}}
    write_yaml(tmp_path / "ddp.yaml", config)
    write_yaml(tmp_path / "single.yaml", {**config, "run": {"dir": str(tmp_path / "single"), "seed": 0}})
    assert ptft("finetune", tmp_path / "single.yaml").code == 0
    result = torchrun("finetune", tmp_path / "ddp.yaml")
    assert result.code == 0, result.stderr
    _assert_weights_close(_last_weights(tmp_path / "ddp"), _last_weights(tmp_path / "single"))


def test_only_rank_0_prints_and_writes_metrics(monkeypatch, tmp_path, capsys):
    from ptft import console, loggers
    from ptft.rundir import RunDir

    records = tmp_path / "metrics.jsonl"
    records.write_text('{"step": 5}\n{"step": 10}\n')
    for rank in ("1", "0"):
        monkeypatch.setenv("RANK", rank)
        console.note(f"note of rank {rank}")
        console.write_stdout(f"result of rank {rank}\n")
        console.print_key_report([("loaded", 1, "encoder.weight")], f"weights of rank {rank}")
        loggers.open_loggers(["jsonl"], RunDir(tmp_path), resume_step=5).log(6, {"step": 6, "rank": int(rank)})
        if rank == "1":  # a null writer: nothing said, the log neither truncated nor appended to
            assert capsys.readouterr() == ("", "")
            assert records.read_text() == '{"step": 5}\n{"step": 10}\n'
    out, err = capsys.readouterr()
    assert out == "result of rank 0\n" and "note of rank 0" in err and "weights of rank 0" in err
    assert records.read_text() == '{"step": 5}\n{"rank": 0, "step": 6}\n'


def test_global_batch_must_split_evenly_over_processes(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    dist.check_global_batch(64, 1000)
    with pytest.raises(UserError, match="data.batch_size: the global batch of 63 examples does not split"):
        dist.check_global_batch(63, 1000)
    with pytest.raises(UserError, match="the whole training split of 21 examples"):
        dist.check_global_batch(64, 21)


def test_each_rank_draws_noise_and_dropout_from_seed_rank_and_step_alone(monkeypatch):
    assert step_seed(0, 5, 1) == step_seed(0, 5, 1, rank=0) != step_seed(0, 5, 1, rank=1)
    draws = {}
    with torch.random.fork_rng():
        for rank, history in (("0", 0), ("1", 0), ("1", 5)):
            monkeypatch.setenv("RANK", rank)
            torch.manual_seed(history)  # whatever the global stream held before: another start step
            torch.rand(history)
            generator = StepRandomness(run_seed=0, device=torch.device("cpu")).reseed(step=7, micro=1)
            objective_draw, model_draw = torch.rand(3, generator=generator), torch.rand(3)  # noise, dropout
            draws.setdefault(rank, []).append(torch.cat([objective_draw, model_draw]))
    assert torch.equal(draws["1"][0], draws["1"][1])  # no dependence on history
    assert not torch.equal(draws["0"][0][:3], draws["1"][0][:3])  # ranks: their own noise...
    assert not torch.equal(draws["0"][0][3:], draws["1"][0][3:])  # ...and their own dropout
    assert not torch.equal(draws["0"][0][:3], draws["0"][0][3:])  # two unrelated streams


def _agree(rank: int, rendezvous: str) -> None:
    """Runs in each of 2 spawned processes: the decisions every rank must share."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2")
    torch.distributed.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=2)
    try:
        assert dist.any_rank(rank == 1) is True and dist.any_rank(False) is False
        assert dist.earliest(7 if rank == 1 else -1) == 7 and dist.earliest(-1) == -1
        assert dist.average(torch.tensor(float(rank))).item() == 0.5
        assert dist.on_writer(lambda: f"from rank {dist.rank()}") == "from rank 0"
        with pytest.raises(UserError, match="run.dir: taken"):
            dist.on_writer(lambda: (_ for _ in ()).throw(UserError("run.dir: taken")))
        torch.distributed.barrier()  # leave together: gloo can abort a rank torn down mid-exchange
    finally:
        torch.distributed.destroy_process_group()


def test_ranks_agree_on_stops_steps_and_rank_0_results(tmp_path):
    torch.multiprocessing.spawn(_agree, args=(f"file://{tmp_path / 'rendezvous'}",), nprocs=2)


def test_dist_timeout_reaches_the_process_group_and_the_gloo_control_group(monkeypatch, tmp_path):
    from ptft.config import config_from_dict

    calls: list[tuple[str, dict]] = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "_rank_device", lambda spec: "cuda:0")  # the NCCL + gloo control group path
    monkeypatch.setattr(dist.tdist, "init_process_group", lambda **kw: calls.append(("init", kw)))
    monkeypatch.setattr(dist.tdist, "new_group", lambda **kw: calls.append(("group", kw)))
    monkeypatch.setattr(dist.tdist, "barrier", lambda *a, **kw: None)
    monkeypatch.setattr(dist.tdist, "destroy_process_group", lambda *a, **kw: None)
    train = config_from_dict(tiny_pretrain_config(tmp_path), "t.yaml", ["train.dist_timeout_s=5"]).train
    with dist.session("cuda", timeout_s=train.dist_timeout_s):
        pass
    assert [(name, kw["timeout"].total_seconds()) for name, kw in calls] == [("init", 5.0), ("group", 5.0)]
    default = config_from_dict(tiny_pretrain_config(tmp_path), "t.yaml").train.dist_timeout_s
    assert default >= 3600  # rank 0 may validate or save for long: far above torch's 10/30 minutes


def test_ranks_exchange_the_interrupt_flag_only_every_few_steps(monkeypatch):
    asked: list[bool] = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "any_rank", lambda flag: asked.append(flag) or flag)
    seen = [dist.any_rank_every(True, step, every=5) for step in range(1, 21)]
    assert len(asked) == 4 and seen == [step % 5 == 0 for step in range(1, 21)]
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: the flag itself at every step, no exchange
    assert all(dist.any_rank_every(True, step, every=5) for step in range(1, 6)) and len(asked) == 4


@pytest.mark.slow
def test_a_linear_probe_all_reduces_only_the_head_until_it_unfreezes(tmp_path):
    probe = dict(data={"name": "digits", "batch_size": 64}, model={"name": "tiny_mlp_classifier"},
                 objective={"name": "supervised"}, finetune={"mode": "linear_probe", "unfreeze_at_step": 4},
                 train={"max_steps": 8, "eval_every_steps": 8, "log_every_steps": 8})
    config = write_yaml(tmp_path / "probe.yaml", {**tiny_pretrain_config(tmp_path / "run", **probe),
                                                   "init": {"checkpoint": None}})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(REPO / "tests" / "ddp_comm_counter.py"), str(tmp_path), "finetune", str(config)]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    weights = _last_weights(tmp_path / "run")
    head = sum(t.numel() for key, t in weights.items() if key.startswith("head."))
    everything = sum(t.numel() for t in weights.values())
    for rank in (0, 1):
        counts = json.loads((tmp_path / f"rank{rank}.json").read_text())
        # Steps 1-4 train the head alone, 5-8 everything: DDP rebuilt once, at the unfreeze.
        assert counts["floats"] == 4 * head + 4 * everything, counts


@pytest.mark.parametrize("outcome, code", [(None, 0), (SystemExit(0), 0), (SystemExit(2), 2), (SystemExit(130), 130),
                                           (SystemExit("bad"), 1)])
def test_a_torchrun_process_leaves_with_its_exit_code_and_no_interpreter_teardown(outcome, code, monkeypatch, capsys):
    from ptft import cli

    def run():
        print("done")
        if outcome is not None:
            raise outcome

    exits = []
    monkeypatch.setattr(cli.os, "_exit", exits.append)
    cli._exit_without_teardown(run)
    assert exits == [code]
    captured = capsys.readouterr()
    assert captured.out == "done\n" and captured.err == ("bad\n" if code == 1 else "")
