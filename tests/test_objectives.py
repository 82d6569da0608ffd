"""Objectives: values, determinism, gradients, learning, masks, NT-Xent, model-kind and option checks.

Stand-in models below honour the model interface of docs/architecture.md (encoder with
`out_features`; autoencoders have `decoder`, classifiers `head`), so these tests do not
depend on ptft.models; one smoke test runs the real tiny models when they import.
"""

from __future__ import annotations

import inspect
import json
import math
import subprocess
import sys
import typing

import pytest
import torch
from torch import nn

from conftest import tiny_pretrain_config, write_yaml
from ptft.errors import UserError
from ptft.objectives import OBJECTIVES
from ptft.objectives.contrastive import nt_xent
from ptft.objectives.reconstruction import patch_mask

SHAPE = (1, 8, 8)
NUM_CLASSES = 4


class TinyEncoder(nn.Module):
    def __init__(self, shape=SHAPE, width: int = 8):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(shape), 32), nn.ReLU(), nn.Linear(32, width))
        self.out_features = width

    def forward(self, x):
        return self.net(x)


class TinyAutoEncoder(nn.Module):
    def __init__(self, shape=SHAPE):
        super().__init__()
        self.encoder = TinyEncoder(shape)
        self.decoder = nn.Sequential(nn.Linear(8, math.prod(shape)), nn.Unflatten(1, shape))

    def forward(self, x):
        return torch.sigmoid(self.decoder(self.encoder(x)))


class TinyClassifier(nn.Module):
    def __init__(self, shape=SHAPE):
        super().__init__()
        self.encoder = TinyEncoder(shape)
        self.head = nn.Linear(8, NUM_CLASSES)

    def forward(self, x):
        return self.head(self.encoder(x))


class FixedOutputAutoEncoder(nn.Module):
    """An 'autoencoder' whose output is a function of its input chosen by the test."""

    def __init__(self, output_of):
        super().__init__()
        self.encoder = TinyEncoder()
        self.decoder = nn.Identity()
        self.output_of = output_of

    def forward(self, x):
        return self.output_of(x)


