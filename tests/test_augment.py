"""Batched augmentations: shapes, ranges, identities, determinism and exact geometry."""

from __future__ import annotations

import pytest
import torch

from ptft.objectives import augment as aug

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def gen(seed: int, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def images(n: int = 6, c: int = 3, h: int = 8, w: int = 6, device: str = "cpu") -> torch.Tensor:
    """(n, c, h, w) float32 in [0, 1]; non-square so height and width cannot be mixed up."""
    return torch.rand((n, c, h, w), generator=gen(123)).to(device)


STRONG = aug.Augment(crop_scale=(0.4, 1.0), crop_ratio=(0.75, 1.33), max_rotation=30.0, max_shift=0.2,
                     flip_p=0.5, cutout=3, noise_std=0.1)

ALL_TRANSFORMS = {
    "crop": lambda x, g: aug.random_resized_crop(x, (0.3, 1.0), (0.75, 1.33), g),
    "translate": lambda x, g: aug.random_translate(x, 0.25, g),
    "rotation": lambda x, g: aug.random_rotation(x, 45.0, g),
    "flip": lambda x, g: aug.horizontal_flip(x, 0.5, g),
    "noise": lambda x, g: aug.gaussian_noise(x, 0.3, g),
    "cutout": lambda x, g: aug.cutout(x, 3, g),
    "augment": STRONG,
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(ALL_TRANSFORMS))
def test_shape_dtype_device_and_range_are_kept(name, device):
    x = images(device=device)
    out = ALL_TRANSFORMS[name](x, gen(0, device))
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert not torch.equal(out, x)


@pytest.mark.parametrize("name", sorted(ALL_TRANSFORMS))
def test_same_seed_same_output_other_seed_differs(name):
    x = images()
    transform = ALL_TRANSFORMS[name]
    assert torch.equal(transform(x, gen(7)), transform(x, gen(7)))
    assert not torch.equal(transform(x, gen(7)), transform(x, gen(8)))


def test_zero_strength_is_identity():
    x = images()
    torch.testing.assert_close(aug.random_resized_crop(x, (1.0, 1.0), (1.0, 1.0), gen(0)), x, atol=1e-6, rtol=0)
    torch.testing.assert_close(aug.random_rotation(x, 0.0, gen(0)), x, atol=1e-6, rtol=0)
    torch.testing.assert_close(aug.random_translate(x, 0.0, gen(0)), x, atol=1e-6, rtol=0)
    torch.testing.assert_close(aug.Augment()(x, gen(0)), x, atol=1e-6, rtol=0)
    assert torch.equal(aug.horizontal_flip(x, 0.0, gen(0)), x)
    assert torch.equal(aug.gaussian_noise(x, 0.0, gen(0)), x)
    assert torch.equal(aug.cutout(x, 0, gen(0)), x)


def test_flip_with_p_one_mirrors_every_image_and_half_flips_some():
    x = images(n=32)
    assert torch.equal(aug.horizontal_flip(x, 1.0, gen(0)), x.flip(-1))
    out = aug.horizontal_flip(x, 0.5, gen(0))
    flipped = [torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x)]
    kept = [torch.equal(o, xi) for o, xi in zip(out, x)]
    assert all(f != k for f, k in zip(flipped, kept))
    assert 0 < sum(flipped) < len(x)


@pytest.mark.parametrize("size", [1, 3, 6])
def test_cutout_zeroes_exactly_one_square_inside_the_image(size):
    x = torch.ones(16, 2, 8, 6)
    out = aug.cutout(x, size, gen(3))
    zeros = out == 0  # (N, C, H, W)
    assert torch.equal(zeros[:, 0], zeros[:, 1])  # the same square in every channel
    for image in zeros[:, 0]:
        assert image.sum() == size * size
        rows, cols = image.nonzero(as_tuple=True)
        assert rows.max() - rows.min() == size - 1 and cols.max() - cols.min() == size - 1
    with pytest.raises(ValueError, match="does not fit"):
        aug.cutout(x, 7, gen(0))


def test_gaussian_noise_has_the_requested_spread():
    x = torch.full((64, 1, 16, 16), 0.5)
    noise = aug.gaussian_noise(x, 0.1, gen(0)) - x
    assert abs(noise.mean().item()) < 0.005
    assert noise.std().item() == pytest.approx(0.1, rel=0.03)


def test_apply_affine_shifts_by_one_pixel_with_zero_fill():
    x = images(n=2, h=5, w=4)
    one_pixel = 2 / x.shape[-1]  # the normalised frame spans 2 units across the width
    shift = torch.tensor([[1.0, 0.0, one_pixel], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]).expand(2, 3, 3)
    out = aug.apply_affine(x, shift)
    # Output column j samples input column j + 1; the last column falls outside and is 0.
    torch.testing.assert_close(out[..., :-1], x[..., 1:], atol=1e-6, rtol=0)
    assert torch.equal(out[..., -1], torch.zeros_like(out[..., -1]))


