"""Shared test helpers: run the real CLI in-process, write tiny configs, find shared data."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str

    @property
    def last_line(self) -> str:
        lines = self.stdout.strip().splitlines()
        return lines[-1] if lines else ""


@pytest.fixture
def ptft(capsys, monkeypatch):
    """Run `ptft ARGS...` in this process through the real entry point (exit codes included)."""
    from ptft.cli import main

    def run(*args: str) -> CliResult:
        capsys.readouterr()
        monkeypatch.setattr(sys, "argv", ["ptft", *map(str, args)])
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        out = capsys.readouterr()
        return CliResult(code, out.out, out.err)

    return run


def run_subprocess(*args: str, cwd: Path | None = None, timeout: float = 300, env=None) -> CliResult:
    """Run `python -m ptft ARGS...` in a fresh interpreter (for signals, imports, real exit codes)."""
    proc = subprocess.run([sys.executable, "-m", "ptft", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or REPO, timeout=timeout, env=env)
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def write_yaml(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def tiny_pretrain_config(run_dir: Path, **sections) -> dict:
    """A pretrain config on digits that runs in about a second."""
    cfg = {
        "run": {"dir": str(run_dir), "seed": 0},
        "data": {"name": "digits", "batch_size": 64},
        "model": {"name": "tiny_mlp_autoencoder"},
        "objective": {"name": "reconstruction"},
        "optim": {"name": "adam", "lr": 0.01},
        "train": {"max_steps": 20, "eval_every_steps": 10, "log_every_steps": 5},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    return cfg


def tiny_finetune_config(run_dir: Path, init: str | None, **sections) -> dict:
    """A finetune config on digits (2 labels per class) matching tiny_pretrain_config's encoder."""
    cfg = {
        "run": {"dir": str(run_dir), "seed": 0},
        "data": {"name": "digits", "labels_per_class": 2, "batch_size": 20},
        "model": {"name": "tiny_mlp_classifier"},
        "init": {"checkpoint": init},
        "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        "train": {"max_steps": 10, "eval_every_steps": 5, "log_every_steps": 5},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    return cfg


def write_colour_images(root: Path, side: int, train: int, test: int) -> Path:
    """An image folder of RGB side x side images in 3 classes (a bright channel each, plus noise): `train` and
    `test` images per class under root/train/<class>/ and root/test/<class>/."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for label, name in enumerate(("red", "green", "blue")):
        for split, count in (("train", train), ("test", test)):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 90, size=(side, side, 3), dtype=np.uint8)
                pixels[..., label] += 150
                Image.fromarray(pixels, "RGB").save(folder / f"{i}.png")
    return root


@pytest.fixture
def seeded_torch():
    """torch's global RNG seeded with 0 for the test, without touching the global RNG of other tests."""
    import torch

    with torch.random.fork_rng():
        torch.manual_seed(0)
        yield


@pytest.fixture
def one_thread():
    """torch on one intra-op thread for the test: tiny training loops on a shared machine only wait on each
    other's threads (600 steps of a 2x2 linear layer: 8 s instead of 0.2 s measured under load)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _decode_cache_in_tmp(tmp_path_factory, monkeypatch):
    # imagefolder caches decoded images in $XDG_CACHE_HOME/ptft: a test never touches the user's own.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg_cache")))


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "MNIST" / "raw").is_dir():
        pytest.skip("../shared/data (real MNIST) is not present")
    return SHARED_DATA
