"""Kernel choices: fast by default, bitwise repeatable on request; proven on CPU with CUDA's flags patched."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from conftest import REPO, tiny_pretrain_config, write_yaml
from ptft.config import config_from_dict
from ptft.runtime import configure_backend

CUDA = torch.device("cuda")  # only a name here: configure_backend sets flags, it runs no kernel


@pytest.fixture
def backend_flags(monkeypatch):
    """CUDA's global flags, restored after the test; a GPU of compute capability 8.0 by default."""
    # Saved and set back by hand: these are properties, which monkeypatch cannot restore.
    places = ((torch.backends.cudnn, "benchmark"), (torch.backends.cudnn, "deterministic"),
              (torch.backends.cuda.matmul, "allow_tf32"), (torch.backends.cudnn, "allow_tf32"))
    saved = [getattr(module, name) for module, name in places]
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    yield
    for (module, name), value in zip(places, saved):
        setattr(module, name, value)
    torch.use_deterministic_algorithms(was_deterministic)


def train_section(tmp_path, **train):
    cfg = tiny_pretrain_config(tmp_path / "run", train={"max_steps": 1, **train})
    return config_from_dict(cfg, "test.yaml").train


def flags() -> dict:
    return {"benchmark": torch.backends.cudnn.benchmark, "cudnn_deterministic": torch.backends.cudnn.deterministic,
            "matmul_tf32": torch.backends.cuda.matmul.allow_tf32, "cudnn_tf32": torch.backends.cudnn.allow_tf32,
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled()}


def test_default_on_cuda_is_fast_autotuned_tf32(tmp_path, backend_flags):
    configure_backend(CUDA, train_section(tmp_path))
    assert flags() == {"benchmark": True, "cudnn_deterministic": False, "matmul_tf32": True, "cudnn_tf32": True,
                       "deterministic_algorithms": False}
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ


def test_deterministic_turns_off_autotuning_and_tf32_and_sets_cublas_workspace(tmp_path, backend_flags):
    configure_backend(CUDA, train_section(tmp_path, deterministic=True))
    assert flags() == {"benchmark": False, "cudnn_deterministic": True, "matmul_tf32": False, "cudnn_tf32": False,
                       "deterministic_algorithms": True}
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"


def test_tf32_can_be_switched_off_alone(tmp_path, backend_flags):
    configure_backend(CUDA, train_section(tmp_path, tf32=False))
    assert flags() == {"benchmark": True, "cudnn_deterministic": False, "matmul_tf32": False, "cudnn_tf32": False,
                       "deterministic_algorithms": False}


def test_one_runs_determinism_does_not_leak_into_the_next(tmp_path, backend_flags):
    configure_backend(torch.device("cpu"), train_section(tmp_path, deterministic=True))
    assert torch.are_deterministic_algorithms_enabled()
    configure_backend(torch.device("cpu"), train_section(tmp_path))
    assert not torch.are_deterministic_algorithms_enabled()


def test_deterministic_with_tf32_on_is_a_config_error_naming_both_keys(tmp_path, ptft):
    config = write_yaml(tmp_path / "ae.yaml", tiny_pretrain_config(tmp_path / "run"))
    result = ptft("config", config, "train.deterministic=true", "train.tf32=true")
    message = " ".join(result.stderr.split())
    assert result.code == 2 and "Traceback" not in result.stderr
    assert "train.deterministic" in message and "train.tf32" in message


@pytest.mark.parametrize("capability, precision, warned", [((7, 5), "bf16", True), ((8, 0), "bf16", False),
                                                           ((7, 5), "fp16", False)])
def test_bf16_on_a_gpu_that_emulates_it_warns_once(tmp_path, backend_flags, monkeypatch, capsys,
                                                    capability, precision, warned):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    configure_backend(CUDA, train_section(tmp_path, precision=precision))
    lines = [line for line in capsys.readouterr().err.splitlines() if "bf16" in line]
    assert len(lines) == (1 if warned else 0)
    if warned:
        assert "7.5" in lines[0] and "emulated" in lines[0]


def test_deterministic_cpu_training_runs_and_records_the_choice(tmp_path, ptft, backend_flags):
    config = write_yaml(tmp_path / "ae.yaml", tiny_pretrain_config(tmp_path / "run"))
    result = ptft("pretrain", config, "train.deterministic=true", "train.max_steps=4")
    assert result.code == 0, result.stderr
    assert "deterministic: true" in (tmp_path / "run" / "config.yaml").read_text()


@pytest.mark.parametrize("rank, printed", [("0", 1), ("1", 0)])
def test_interrupt_message_prints_once_on_rank_0_only(monkeypatch, capsys, rank, printed):
    import signal

    from ptft.runtime import InterruptFlag

    monkeypatch.setenv("RANK", rank)
    with InterruptFlag() as flag:
        flag._handle(signal.SIGINT, None)
        assert flag.raised
        with pytest.raises(KeyboardInterrupt):  # a second signal aborts, silently
            flag._handle(signal.SIGINT, None)
    assert capsys.readouterr().err.count("interrupt received") == printed


def test_each_checkpoint_records_the_peak_memory_of_its_stage(tmp_path, ptft):
    import json

    config = write_yaml(tmp_path / "ae.yaml", tiny_pretrain_config(tmp_path / "run", train={"max_steps": 4}))
    assert ptft("pretrain", config).code == 0
    meta = json.loads((tmp_path / "run" / "checkpoints" / "last" / "meta.json").read_text())
    memory = meta["memory"]
    assert memory["device"] == "cpu" and memory["peak_device_bytes"] is None  # CUDA's figure on a GPU
    assert 10 * 2**20 < memory["peak_host_bytes"] < 64 * 2**30  # a resident set of a Python + torch process


def test_peak_device_memory_is_read_from_cuda_on_a_gpu(monkeypatch):
    from ptft.runtime import peak_memory

    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 123 * 2**20)
    assert peak_memory(CUDA)["peak_device_bytes"] == 123 * 2**20


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux's /proc")
def test_peak_host_memory_is_the_processs_own_not_its_large_parents():
    import subprocess
    import sys

    ballast = bytearray(1024 * 2**20)  # a parent holding 1 GiB, resident
    ballast[::4096] = b"\x01" * len(ballast[::4096])
    child = subprocess.run([sys.executable, "-c", "import torch; from ptft.runtime import peak_memory; "
                            "print(peak_memory(torch.device('cpu'))['peak_host_bytes'])"],
                           capture_output=True, text=True, check=True, cwd=REPO)
    # getrusage would say at least 1 GiB here (the forked address space keeps its high-water mark).
    assert int(child.stdout) < 768 * 2**20
    del ballast