def test_crops_stay_inside_the_image_with_the_requested_area():
    x = images(n=256)
    m = aug.crop_matrices(x, (0.2, 0.6), (1.0, 1.0), gen(0))  # (N, 3, 3)
    width, height, centre_x, centre_y = m[:, 0, 0], m[:, 1, 1], m[:, 0, 2], m[:, 1, 2]
    area = width * height
    assert area.min() >= 0.2 - 1e-6 and area.max() <= 0.6 + 1e-6
    assert (centre_x.abs() + width).max() <= 1 + 1e-6 and (centre_y.abs() + height).max() <= 1 + 1e-6
    # A crop inside a constant image never samples the zero padding.
    ones = torch.ones(8, 1, 8, 8)
    torch.testing.assert_close(aug.random_resized_crop(ones, (0.1, 1.0), (0.5, 2.0), gen(1)), ones, atol=1e-5,
                               rtol=0)


def test_rotations_are_rigid_in_pixel_space_and_bounded():
    x = images(n=64, h=8, w=4)  # aspect 1/2: a normalised-frame rotation would shear
    m = aug.rotation_matrices(x, 20.0, gen(0))[:, :2, :2]
    to_pixels = torch.diag(torch.tensor([4.0, 8.0]))  # half-extents (W/2, H/2) up to a common factor
    pixel_rotation = to_pixels @ m @ torch.linalg.inv(to_pixels)
    identity = torch.eye(2).expand(64, 2, 2)
    torch.testing.assert_close(pixel_rotation @ pixel_rotation.transpose(1, 2), identity, atol=1e-5, rtol=0)
    angles = torch.rad2deg(torch.atan2(pixel_rotation[:, 1, 0], pixel_rotation[:, 0, 0]))
    assert angles.abs().max() <= 20.0 + 1e-4 and angles.abs().max() > 10.0


def test_translations_are_bounded_shifts():
    m = aug.translation_matrices(images(n=128), 0.25, gen(0))
    torch.testing.assert_close(m[:, :2, :2], torch.eye(2).expand(128, 2, 2))
    assert m[:, :2, 2].abs().max() <= 0.5 + 1e-6 and m[:, :2, 2].abs().max() > 0.4


def test_augment_resamples_once_with_the_composed_matrix():
    x = images()
    augment = aug.Augment(crop_scale=(0.5, 1.0), crop_ratio=(0.8, 1.25), max_rotation=25.0, max_shift=0.1)
    g = gen(5)
    composed = (aug.crop_matrices(x, (0.5, 1.0), (0.8, 1.25), g) @ aug.rotation_matrices(x, 25.0, g)
                @ aug.translation_matrices(x, 0.1, g))
    torch.testing.assert_close(augment(x, gen(5)), aug.apply_affine(x, composed))



# ---- colour and photometric ops: each against torchvision's, image by image ------------------------

tvf = pytest.importorskip("torchvision.transforms.v2.functional")


def colour_images(n: int = 4, c: int = 3) -> torch.Tensor:
    """Tiny (n, c, 5, 6) float images in [0, 1], with exact greys and saturated pixels among them."""
    x = torch.rand((n, c, 5, 6), generator=gen(11))
    x[:, :, 0, 0] = 0.5  # grey: hue undefined
    x[:, :, 0, 1] = 1.0
    x[:, :, 0, 2] = 0.0
    return x


