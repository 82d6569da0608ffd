"""scripts/bench_knn_monitor.py times the same pretraining with and without the k-NN monitor."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from conftest import REPO

SCRIPT = REPO / "scripts" / "bench_knn_monitor.py"


def test_knn_monitor_bench_times_both_variants_and_the_monitor_itself(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--dataset", "digits", "--steps", "4", "--eval-every", "2", "--rounds", "2",
         "--threads", "1", "--clock", "cpu", "--json", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == ""
    report = json.loads(out.read_text())
    assert report["settings"]["eval_every_steps"] == 2 and report["settings"]["threads"] == 1
    # digits' 1,293 labelled train examples: under MAX_BANK, so the whole split is the bank.
    assert report["settings"]["bank_size"] == 1293
    # The order alternates between rounds, so neither variant always runs on a warmer process.
    assert [(r["round"], r["variant"]) for r in report["runs"]] == [(0, "off"), (0, "on"), (1, "on"), (1, "off")]
    for run in report["runs"]:
        assert run["seconds"] > 0
        if run["variant"] == "on":
            assert run["validations"] == 2 and 0 < run["monitor_seconds"] < run["seconds"]
        else:
            assert run["validations"] == 0 and run["monitor_seconds"] == 0
    summary = report["summary"]
    on = sorted(r["seconds"] for r in report["runs"] if r["variant"] == "on")
    assert summary["on_s"] == pytest.approx(sum(on) / 2, abs=1e-3)  # the median of two, to the ms
    assert summary["ratio"] > 0 and summary["ratio_from_monitor_time"] > 1
    assert summary["met"] == (summary["ratio"] <= summary["target"] == 1.10)
    assert "with / without" in proc.stderr and "in the monitor" in proc.stderr


@pytest.mark.parametrize("argv", [["--device", "cuda", "--clock", "cpu"], ["--rounds", "0"], ["--eval-every", "0"]])
def test_knn_monitor_bench_refuses_a_cpu_clock_on_a_gpu_and_empty_lengths(argv, capsys):
    spec = importlib.util.spec_from_file_location("bench_knn_monitor", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with pytest.raises(SystemExit) as exc:
        script.parse_args(argv)
    assert exc.value.code == 2 and argv[-2] in capsys.readouterr().err
