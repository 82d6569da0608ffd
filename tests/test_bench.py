"""Fast by design: the light commands stay torch-free, and scripts/bench.py measures what it claims."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))

LIGHT_COMMAND = """
import sys
from ptft.cli import main
sys.argv = ["ptft", *{argv!r}]
try:
    main()
except SystemExit as exc:
    assert exc.code in (0, None), f"exit code {{exc.code}}"
heavy = sorted(name for name in ("torch", "torchvision") if name in sys.modules)
assert not heavy, f"imported {{heavy}}"
"""


LIGHT_ARGVS = [["--help"], ["config", "configs/ae.yaml"], ["models"],
               ["config", "configs/ae.yaml", "train.max_steps=5"]]  # prints a note: ptft.console stays torch-free


@pytest.mark.parametrize("argv", LIGHT_ARGVS, ids=" ".join)
def test_light_commands_never_import_torch(argv):
    proc = subprocess.run([sys.executable, "-c", LIGHT_COMMAND.format(argv=argv)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


class FakeStepper:
    def __init__(self, log: list, name: str):
        self.log, self.name = log, name

    def run(self, steps: int) -> None:
        self.log.append((self.name, steps))


def test_interleaver_alternates_equal_blocks_after_warmup():
    from bench_paths import Interleaver, Meter

    log = []
    others = {"hand": FakeStepper(log, "hand"), "loader": FakeStepper(log, "loader")}
    passes = Interleaver("driver", others, Meter(torch.device("cpu")), warmup=3, block=4, blocks=5)
    assert passes.total_steps == 3 + 4 * 5 + 1
    for step in range(passes.total_steps):
        log.append(("driver", step))
        passes.tick(step)
    passes.finish()
    # The others run one block each right after the driver's warm-up and after each driver block but the last.
    runs = [i for i, entry in enumerate(log) if entry[0] != "driver"]
    assert [log[i] for i in runs] == [("hand", 4), ("loader", 4)] * 5
    assert [log[i - 1] for i in runs[::2]] == [("driver", 3 + 4 * k) for k in range(5)]
    assert {name: len(times) for name, times in passes.times.items()} == {"driver": 5, "hand": 5, "loader": 5}


def test_bench_smoke_run_writes_every_figure(tmp_path):
    # An empty --data-root: MNIST is absent, so the run falls back to the digits and says so.
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench.py"), "--steps", "3", "--warmup", "1", "--block", "1",
         "--data-root", str(tmp_path), "--device", "cpu", "--skip-lightning", "--cli-repeats", "1",
         "--json", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == ""
    assert "MNIST not found" in proc.stderr and "(d) Lightning skipped: --skip-lightning" in proc.stderr
    report = json.loads(out.read_text())
    assert report["settings"]["dataset"] == "digits" and report["settings"]["steps"] == 3
    assert set(report["workloads"]) == {"mlp_autoencoder", "conv_classifier"}
    for workload in report["workloads"].values():
        paths = workload["paths"]
        assert paths["lightning"] == {"skipped": "--skip-lightning"}
        assert paths["hand"]["ratio_to_hand"] == 1.0
        for name in ("ptft", "hand", "dataloader"):
            assert paths[name]["ms_per_step"] > 0 and paths[name]["samples_per_s"] > 0, name
            assert len(paths[name]["block_ms"]) == 3 and paths[name]["ratio_to_hand"] > 0, name
        epoch = workload["epoch"]
        assert epoch["steps"] == 1293 // 128 and epoch["ptft_s"] > 0 and epoch["dataloader_over_ptft"] > 0
    assert set(report["cli"]) == {"ptft --help", "ptft config configs/ae.yaml"}
    assert all(seconds > 0 for seconds in report["cli"].values())
    assert report["targets"]["lightning / ptft, per step"]["met"] is None
    assert all(isinstance(t["met"], bool) for name, t in report["targets"].items() if "lightning" not in name)
