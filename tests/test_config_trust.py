"""Someone else's run directory runs no code: import paths come only from the user's own config or command line.

A checkpoint's meta.json names its model; for a `package.module:builder` name, `evaluate` would import
that module. Such names are refused unless the user allows the module (PTFT_TRUSTED_IMPORTS) or names
the builder on the command line or in their own config.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import run_subprocess, tiny_pretrain_config, write_yaml

PLANTED = "planted_models:build"


@pytest.fixture
def planted(tmp_path, monkeypatch) -> Path:
    """An importable module that leaves a marker file when imported; yields the marker's path."""
    marker = tmp_path / "imported.marker"
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "planted_models.py").write_text(textwrap.dedent(f'''
        from pathlib import Path
        Path({str(marker)!r}).write_text("imported")

        def build(input_shape, num_classes, *, hidden: list[int] = [8], latent: int = 8, activation: str = "relu",
                  dropout: float = 0.0, batch_norm: bool = False):
            from ptft.models import MODELS
            return MODELS.get("tiny_mlp_autoencoder")(input_shape, num_classes, hidden=hidden, latent=latent,
                                                      activation=activation, dropout=dropout, batch_norm=batch_norm)
    '''))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    yield marker
    sys.modules.pop("planted_models", None)


@pytest.fixture
def foreign_run(tmp_path, ptft) -> Path:
    """A run whose checkpoints' meta.json name the planted module as their model."""
    config = write_yaml(tmp_path / "ae.yaml", tiny_pretrain_config(tmp_path / "foreign", train={"max_steps": 10}))
    assert ptft("pretrain", config).code == 0
    for meta_file in (tmp_path / "foreign" / "checkpoints").glob("step-*/meta.json"):
        meta = json.loads(meta_file.read_text())
        meta["config"]["model"]["name"] = meta["model"]["name"] = PLANTED
        meta_file.write_text(json.dumps(meta))
    return tmp_path / "foreign"


def test_evaluate_refuses_a_module_named_by_a_checkpoint_and_never_imports_it(foreign_run, planted, ptft):
    for target in (foreign_run, foreign_run / "checkpoints" / "best"):
        result = ptft("evaluate", target)
        assert result.code == 2 and "Traceback" not in result.stderr
        assert "model.name" in result.stderr and "meta.json" in result.stderr
        assert "PTFT_TRUSTED_IMPORTS=planted_models" in result.stderr  # how to allow it
    assert not planted.exists()


def test_inspect_shows_such_a_checkpoint_without_importing_it(foreign_run, planted, ptft):
    result = ptft("inspect", foreign_run / "checkpoints" / "best", "--json")
    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["model"]["name"] == PLANTED
    assert ptft("inspect", foreign_run).code == 0
    assert not planted.exists()


def test_allowing_the_module_in_the_environment_lets_evaluate_import_it(foreign_run, planted, ptft, monkeypatch):
    monkeypatch.setenv("PTFT_TRUSTED_IMPORTS", "other_models, planted_models")
    result = ptft("evaluate", foreign_run)
    assert result.code == 0, result.stderr
    assert json.loads(result.last_line)["model"] == PLANTED
    assert planted.exists()


def test_naming_the_builder_on_the_command_line_lets_evaluate_import_it(foreign_run, planted, ptft):
    result = ptft("evaluate", foreign_run, f"model.name={PLANTED}")
    assert result.code == 0, result.stderr
    assert planted.exists()


def test_evaluating_through_the_users_own_config_trusts_its_import_path(tmp_path, planted, ptft):
    config = write_yaml(tmp_path / "mine.yaml", tiny_pretrain_config(
        tmp_path / "mine", model={"name": PLANTED}, train={"max_steps": 10}))
    assert ptft("pretrain", config).code == 0
    result = ptft("evaluate", config)
    assert result.code == 0, result.stderr
    assert json.loads(result.last_line)["model"] == PLANTED


def test_python_m_ptft_imports_nothing_from_the_current_directory(foreign_run, tmp_path):
    marker = tmp_path / "torch.marker"
    (foreign_run / "torch.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('imported')\n")
    result = run_subprocess("inspect", ".", "--json", cwd=foreign_run, timeout=120)
    assert result.code == 0, result.stderr
    assert not marker.exists()
