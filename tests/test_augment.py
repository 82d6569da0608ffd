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

