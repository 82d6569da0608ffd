"""scripts/bench_precision.py times the same FixMatch finetune in fp32 and in bf16."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO

SCRIPT = REPO / "scripts" / "bench_precision.py"


def test_precision_bench_pairs_both_precisions_and_reports_the_speedup(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--dataset", "digits", "--steps", "3", "--rounds", "2", "--threads", "1",
         "--clock", "cpu", "--json", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    # The order alternates between rounds, so neither precision always runs on a warmer process.
    assert [(r["round"], r["precision"]) for r in report["runs"]] == [(0, "fp32"), (0, "bf16"), (1, "bf16"),
                                                                      (1, "fp32")]
    assert all(r["seconds"] > 0 and 0 <= r["val_acc"] <= 1 for r in report["runs"])
    seconds = {(r["round"], r["precision"]): r["seconds"] for r in report["runs"]}
    paired = sorted(seconds[(i, "fp32")] / seconds[(i, "bf16")] for i in range(2))
    assert report["summary"]["speedup"] == pytest.approx(sum(paired) / 2, rel=1e-2)  # the median of two
    assert "bf16 speed-up" in proc.stderr
