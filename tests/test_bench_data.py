"""scripts/bench_data.py: the folders it builds and the memory figures it reports (tiny sizes)."""

from __future__ import annotations

import collections
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))

import bench_data  # noqa: E402  (a script, importable once scripts/ is on the path)

MIB = 2**20


def test_rgb_folder_holds_a_sixth_of_each_class_out_as_its_test_split(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_data, "RGB_SIZE", 16)
    root = bench_data.build_rgb_folder(tmp_path / "rgb", 48, classes=4)
    train, test = sorted((root / "train").rglob("*.jpg")), sorted((root / "test").rglob("*.jpg"))
    count = collections.Counter
    assert count(path.parent.name for path in train) == {f"c{c}": 10 for c in range(4)}
    assert count(path.parent.name for path in test) == {f"c{c}": 2 for c in range(4)}


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RssAnon and RssFile in /proc")
def test_status_reads_a_live_process_peak_private_and_file_memory_and_nothing_once_it_is_gone():
    mine = bench_data._status_kib(os.getpid())
    assert set(mine) == {"VmHWM", "RssAnon", "RssFile"} and mine["RssAnon"] > 0 and mine["RssFile"] > 0
    assert mine["VmHWM"] >= mine["RssAnon"] + mine["RssFile"] - 1024  # the peak, give or take a moment's growth
    assert bench_data._status_kib(2**22 + 1) == {}  # above pid_max's default: no such process


def test_memory_rows_show_each_placement_and_both_budget_verdicts():
    def run(rss: int, private: int) -> dict:
        return {"peak_rss_bytes": rss * MIB, "peak_private_bytes": private * MIB,
                "peak_file_bytes": (rss - private) * MIB, "wall_s": 1.0}

    memory = {"steps": 10, "batch_size": 32, "host": run(600, 450), "device": run(2100, 1900),
              "budget": {**run(1700, 500), "budget_bytes": 700 * MIB, "cache_bytes": 1400 * MIB,
                         "rss_under_budget": False, "private_under_budget": True}}
    report = {"cores": 2, "device": "cpu", "torch": "x", "channels": "8,16", "folders": {}, "memory": memory}
    text = bench_data.format_report(report)
    assert "10 steps, host     600 MiB peak RSS (private 450, mapped file 150)" in text
    assert "10 steps, device   2,100 MiB peak RSS (private 1,900, mapped file 200)" in text
    assert "700 MiB for a 1,400 MiB cache: peak RSS OVER it, private memory under it" in text


@pytest.mark.slow  # three `ptft pretrain` subprocesses, each its own torch import
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="samples /proc/<pid>/status")
def test_bench_measures_host_and_device_runs_and_an_epoch_against_the_budget(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench_data, "RGB_SIZE", 32)  # 3 KiB an image: the whole bench in seconds
    # Resident here while the children run: a child's measure that inherited this process's peak
    # (as getrusage's ru_maxrss does across exec) would read above it.
    ballast = torch.ones(1200 * MIB, dtype=torch.uint8)
    out = tmp_path / "bench.json"
    code = bench_data.main(["--skip-fashion", "--rgb-images", "60", "--memory-steps", "2", "--budget-mib", "4096",
                            "--keep", str(tmp_path / "work"), "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    memory, cache = report["memory"], report["folders"]["rgb"]["cache"]
    assert memory["steps"] == 2 and "epoch" not in report  # no fashion folder, no epoch comparison
    for run in (memory["host"], memory["device"], memory["budget"]):
        # The child's own peak: a Python with torch imported holds well over 50 MiB, and none of ours.
        assert 50 * MIB < run["peak_rss_bytes"] < ballast.numel()
        assert 0 < run["peak_private_bytes"] <= run["peak_rss_bytes"]
        assert 0 < run["peak_file_bytes"] <= run["peak_rss_bytes"]
    budget = memory["budget"]
    assert budget["budget_bytes"] == 4096 * MIB and budget["cache_bytes"] == cache["cache_bytes"]
    # The pixels, each image's digest (16 bytes) and channel sums (3 x 2 int64), and three .npy headers.
    assert 0 <= cache["cache_bytes"] - 60 * (3 * 32 * 32 + 16 + 3 * 2 * 8) <= 3 * 128
    assert budget["rss_under_budget"] is (budget["peak_rss_bytes"] < 4096 * MIB)
    assert budget["private_under_budget"] is True
    gather = report["gather"]  # both readers timed over the same batches
    assert gather["batch_size"] == bench_data.MEMORY_BATCH and set(gather["ms_per_batch"]) == {"preadv", "mapping"}
    assert all(ms > 0 for ms in gather["ms_per_batch"].values()) and gather["mapping_over_preadv"] > 0
    err = capsys.readouterr().err
    assert "peak RSS" in err and "host batches (rgb" in err
    # Each run really trained: its checkpoint is there.
    assert all(list((tmp_path / "work" / run / "checkpoints").glob("step-*"))
               for run in ("run_host", "run_device", "run_budget"))