FACTORS = torch.tensor([0.0, 0.6, 1.0, 1.7])
COLOUR_OPS = [
    ("brightness", aug.adjust_brightness, tvf.adjust_brightness, FACTORS),
    ("contrast", aug.adjust_contrast, tvf.adjust_contrast, FACTORS),
    ("saturation", aug.adjust_saturation, tvf.adjust_saturation, FACTORS),
    ("hue", aug.adjust_hue, tvf.adjust_hue, torch.tensor([-0.5, -0.1, 0.0, 0.35])),
]


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("name, ours, reference, factors", COLOUR_OPS, ids=[op[0] for op in COLOUR_OPS])
def test_each_colour_op_matches_torchvision_with_a_parameter_per_image(name, ours, reference, factors, channels):
    x = colour_images(c=channels)
    expected = torch.stack([reference(image, float(f)) for image, f in zip(x, factors)])
    torch.testing.assert_close(ours(x, factors), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("channels", [3, 1])
def test_grayscale_matches_torchvision_and_keeps_the_channel_count(channels):
    x = colour_images(c=channels)
    expected = torch.stack([tvf.rgb_to_grayscale(image, num_output_channels=channels) for image in x])
    torch.testing.assert_close(aug.grayscale(x), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kernel_size", [3, 5])
def test_gaussian_blur_matches_torchvision_with_a_sigma_per_image(kernel_size):
    x = colour_images()
    sigmas = torch.tensor([0.1, 0.5, 1.0, 2.0])
    expected = torch.stack([tvf.gaussian_blur(image, [kernel_size, kernel_size], [float(s), float(s)])
                            for image, s in zip(x, sigmas)])
    torch.testing.assert_close(aug.gaussian_blur(x, kernel_size, sigmas), expected, atol=1e-6, rtol=0)


def test_solarize_matches_torchvision():
    x = colour_images()
    torch.testing.assert_close(aug.solarize(x, 0.5), tvf.solarize(x, 0.5), atol=0, rtol=0)


def test_random_colour_ops_draw_their_parameters_per_image_from_the_generator():
    x = colour_images(n=16)
    jitter = aug.Augment(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, jitter_p=1.0)
    out = jitter(x, gen(0))
    assert torch.equal(out, jitter(x, gen(0))) and not torch.equal(out, jitter(x, gen(1)))
    # Per image: the mean brightness ratio differs from image to image.
    ratios = out.mean(dim=(1, 2, 3)) / x.mean(dim=(1, 2, 3))
    assert ratios.std() > 0.05
    half = aug.random_grayscale(x, 0.5, gen(0))
    grey = torch.tensor([torch.equal(o[0], o[1]) and torch.equal(o[1], o[2]) for o in half])
    assert 0 < grey.sum() < len(x)
    blurred = aug.random_gaussian_blur(x, 3, (0.1, 2.0), 1.0, gen(0))
    assert blurred.shape == x.shape and not torch.equal(blurred, x)
    solarized = aug.random_solarize(x, 0.5, 0.5, gen(0))
    changed = torch.tensor([not torch.equal(s, xi) for s, xi in zip(solarized, x)])
    assert 0 < changed.sum() < len(x)


def test_colour_strengths_of_zero_leave_the_batch_unchanged_and_every_op_stays_in_range():
    x = colour_images(n=8)
    assert not aug.Augment().changes_images
    torch.testing.assert_close(aug.Augment(jitter_p=1.0)(x, gen(0)), x, atol=1e-6, rtol=0)  # one resampling
    strong = aug.Augment(brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2, jitter_p=1.0, grayscale_p=0.5,
                         blur_p=1.0, blur_sigma=(0.1, 2.0), solarize_p=0.5)
    out = strong(x, gen(3))
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1 and strong.changes_images


def test_simclr_rgb_preset_is_simclrs_recipe_and_refuses_grey_images(tmp_path):
    from ptft.errors import UserError
    from ptft.models import MODELS
    from ptft.objectives import OBJECTIVES

    model = MODELS.get("tiny_conv_autoencoder")((3, 32, 32), 10)
    objective = OBJECTIVES.get("contrastive")(model, (3, 32, 32), preset="simclr_rgb")
    augment = objective.augment
    assert (augment.brightness, augment.contrast, augment.saturation, augment.hue) == (0.8, 0.8, 0.8, 0.2)
    assert (augment.jitter_p, augment.grayscale_p, augment.blur_p, augment.blur_sigma) == (0.8, 0.2, 0.5, (0.1, 2.0))
    assert augment.blur_kernel == 3 and augment.crop_scale == (0.08, 1.0) and augment.flip_p == 0.5
    grey = MODELS.get("tiny_conv_autoencoder")((1, 32, 32), 10)
    with pytest.raises(UserError, match=r"objective.preset: simclr_rgb is for RGB images"):
        OBJECTIVES.get("contrastive")(grey, (1, 32, 32), preset="simclr_rgb")
    with pytest.raises(UserError, match=r"objective.max_rotation: set beside objective.preset 'simclr_rgb'"):
        OBJECTIVES.get("contrastive")(model, (3, 32, 32), preset="simclr_rgb", max_rotation=5.0)


def test_simclr_rgb_pretraining_on_a_colour_folder_resumes_bitwise_exactly(tmp_path, ptft):
    from PIL import Image
    from safetensors.torch import load_file

    from conftest import tiny_pretrain_config, write_yaml

    root = tmp_path / "images"
    pixels = torch.randint(0, 256, (12, 16, 16, 3), generator=gen(0), dtype=torch.uint8).numpy()
    for i, image in enumerate(pixels):
        (root / "train" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / "train" / f"c{i % 2}" / f"{i}.png")
    sections = dict(data={"name": "imagefolder", "root": str(root), "batch_size": 4, "val_fraction": 0.25},
                    model={"name": "tiny_conv_autoencoder"},
                    objective={"name": "contrastive", "preset": "simclr_rgb", "projector_dim": 8, "hidden_dim": 8})
    runs = {}
    for name, steps in (("long", 6), ("short", 3)):
        runs[name] = write_yaml(tmp_path / f"{name}.yaml", tiny_pretrain_config(
            tmp_path / name, train={"max_steps": steps, "eval_every_steps": 3}, **sections))
        assert ptft("pretrain", runs[name]).code == 0
    resumed = ptft("pretrain", runs["short"], "train.max_steps=6", "--resume")
    assert resumed.code == 0, resumed.stderr
    long, short = (load_file((tmp_path / n / "checkpoints" / "last").resolve() / "model.safetensors")
                   for n in ("long", "short"))
    assert long.keys() == short.keys() and all(torch.equal(long[k], short[k]) for k in long)
