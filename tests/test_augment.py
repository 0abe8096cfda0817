"""Batch augmentation on the device: shapes, per-sample randomness, identities, determinism."""

import pytest
import torch

from kit.data.augment import BatchAugment, color_jitter, cutout, random_crop, random_flip, random_rotation
from kit.recipe import AugmentSpec


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(n: int = 16) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=_gen(1))


def test_crop_is_a_shift_of_the_zero_padded_image():
    x = _images()
    out = random_crop(x, 4, _gen())
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (4,) * 4)
    for i in range(len(x)):  # each output is some 32x32 window of its padded input
        windows = padded[i].unfold(1, 32, 1).unfold(2, 32, 1)  # (C, 9, 9, 32, 32)
        assert (windows == out[i][:, None, None]).flatten(3).all(-1).all(0).any()


def test_crop_offsets_differ_per_image():
    out = random_crop(_images(64), 4, _gen())
    assert len({tuple(o.flatten()[:50].tolist()) for o in (out != 0).float()}) > 1


def test_flip_mirrors_about_half_per_image():
    x = _images(200)
    out = random_flip(x, _gen())
    flipped = (out == x.flip(-1)).flatten(1).all(1)
    kept = (out == x).flatten(1).all(1)
    assert (flipped | kept).all() and 60 < flipped.sum() < 140


def test_identities_at_zero_strength():
    x = _images()
    assert torch.allclose(random_rotation(x, 0.0, _gen()), x, atol=1e-5)
    assert torch.allclose(color_jitter(x, 0.0, _gen()), x, atol=1e-6)


@pytest.mark.parametrize("size", [1, 7, 8])
def test_cutout_zeroes_a_size_by_size_square_clipped_at_the_border(size):
    out = cutout(torch.ones(256, 3, 32, 32), size, _gen())
    zeros = (out == 0).all(1)  # (B, H, W)
    rows, cols = zeros.any(2).sum(1), zeros.any(1).sum(1)
    assert (zeros.flatten(1).sum(1) == rows * cols).all()  # a rectangle
    assert (rows <= size).all() and (cols <= size).all() and (rows >= 1).all()
    inside = (rows == size) & (cols == size)
    assert inside.any()  # away from the border the square is exactly size x size


def test_batch_augment_is_deterministic_given_the_generator():
    spec = AugmentSpec(crop_padding=4, flip=True, rotation_degrees=10, color_jitter=0.2, cutout_size=8)
    aug = BatchAugment(spec, torch.tensor([0.5] * 3), torch.tensor([0.25] * 3), 10)
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=_gen(2))
    labels = torch.arange(8)
    a, la = aug(images, labels, _gen(5))
    b, lb = aug(images, labels, _gen(5))
    c, _ = aug(images, labels, _gen(6))
    assert torch.equal(a, b) and torch.equal(la, labels) and not torch.equal(a, c)


def test_mixup_gives_soft_targets():
    aug = BatchAugment(AugmentSpec(mixup_alpha=0.4), torch.zeros(3), torch.ones(3), 10)
    inputs, targets = aug(torch.zeros(8, 3, 32, 32, dtype=torch.uint8), torch.arange(8), _gen())
    assert targets.shape == (8, 10) and torch.allclose(targets.sum(1), torch.ones(8))
