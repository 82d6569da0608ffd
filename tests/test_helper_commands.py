"""`ptft config`, `ptft models`, `ptft inspect`, and user models without editing ptft."""

from __future__ import annotations

import json
import textwrap

import yaml

from conftest import tiny_finetune_config, tiny_pretrain_config, write_yaml


def test_config_prints_the_resolved_config_with_overrides(tmp_path, ptft):
    config = write_yaml(tmp_path / "c.yaml", tiny_pretrain_config(tmp_path / "run"))
    result = ptft("config", config, "optim.lr=0.5", "model.hidden=[4]")
    assert result.code == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert resolved["optim"]["lr"] == 0.5 and resolved["model"]["hidden"] == [4]
    assert resolved["schedule"]["name"] == "constant"  # defaults filled in


def test_models_lists_every_registry_with_descriptions_on_stderr(ptft):
    result = ptft("models")
    assert result.code == 0, result.stderr
    assert result.stdout == ""  # stdout is for machines: --json
    for name in ("mlp_autoencoder", "conv_classifier", "resnet18_classifier", "digits", "mnist", "contrastive",
                 "sgd", "cosine", "torchvision:<architecture>"):
        assert name in result.stderr
    assert "autoencoder" in result.stderr and "classifier" in result.stderr  # model kinds


def test_models_json_is_one_object_per_registry_with_kinds(ptft):
    result = ptft("models", "--json")
    assert result.code == 0, result.stderr
    listing = json.loads(result.stdout)
    assert set(listing) == {"models", "objectives", "datasets", "optimizers", "schedules"}
    assert listing["models"]["mlp_autoencoder"]["kind"] == "autoencoder"
    assert listing["models"]["torchvision:<architecture>"]["kind"] == "classifier"
    assert "cosine" in listing["schedules"] and listing["datasets"]["digits"]["description"]


def test_inspect_shows_step_metrics_and_lineage(tmp_path, ptft):
    pre = write_yaml(tmp_path / "ae.yaml", tiny_pretrain_config(tmp_path / "ae"))
    parent = ptft("pretrain", pre).last_line
    ft = write_yaml(tmp_path / "ft.yaml", tiny_finetune_config(tmp_path / "ft", parent))
    child = ptft("finetune", ft).last_line

    facts = json.loads(ptft("inspect", child, "--json").stdout)
    assert facts["stage"] == "finetune" and facts["step"] > 0 and len(facts["config_hash"]) == 64
    assert "val/loss" in facts["metrics"] and facts["versions"]["torch"]
    assert [a["path"] for a in facts["lineage"]] == [parent]
    assert facts["parent"]["path"] == parent

    run = json.loads(ptft("inspect", tmp_path / "ft", "--json").stdout)
    assert run["best"] == child and [c["checkpoint"] for c in run["checkpoints"]][-1] == run["last"]

    human = ptft("inspect", child)
    assert human.code == 0 and "lineage[0]" in human.stderr and human.stdout == ""


def test_user_model_from_an_import_path(tmp_path, ptft, monkeypatch):
    (tmp_path / "my_models.py").write_text(textwrap.dedent('''
        def wide_mlp(input_shape, num_classes, *, width: int = 16):
            """A user's own autoencoder, built from ptft's parts."""
            from ptft.models.compose import AutoEncoder
            from ptft.models.mlp import mlp_decoder, mlp_encoder
            encoder = mlp_encoder(input_shape, [width], 8, "relu", 0.0, False)
            return AutoEncoder(encoder, mlp_decoder(input_shape, [width], 8, "relu", False))
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    config = write_yaml(tmp_path / "c.yaml", tiny_pretrain_config(
        tmp_path / "run", model={"name": "my_models:wide_mlp", "width": 12}))
    result = ptft("pretrain", config)
    assert result.code == 0, result.stderr
    bad = ptft("config", config, "model.widht=3")
    assert bad.code == 2 and "model.widht" in bad.stderr and "model.width" in bad.stderr


def test_readme_config_reference_matches_the_schema():
    import re
    import subprocess
    import sys

    from conftest import REPO

    readme = (REPO / "README.md").read_text()
    embedded = re.search(r"<!-- config-reference -->\n(.*)<!-- /config-reference -->", readme, re.S).group(1)
    generated = subprocess.run([sys.executable, str(REPO / "scripts" / "config_reference.py")], capture_output=True,
                               text=True, check=True).stdout
    assert embedded == generated, "README config reference is stale: regenerate with scripts/config_reference.py"
