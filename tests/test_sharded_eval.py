"""Under torchrun every rank validates and evaluates its own slice; the summed figures equal one process's.

The 2-process tests spawn gloo processes on the CPU (as tests/test_distributed.py does); each rank
records how many examples it looked at, so a test fails if one rank still does all the work.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch

from conftest import tiny_pretrain_config, write_yaml
from ptft import distributed as dist

# Validation of digits with half of it held out (~720 examples): three chunks of the chunked
# objectives (256 each) and twelve batches of 64 for the others, so both ranks get work.
SHARDED = dict(data={"name": "digits", "batch_size": 64, "val_fraction": 0.5, "eval_batch_size": 64},
               train={"max_steps": 4, "eval_every_steps": 4, "log_every_steps": 2, "knn_monitor": True})
OBJECTIVES = {
    "supervised": {"model": {"name": "tiny_mlp_classifier"}, "objective": {"name": "supervised"}},
    "denoising": {"model": {"name": "tiny_mlp_autoencoder"}, "objective": {"name": "denoising"}},
    "contrastive": {"model": {"name": "tiny_mlp_autoencoder"}, "objective": {"name": "contrastive"}},
}


def _config(run_dir: Path, objective: str):
    from ptft.config import config_from_dict

    sections = {**SHARDED, **OBJECTIVES[objective]}
    return config_from_dict(tiny_pretrain_config(run_dir, **sections), "sharded.yaml")


def _validate(run_dir: Path, objective: str) -> tuple[dict, int]:
    """val/* of a freshly seeded model (the same weights in every process) and the examples this rank saw."""
    from ptft.assembly import build_run, build_train_parts
    from ptft.scoring import evaluate_objective

    torch.manual_seed(0)
    run = build_run(_config(run_dir, objective), torch.device("cpu"), stage="pretrain")
    parts, settings = build_train_parts(run)
    seen = []
    forward = parts.objective.forward
    parts.objective.forward = lambda model, x, y, generator: seen.append(len(x)) or forward(model, x, y, generator)
    return evaluate_objective(parts, parts.val, settings), sum(seen)


def _in_two_processes(rank: int, rendezvous: str, out: str, objective: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2")
    torch.distributed.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=2)
    try:
        metrics, seen = _validate(Path(out) / "run", objective)
        (Path(out) / f"rank{rank}.json").write_text(json.dumps({"metrics": metrics, "seen": seen}))
        torch.distributed.barrier()  # leave together: gloo can abort a rank torn down mid-exchange
    finally:
        torch.distributed.destroy_process_group()


def _spawn(fn, tmp_path: Path, *args) -> list[dict]:
    torch.multiprocessing.spawn(fn, args=(f"file://{tmp_path / 'rendezvous'}", str(tmp_path), *args), nprocs=2)
    return [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def _assert_sliced(ranks: list[dict], total: int) -> None:
    seen = [rank["seen"] for rank in ranks]
    assert sum(seen) == total and all(0 < count < total for count in seen), seen  # each rank its own slice


@pytest.mark.parametrize("objective", ["supervised", pytest.param("denoising", marks=pytest.mark.slow),
                                       pytest.param("contrastive", marks=pytest.mark.slow)])
def test_two_ranks_validate_their_slices_and_report_one_process_figures(tmp_path, monkeypatch, objective):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    alone, total = _validate(tmp_path / "alone", objective)
    ranks = _spawn(_in_two_processes, tmp_path, objective)
    _assert_sliced(ranks, total)
    for rank in ranks:  # every rank holds the same figures: best and early stopping agree
        assert rank["metrics"].keys() == alone.keys() and "val/knn_acc" in alone
        assert rank["metrics"] == pytest.approx(alone, rel=1e-5, abs=1e-7)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _evaluate_in_two_processes(rank: int, port: str, out: str, run_dir: str) -> None:
    """`ptft evaluate` as torchrun starts it: the environment names rank, world and rendezvous."""
    from ptft import evaluation, probes, report

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=port)
    seen = []
    add, encode = report.ClassificationTally.add, probes.encode
    report.ClassificationTally.add = lambda self, logits, labels: seen.append(len(labels)) or add(self, logits, labels)
    probes.encode = lambda encoder, x, batch_size: seen.append(len(x)) or encode(encoder, x, batch_size)
    metrics = evaluation.evaluate(run_dir, [], split="test", out=Path(out) / "ddp" / "metrics.json")
    (Path(out) / f"rank{rank}.json").write_text(json.dumps({"metrics": metrics, "seen": sum(seen)}))


def _evaluate_both_ways(tmp_path: Path, ptft, model: str, objective: str) -> tuple[dict, dict, list[dict]]:
    config = write_yaml(tmp_path / "c.yaml", tiny_pretrain_config(
        tmp_path / "run", model={"name": model}, objective={"name": objective},
        data={"name": "digits", "batch_size": 64, "eval_batch_size": 32}, train={"max_steps": 6}))
    assert ptft("pretrain", config).code == 0
    alone = ptft("evaluate", tmp_path / "run", "--out", tmp_path / "alone" / "metrics.json")
    assert alone.code == 0, alone.stderr
    port = str(_free_port())
    torch.multiprocessing.spawn(_evaluate_in_two_processes, args=(port, str(tmp_path), str(tmp_path / "run")), nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    written = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    return json.loads((tmp_path / "alone" / "metrics.json").read_text()), written, ranks


def _assert_same_metrics(ours, theirs, key: str = "") -> None:
    """Equal JSON, floats within 1e-5 (a float sum over two slices is added in another order)."""
    if isinstance(ours, dict):
        assert ours.keys() == theirs.keys(), key
        for name in ours:
            if name != "files":  # paths: written elsewhere on purpose
                _assert_same_metrics(ours[name], theirs[name], f"{key}.{name}")
    elif isinstance(ours, list):
        assert len(ours) == len(theirs), key
        for index, (a, b) in enumerate(zip(ours, theirs)):
            _assert_same_metrics(a, b, f"{key}[{index}]")
    elif isinstance(ours, float):
        assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-7), key
    else:
        assert ours == theirs, key


@pytest.mark.slow
def test_evaluate_under_torchrun_counts_each_slice_once_and_writes_one_process_metrics(tmp_path, ptft, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    alone, written, ranks = _evaluate_both_ways(tmp_path, ptft, "tiny_mlp_classifier", "supervised")
    _assert_sliced(ranks, alone["num_examples"])
    _assert_same_metrics(written, alone)
    assert ranks[0]["metrics"] == ranks[1]["metrics"] == written  # every rank returns what rank 0 wrote
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == ["confusion_matrix.png", "metrics.json"]


@pytest.mark.slow
def test_evaluate_of_an_autoencoder_under_torchrun_equals_one_process(tmp_path, ptft, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    alone, written, ranks = _evaluate_both_ways(tmp_path, ptft, "tiny_mlp_autoencoder", "reconstruction")
    # Both ranks encode their slice of the labelled examples and of the test split for the probes.
    train_examples = alone["probe_train_examples"]
    _assert_sliced(ranks, train_examples + alone["num_examples"])
    _assert_same_metrics(written, alone)
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == ["metrics.json", "reconstructions.png"]


def _build_at_once(rank: int, rendezvous: str, out: str, download: bool) -> None:
    """Each rank builds a run's data; rank 0's build waits (up to 10 s) for rank 1's to have started."""
    from ptft import assembly
    from ptft.config import config_from_dict

    os.environ.update(RANK=str(rank), WORLD_SIZE="2")
    torch.distributed.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=2)
    started, real_build = Path(out) / "rank1-started", assembly.build_data
    events = []

    def build_data(data_cfg, device, **options):
        if rank == 1:
            started.touch()
        deadline = time.monotonic() + 10
        while rank == 0 and not started.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        events.append(started.exists())
        return real_build(data_cfg, device, **options)

    assembly.build_data = build_data
    try:
        cfg = config_from_dict(tiny_pretrain_config(Path(out) / "run", data={"name": "digits", "download": download}),
                               "c.yaml")
        assembly.build_run(cfg, torch.device("cpu"), stage="pretrain")
        (Path(out) / f"rank{rank}.json").write_text(json.dumps({"rank1_started_first": events[0]}))
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("download, together", [(False, True), pytest.param(True, False, marks=pytest.mark.slow)])
def test_ranks_decode_their_data_at_once_and_wait_only_for_a_download(tmp_path, download, together):
    # Without data.download no rank waits on a collective while another builds its data; with it,
    # rank 0 fetches the files first and the others start when that has finished.
    torch.multiprocessing.spawn(_build_at_once, args=(f"file://{tmp_path / 'rendezvous'}", str(tmp_path), download),
                                nprocs=2)
    assert json.loads((tmp_path / "rank0.json").read_text()) == {"rank1_started_first": together}


def test_shards_are_whole_batches_in_rank_order_covering_every_row(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    for rows, batch in [(720, 256), (10, 4), (2, 64), (0, 8), (9, 1)]:
        shards = []
        for rank in range(3):
            monkeypatch.setenv("RANK", str(rank))
            shards.append(dist.shard_rows(rows, batch))
        assert [index for shard in shards for index in range(rows)[shard]] == list(range(rows))
        assert all(shard.start % batch == 0 for shard in shards if shard.start < rows)  # one process's batches
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert dist.shard_rows(720, 256) == slice(0, 720)


def test_a_rank_interrupted_under_torchrun_says_so_once(tmp_path, ptft, monkeypatch):
    from ptft import stages
    from ptft.errors import TrainingInterrupted

    def interrupted(*args, **kwargs):
        raise TrainingInterrupted(str(tmp_path / "checkpoints" / "step-00000010"))

    monkeypatch.setattr(stages, "train", interrupted)
    config = write_yaml(tmp_path / "c.yaml", tiny_pretrain_config(tmp_path / "run"))
    for rank, said in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        result = ptft("pretrain", config)
        assert result.code == 130 and ("interrupted" in result.stderr) is said, result.stderr