# name -> (model factory, options that make every random part active)
CASES = {
    "reconstruction": (TinyAutoEncoder, {}),
    "denoising": (TinyAutoEncoder, {"noise": "gaussian", "std": 0.3}),
    "denoising_mask": (TinyAutoEncoder, {"noise": "mask", "mask_prob": 0.3}),
    "masked": (TinyAutoEncoder, {"patch_size": 2, "mask_ratio": 0.5}),
    "contrastive": (TinyAutoEncoder, {"cutout": 2, "flip": True}),
    "supervised": (TinyClassifier, {"label_smoothing": 0.1}),
    "supervised_augmented": (TinyClassifier, {"max_shift": 0.2, "max_rotation": 10.0, "cutout": 2}),
    "vicreg": (TinyAutoEncoder, {"cutout": 2, "flip": True}),
}
RANDOM_CASES = ["denoising", "denoising_mask", "masked", "contrastive", "supervised_augmented", "vicreg"]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def batch(n: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = gen(seed)
    return torch.rand((n, *SHAPE), generator=g), torch.randint(0, NUM_CLASSES, (n,), generator=g)


def build(case: str, seed: int = 0):
    factory, options = CASES[case]
    torch.manual_seed(seed)
    model = factory()
    return model, OBJECTIVES.get(case.split("_")[0])(model, SHAPE, **options)


def test_importing_objectives_does_not_import_torch():
    code = "import sys, ptft.objectives as o; o.OBJECTIVES.describe(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_builders_are_documented_with_config_options():
    assert OBJECTIVES.names() == ["contrastive", "denoising", "mae", "masked", "reconstruction", "supervised",
                                  "vicreg"]
    for name in OBJECTIVES.names():
        builder = OBJECTIVES.get(name)
        assert OBJECTIVES.describe()[name] and len(inspect.getdoc(builder).splitlines()) == 1
        positional = [p.name for p in inspect.signature(builder).parameters.values() if p.kind != p.KEYWORD_ONLY]
        assert positional == ["model", "input_shape"]
        hints = typing.get_type_hints(builder)
        for param in inspect.signature(builder).parameters.values():
            if param.kind == param.KEYWORD_ONLY:
                assert param.default is not inspect.Parameter.empty and param.name in hints
    assert OBJECTIVES.meta("masked")["model_kinds"] == ("autoencoder",)
    assert OBJECTIVES.meta("supervised")["model_kinds"] == ("classifier",)


@pytest.mark.parametrize("case", sorted(CASES))
def test_loss_is_a_finite_scalar_and_logs_are_0_dim(case):
    model, objective = build(case)
    x, y = batch()
    loss, logs = objective(model, x, y, gen(0))
    assert loss.shape == () and loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(v.shape == () and torch.isfinite(v) for v in logs.values())
    assert objective.needs_labels == case.startswith("supervised")
    if case in ("contrastive", "supervised", "supervised_augmented"):
        assert set(logs) == {"acc"} and 0.0 <= logs["acc"].item() <= 1.0


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_seed_gives_the_same_loss(case):
    model, objective = build(case)
    x, y = batch()
    first, first_logs = objective(model, x, y, gen(11))
    again, again_logs = objective(model, x, y, gen(11))
    assert torch.equal(first, again) and first_logs.keys() == again_logs.keys()
    assert all(torch.equal(first_logs[k], again_logs[k]) for k in first_logs)


@pytest.mark.parametrize("case", RANDOM_CASES)
def test_another_seed_gives_another_loss(case):
    model, objective = build(case)
    x, y = batch()
    assert not torch.equal(objective(model, x, y, gen(11))[0], objective(model, x, y, gen(12))[0])


@pytest.mark.parametrize("case", sorted(CASES))
def test_gradient_reaches_every_encoder_parameter(case):
    model, objective = build(case)
    x, y = batch()
    objective(model, x, y, gen(0))[0].backward()
    for name, param in model.encoder.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def prototype_batch(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable tiny problem: noisy copies of one random binary pattern per class."""
    g = gen(1)
    prototypes = (torch.rand((NUM_CLASSES, *SHAPE), generator=g) > 0.5).float()
    y = torch.arange(n) % NUM_CLASSES
    return 0.8 * prototypes[y] + 0.2 * torch.rand((n, *SHAPE), generator=g), y


@pytest.mark.parametrize("case", sorted(CASES))
def test_loss_falls_over_50_adam_steps(case, monkeypatch):
    # Mild views: 50 steps of a tiny MLP cannot yet match views under flips and cutout.
    monkeypatch.setitem(CASES, "contrastive", (TinyAutoEncoder, {"crop_scale": (0.8, 1.0), "max_rotation": 5.0}))
    monkeypatch.setitem(CASES, "vicreg", (TinyAutoEncoder, {"crop_scale": (0.8, 1.0), "max_rotation": 5.0}))
    model, objective = build(case)
    x, y = prototype_batch()
    optimizer = torch.optim.Adam([*model.parameters(), *objective.parameters()], lr=0.01)
    losses = []
    for step in range(50):
        loss, _ = objective(model, x, y, gen(step))  # a fresh seed per step, as the engine does
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) < 0.8 * sum(losses[:5]), losses


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", sorted(CASES))
def test_objectives_run_on_cuda_with_a_cuda_generator(case):
    model, objective = build(case)
    model.cuda(), objective.cuda()
    x, y = (t.cuda() for t in batch())
    first = objective(model, x, y, torch.Generator(device="cuda").manual_seed(3))[0]
    again = objective(model, x, y, torch.Generator(device="cuda").manual_seed(3))[0]
    assert first.device.type == "cuda" and torch.isfinite(first) and torch.equal(first, again)


def test_reconstruction_is_the_mse_against_the_input():
    x, y = batch()
    objective = OBJECTIVES.get("reconstruction")(FixedOutputAutoEncoder(lambda inp: inp), SHAPE)
    assert objective(FixedOutputAutoEncoder(lambda inp: inp), x, y, gen(0))[0].item() == 0.0
    half = FixedOutputAutoEncoder(lambda inp: torch.full_like(inp, 0.5))
    loss, _ = objective(half, x, y, gen(0))
    assert loss.item() == pytest.approx((x - 0.5).square().mean().item(), rel=1e-6)


def test_denoising_targets_the_clean_input():
    x = torch.ones(64, *SHAPE)
    y = torch.zeros(64, dtype=torch.long)
    clean = FixedOutputAutoEncoder(lambda inp: torch.ones_like(inp))
    for options in ({"noise": "gaussian", "std": 0.5}, {"noise": "mask", "mask_prob": 0.5}):
        assert OBJECTIVES.get("denoising")(clean, SHAPE, **options)(clean, x, y, gen(0))[0].item() == 0.0


def test_mask_noise_zeroes_the_requested_fraction_of_pixels():
    x = torch.ones(64, 3, 8, 8)
    seen = []
    identity = FixedOutputAutoEncoder(lambda inp: seen.append(inp) or inp)
    objective = OBJECTIVES.get("denoising")(identity, (3, 8, 8), noise="mask", mask_prob=0.3)
    # Identity on all-ones: the loss is exactly the fraction of zeroed values.
    loss, _ = objective(identity, x, torch.zeros(64, dtype=torch.long), gen(0))
    assert loss.item() == pytest.approx(0.3, abs=0.02)
    corrupted = seen[0]
    assert torch.equal(corrupted[:, 0], corrupted[:, 1])  # a dropped pixel loses all its channels


def test_gaussian_noise_stays_in_range_and_has_the_requested_std():
    x = torch.full((64, *SHAPE), 0.5)
    seen = []
    recorder = FixedOutputAutoEncoder(lambda inp: seen.append(inp) or inp)
    objective = OBJECTIVES.get("denoising")(recorder, SHAPE, noise="gaussian", std=0.1)
    objective(recorder, x, torch.zeros(64, dtype=torch.long), gen(0))
    assert seen[0].min() >= 0 and seen[0].max() <= 1
    assert (seen[0] - x).std().item() == pytest.approx(0.1, rel=0.05)


def test_patch_mask_hides_whole_patches_in_the_requested_ratio():
    x = torch.rand(10, 3, 8, 8)
    hidden = patch_mask(x, 2, 0.25, gen(0))  # (N, 1, H, W); 16 patches, 4 hidden
    assert hidden.shape == (10, 1, 8, 8) and hidden.dtype == torch.bool
    assert torch.all(hidden.sum((1, 2, 3)) == 4 * 2 * 2)
    blocks = hidden.view(10, 4, 2, 4, 2)  # every 2x2 block all hidden or all visible
    assert torch.all(blocks.all((2, 4)) | ~blocks.any((2, 4)))
    odd = patch_mask(torch.rand(2, 1, 7, 5), 3, 0.5, gen(0))  # 3x2 grid cut at the border
    assert odd.shape == (2, 1, 7, 5) and torch.all(odd.sum((1, 2, 3)) > 0)


def test_masked_loss_counts_only_the_hidden_pixels():
    x = 0.1 + 0.9 * torch.rand(8, *SHAPE)  # no zeros, so hidden pixels are exactly the zeros in the input
    y = torch.zeros(8, dtype=torch.long)
    hidden_right = FixedOutputAutoEncoder(lambda inp: torch.where(inp == 0, x, x + 0.5))
    objective = OBJECTIVES.get("masked")(hidden_right, SHAPE, patch_size=2, mask_ratio=0.5)
    assert objective(hidden_right, x, y, gen(0))[0].item() == 0.0
    hidden_wrong = FixedOutputAutoEncoder(lambda inp: torch.where(inp == 0, x + 0.5, x))
    assert objective(hidden_wrong, x, y, gen(0))[0].item() == pytest.approx(0.25, rel=1e-6)


def test_nt_xent_of_identical_orthogonal_views_has_the_known_value():
    n, temperature = 4, 0.5
    z = torch.eye(n, 6) * 3.0  # orthogonal rows; the loss normalises them
    loss, accuracy = nt_xent(z, z.clone(), temperature)
    # Each row: partner at similarity 1, the 2n - 2 others at 0.
    expected = -math.log(math.exp(1 / temperature) / (math.exp(1 / temperature) + 2 * n - 2))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert accuracy.item() == 1.0
    _, shuffled_accuracy = nt_xent(z, z.roll(1, 0), temperature)
    assert shuffled_accuracy.item() == 0.0


def test_contrastive_owns_only_its_projector():
    model, objective = build("contrastive")
    assert sorted(objective.state_dict()) == ["projector.0.bias", "projector.0.weight", "projector.2.bias",
                                              "projector.2.weight"]
    assert objective.projector[0].in_features == model.encoder.out_features
    assert objective.projector[2].out_features == 64


def test_contrastive_works_on_encoder_only_models_and_in_inference_mode():
    encoder_only = nn.Module()
    encoder_only.encoder = TinyEncoder()
    objective = OBJECTIVES.get("contrastive")(encoder_only, SHAPE, projector_dim=16, hidden_dim=32)
    x, y = batch()
    with torch.inference_mode():
        loss, logs = objective(encoder_only, x, y, gen(0))
    assert torch.isfinite(loss) and "acc" in logs


@pytest.mark.parametrize("case", sorted(CASES))
def test_losses_are_float32_under_bf16_autocast(case):
    model, objective = build(case)
    x, y = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, logs = objective(model, x, y, gen(0))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_supervised_loss_and_accuracy_have_known_values():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    fixed = TinyClassifier()
    fixed.forward = lambda inp: logits
    y = torch.tensor([0, 2])
    objective = OBJECTIVES.get("supervised")(fixed, SHAPE, label_smoothing=0.3)
    loss, logs = objective(fixed, torch.zeros(2, *SHAPE), y, gen(0))
    log_p = logits.log_softmax(1)
    # Smoothing 0.3 over 3 classes: target 0.8 on the label, 0.1 on each other class.
    targets = torch.full((2, 3), 0.1).scatter(1, y[:, None], 0.8)
    assert loss.item() == pytest.approx(-(targets * log_p).sum(1).mean().item(), rel=1e-6)
    assert logs["acc"].item() == 0.5


def test_supervised_augments_training_batches_only():
    seen = []
    model = TinyClassifier()
    model.forward = lambda inp: seen.append(inp) or torch.zeros(len(inp), NUM_CLASSES)
    x, y = batch()
    plain = OBJECTIVES.get("supervised")(model, SHAPE)
    augmented = OBJECTIVES.get("supervised")(model, SHAPE, max_shift=0.25, cutout=3)
    assert plain.augment is None  # the defaults add no work to the step
    plain(model, x, y, gen(0))
    augmented(model, x, y, gen(0))
    augmented.eval()  # validation and evaluation
    augmented(model, x, y, gen(0))
    assert torch.equal(seen[0], x) and not torch.equal(seen[1], x) and torch.equal(seen[2], x)
    assert seen[1].shape == x.shape


@pytest.mark.parametrize("name", ["reconstruction", "denoising", "masked"])
def test_autoencoder_objectives_refuse_a_classifier(name):
    with pytest.raises(UserError, match=rf"objective '{name}' needs an autoencoder model .*is a classifier"):
        OBJECTIVES.get(name)(TinyClassifier(), SHAPE)


def test_supervised_refuses_an_autoencoder_and_contrastive_a_model_without_encoder():
    with pytest.raises(UserError, match="objective 'supervised' needs a classifier model .*is an autoencoder"):
        OBJECTIVES.get("supervised")(TinyAutoEncoder(), SHAPE)
    with pytest.raises(UserError, match="objective 'contrastive' needs a model with an encoder"):
        OBJECTIVES.get("contrastive")(nn.Linear(2, 2), SHAPE)


@pytest.mark.parametrize("name, options, key", [
    ("denoising", {"std": -0.1}, "std"),
    ("denoising", {"mask_prob": 1.0}, "mask_prob"),
    ("denoising", {"noise": "salt"}, "noise"),
    ("masked", {"patch_size": 9}, "patch_size"),
    ("masked", {"patch_size": 0}, "patch_size"),
    ("masked", {"mask_ratio": 0.0}, "mask_ratio"),
    ("contrastive", {"temperature": 0.0}, "temperature"),
    ("contrastive", {"projector_dim": 0}, "projector_dim"),
    ("contrastive", {"crop_scale": (0.8, 0.5)}, "crop_scale"),
    ("contrastive", {"crop_scale": (0.0, 1.0)}, "crop_scale"),
    ("contrastive", {"crop_ratio": (0.0, 1.0)}, "crop_ratio"),
    ("contrastive", {"max_rotation": -1.0}, "max_rotation"),
    ("contrastive", {"max_shift": 1.0}, "max_shift"),
    ("contrastive", {"noise_std": -0.5}, "noise_std"),
    ("contrastive", {"cutout": 9}, "cutout"),
    ("supervised", {"label_smoothing": 1.0}, "label_smoothing"),
    ("supervised", {"max_shift": -0.1}, "max_shift"),
    ("supervised", {"cutout": 9}, "cutout"),
])
def test_out_of_range_options_name_their_key(name, options, key):
    model = TinyClassifier() if name == "supervised" else TinyAutoEncoder()
    with pytest.raises(UserError, match=rf"^objective\.{key}: expected .*, got"):
        OBJECTIVES.get(name)(model, SHAPE, **options)


def test_real_tiny_models_train_with_every_objective():
    models = pytest.importorskip("ptft.models")
    x, y = batch(n=8)
    for name, model_name in [("reconstruction", "tiny_mlp_autoencoder"), ("denoising", "tiny_mlp_autoencoder"),
                             ("masked", "tiny_mlp_autoencoder"), ("contrastive", "tiny_mlp_autoencoder"),
                             ("supervised", "tiny_mlp_classifier")]:
        torch.manual_seed(0)
        model = models.MODELS.get(model_name)(SHAPE, NUM_CLASSES)
        objective = OBJECTIVES.get(name)(model, SHAPE)
        loss, _ = objective(model, x, y, gen(0))
        loss.backward()
        assert torch.isfinite(loss), name
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters()), name


def _val_metrics(case: str, eval_batch_size: int, shape=SHAPE, n: int = 600) -> dict[str, float]:
    """evaluate_objective's figures for `case` over a fixed split, with the given eval batch size."""
    from types import SimpleNamespace

    from ptft.engine import evaluate_objective

    factory, options = CASES[case]
    torch.manual_seed(0)
    model = factory(shape)
    objective = OBJECTIVES.get(case.split("_")[0])(model, shape, **options)
    g = gen(5)
    split = SimpleNamespace(x=torch.rand((n, *shape), generator=g), y=torch.randint(0, NUM_CLASSES, (n,), generator=g))
    parts = SimpleNamespace(model=model, objective=objective, device=torch.device("cpu"))
    settings = SimpleNamespace(seed=0, eval_batch_size=eval_batch_size, precision="fp32")
    return evaluate_objective(parts, split, settings)


# 3x5x5 images: 75 values each, so batch boundaries do not fall on the 16-value blocks
# in which CPU torch.randn draws its normals.
@pytest.mark.parametrize("shape", [SHAPE, (3, 5, 5)])
@pytest.mark.parametrize("case", sorted(CASES))
def test_validation_figures_do_not_depend_on_the_eval_batch_size(case, shape):
    # data.eval_batch_size may change on --resume; if the figures moved with it, a resumed run
    # could pick a "best" checkpoint on a changed measure.
    reference = _val_metrics(case, 1024, shape)
    for eval_batch_size in (7, 64, 256):
        assert _val_metrics(case, eval_batch_size, shape) == pytest.approx(reference, rel=1e-5), eval_batch_size


def test_contrastive_val_loss_is_the_same_for_any_eval_batch_size(tmp_path, ptft):
    # Half of digits' training split for validation: several of the objective's eval chunks.
    records = {}
    for eval_batch_size in (64, 256, 1024):
        run_dir = tmp_path / f"eval{eval_batch_size}"
        config = write_yaml(tmp_path / f"eval{eval_batch_size}.yaml", tiny_pretrain_config(
            run_dir, objective={"name": "contrastive"}, train={"max_steps": 4, "eval_every_steps": 2},
            data={"val_fraction": 0.5, "eval_batch_size": eval_batch_size}))
        result = ptft("pretrain", config)
        assert result.code == 0, result.stderr
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        records[eval_batch_size] = [r for r in map(json.loads, lines) if "val/loss" in r]
    assert [r["step"] for r in records[64]] == [2, 4]
    for eval_batch_size in (256, 1024):
        for ours, theirs in zip(records[eval_batch_size], records[64]):
            assert ours["val/loss"] == pytest.approx(theirs["val/loss"], rel=1e-5)
            assert ours["val/acc"] == pytest.approx(theirs["val/acc"], rel=1e-5)
