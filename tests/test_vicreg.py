"""VICReg: its three terms against a hand computation, the weighted loss, options and a run through the CLI."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_pretrain_config, write_yaml
from ptft.errors import UserError
from ptft.objectives import OBJECTIVES
from ptft.objectives.vicreg import VARIANCE_EPS, vicreg_terms

SHAPE = (1, 8, 8)


def test_terms_match_a_hand_computation_on_a_tiny_batch():
    # Two images, two dimensions. View 1: dimension 1 is constant (collapsed), no covariance.
    # View 2: both dimensions spread, perfectly correlated.
    z1 = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    z2 = torch.tensor([[1.0, 2.0], [-1.0, 0.0]])
    terms = vicreg_terms(z1, z2)
    # invariance: squared differences 0, 4, 0, 0 over 4 values.
    assert terms["invariance"].item() == pytest.approx(1.0)
    # variance: unbiased variances z1 (2, 0), z2 (2, 2); only the collapsed one is below std 1:
    # relu(1 - sqrt(0 + eps)) = 0.99, mean over 2 dimensions 0.495, mean over the views 0.2475.
    assert terms["variance"].item() == pytest.approx((1 - VARIANCE_EPS ** 0.5) / 4)
    # covariance: z1's is diag(2, 0); z2's is [[2, 2], [2, 2]], off-diagonal 2^2 + 2^2 = 8, / P = 4;
    # mean over the views 2.
    assert terms["covariance"].item() == pytest.approx(2.0)


def test_loss_is_the_weighted_sum_of_its_logged_terms():
    models = pytest.importorskip("ptft.models")
    torch.manual_seed(0)
    model = models.MODELS.get("tiny_mlp_autoencoder")(SHAPE, 10)
    objective = OBJECTIVES.get("vicreg")(model, SHAPE, invariance_weight=2.0, variance_weight=3.0,
                                         covariance_weight=0.5)
    x = torch.rand((16, *SHAPE), generator=torch.Generator().manual_seed(0))
    loss, logs = objective(model, x, torch.zeros(16, dtype=torch.long), torch.Generator().manual_seed(1))
    assert sorted(logs) == ["covariance", "invariance", "variance"]
    expected = 2.0 * logs["invariance"] + 3.0 * logs["variance"] + 0.5 * logs["covariance"]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("options, key", [({"projector_dim": 1}, "projector_dim"),
                                          ({"variance_weight": -1.0}, "variance_weight"),
                                          ({"crop_scale": (0.0, 1.0)}, "crop_scale")])
def test_bad_options_name_their_key(options, key):
    models = pytest.importorskip("ptft.models")
    model = models.MODELS.get("tiny_mlp_autoencoder")(SHAPE, 10)
    with pytest.raises(UserError, match=rf"^objective\.{key}: expected"):
        OBJECTIVES.get("vicreg")(model, SHAPE, **options)


def test_vicreg_pretrains_through_the_cli_and_logs_its_terms(tmp_path, ptft):
    config = write_yaml(tmp_path / "vicreg.yaml", tiny_pretrain_config(
        tmp_path / "run", objective={"name": "vicreg"}, train={"max_steps": 4, "eval_every_steps": 2}))
    result = ptft("pretrain", config)
    assert result.code == 0, result.stderr
    assert result.last_line.endswith(("step-00000002", "step-00000004"))
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert '"val/variance"' in metrics and '"val/covariance"' in metrics


@pytest.mark.parametrize("name", ["vicreg", "contrastive"])
@pytest.mark.parametrize("shape, preset", [((1, 8, 8), "grey"), ((1, 28, 28), "grey"), ((3, 32, 32), "rgb")])
def test_preset_auto_picks_the_views_from_the_channels(name, shape, preset):
    models = pytest.importorskip("ptft.models")
    from ptft.objectives import PRESETS

    model = models.MODELS.get("tiny_mlp_autoencoder")(shape, 10)
    augment = OBJECTIVES.get(name)(model, shape, preset="auto").augment
    expected = PRESETS[preset]
    assert augment.crop_scale == expected["crop_scale"] and augment.max_rotation == expected["max_rotation"]
    assert augment.flip_p == (0.5 if expected["flip"] else 0.0)


def test_a_view_option_beside_a_preset_is_refused_naming_the_key():
    models = pytest.importorskip("ptft.models")
    model = models.MODELS.get("tiny_mlp_autoencoder")(SHAPE, 10)
    with pytest.raises(UserError, match=r"^objective\.max_rotation: set beside objective\.preset 'auto'"):
        OBJECTIVES.get("vicreg")(model, SHAPE, preset="auto", max_rotation=40.0)
    # The defaults as a resolved config.yaml writes them are not a change.
    OBJECTIVES.get("vicreg")(model, SHAPE, preset="auto", crop_scale=[0.5, 1.0])
