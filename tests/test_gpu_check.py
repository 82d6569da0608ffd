"""scripts/gpu_check.sh: the accelerator check runs end to end on the CPU in --dry-run mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO


# A minute of process starts (ten ptft runs, torchrun among them): behind `slow`, which is run before
# every landing (`scripts/test.sh -m slow`), so the default run stays within its five minutes.
@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_check_and_writes_its_figures(tmp_path):
    env = {**os.environ, "PY": sys.executable}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report_path = proc.stdout.strip().splitlines()[-1]
    report = json.loads(open(report_path).read())
    assert report["dry_run"] is True and report["device"].startswith("cpu")
    checks = [row["check"] for row in report["checks"]]
    assert checks == ["bench", "train", "train", "resume", "deterministic", "placement", "evaluate", "torchrun",
                      "data_epoch"]
    assert all(row["rc"] == 0 for row in report["checks"])
    resume = next(row for row in report["checks"] if row["check"] == "resume")
    assert resume["bitwise_equal"] is True  # on the CPU a resumed run is bitwise equal to an unbroken one
    assert next(row for row in report["checks"] if row["check"] == "deterministic")["bitwise_equal"] is True
    assert next(row for row in report["checks"] if row["check"] == "placement")["bitwise_equal"] is True
    data = next(row for row in report["checks"] if row["check"] == "data_epoch")["figures"]
    assert data["folders"]["rgb"]["decode"]["files"] == 60
    bench = report["checks"][0]["figures"]
    assert bench  # the benchmark's own JSON, carried into the report
    assert "train conv_ae bf16 eager" in proc.stderr  # the people's table
