"""Per-sample TrivialAugment/RandAugment ops against torchvision's single-image functional ops at the same
magnitude, the policies' magnitude tables against torchvision's, per-sample independence, random erasing,
reflect-padded crops and the sharpness jitter."""

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode

from kit.data.augment import BatchAugment, random_crop, random_erasing, random_sharpness
from kit.data.autoaugment import NUM_BINS, OPS, apply_ops, magnitudes, rand_augment, trivial_augment
from kit.recipe import AugmentSpec

NEAREST = InterpolationMode.NEAREST


def _images(n: int = 6, seed: int = 0) -> torch.Tensor:
    """Smooth colour images in [0, 1] (upsampled noise: structure for the geometric ops to move)."""
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.rand(n, 3, 8, 8, generator=g), size=32, mode="bilinear", align_corners=False).clamp(0, 1)


REFERENCE = {
    "Identity": lambda img, m: img,
    "ShearX": lambda img, m: TF.affine(img, angle=0.0, translate=[0, 0], scale=1.0, shear=[math.degrees(math.atan(m)), 0.0],
                                       interpolation=NEAREST, center=[0, 0]),
    "ShearY": lambda img, m: TF.affine(img, angle=0.0, translate=[0, 0], scale=1.0, shear=[0.0, math.degrees(math.atan(m))],
                                       interpolation=NEAREST, center=[0, 0]),
    "TranslateX": lambda img, m: TF.affine(img, angle=0.0, translate=[int(m), 0], scale=1.0, shear=[0.0, 0.0], interpolation=NEAREST),
    "TranslateY": lambda img, m: TF.affine(img, angle=0.0, translate=[0, int(m)], scale=1.0, shear=[0.0, 0.0], interpolation=NEAREST),
    "Rotate": lambda img, m: TF.rotate(img, angle=m, interpolation=NEAREST),
    "Brightness": lambda img, m: TF.adjust_brightness(img, 1.0 + m),
    "Color": lambda img, m: TF.adjust_saturation(img, 1.0 + m),
    "Contrast": lambda img, m: TF.adjust_contrast(img, 1.0 + m),
    "Sharpness": lambda img, m: TF.adjust_sharpness(img, 1.0 + m),
    "Posterize": lambda img, m: TF.posterize(img, int(m)),
    "Solarize": lambda img, m: TF.solarize(img, m),
    "AutoContrast": lambda img, m: TF.autocontrast(img),
    "Equalize": lambda img, m: TF.equalize(img),
}
GEOMETRIC = {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"}
CASES = [("Identity", 0.0), ("ShearX", 0.3), ("ShearX", -0.99), ("ShearY", 0.5), ("TranslateX", 7.6), ("TranslateX", -12.0),
         ("TranslateY", 3.0), ("Rotate", 30.0), ("Rotate", -135.0), ("Brightness", 0.6), ("Brightness", -0.5),
         ("Color", 0.9), ("Color", -0.7), ("Contrast", 0.5), ("Contrast", -0.99), ("Sharpness", 0.9), ("Sharpness", -0.6),
         ("Posterize", 2.0), ("Posterize", 6.0), ("Solarize", 0.4), ("AutoContrast", 0.0), ("Equalize", 0.0)]


@pytest.mark.parametrize("name, m", CASES, ids=[f"{n}{m:g}" for n, m in CASES])
def test_each_op_matches_torchvision(name, m):
    x = _images()
    ours = apply_ops(x, torch.full((len(x),), OPS.index(name)), torch.full((len(x),), m))
    reference = torch.stack([REFERENCE[name](img, m) for img in x])
    if name in GEOMETRIC:  # nearest sampling: a pixel may land on the other side of a boundary (float32 vs float64)
        assert (ours - reference).abs().gt(1e-6).float().mean() < 0.01
    else:
        assert torch.allclose(ours, reference, atol=1e-5), (ours - reference).abs().max()


@pytest.mark.parametrize("policy, cls", [("trivialaugment", T.TrivialAugmentWide), ("randaugment", T.RandAugment)])
def test_magnitude_tables_are_torchvisions(policy, cls):
    table = magnitudes(policy, 32)
    space = cls()._AUGMENTATION_SPACE
    for i, op in enumerate(OPS):
        values = space[op][0](NUM_BINS, 32, 32)
        expected = torch.zeros(NUM_BINS) if values is None else values.float()
        assert torch.allclose(table[i, :-1], expected), op
        assert bool(table[i, -1]) == space[op][1], op  # the signed flag


def test_ops_are_drawn_per_sample():
    x = _images(1).expand(64, -1, -1, -1).contiguous()  # one image, 64 times
    g = torch.Generator().manual_seed(0)
    out = trivial_augment(x, g, magnitudes("trivialaugment", 32))
    distinct = {tuple(o.flatten()[::37].round(decimals=4).tolist()) for o in out}
    assert len(distinct) > 20  # a batch-level draw would give one output
    again = trivial_augment(x, torch.Generator().manual_seed(0), magnitudes("trivialaugment", 32))
    assert torch.equal(out, again)
    out2 = rand_augment(x, torch.Generator().manual_seed(1), magnitudes("randaugment", 32), num_ops=2, magnitude=9)
    assert len({tuple(o.flatten()[::37].round(decimals=4).tolist()) for o in out2}) > 20


def test_random_erasing_rectangles_per_sample():
    x = torch.ones(200, 3, 32, 32)
    out = random_erasing(x, 1.0, (0.02, 0.1), "const", torch.Generator().manual_seed(0))
    erased = (out == 0).all(1)  # (B, H, W)
    rows, cols, area = erased.any(2).sum(1), erased.any(1).sum(1), erased.flatten(1).sum(1)
    assert (area == rows * cols).all()  # rectangles
    assert ((area >= 0.02 * 1024 * 0.5) & (area <= 0.1 * 1024 * 1.5)).all()  # the area range, up to rounding
    assert len({(int(r), int(c)) for r, c in zip(rows, cols)}) > 10  # sizes drawn per image
    assert torch.equal(random_erasing(x, 0.0, (0.02, 0.1), "const", torch.Generator()), x)
    pixel = random_erasing(x, 1.0, (0.02, 0.1), "pixel", torch.Generator().manual_seed(0))
    assert ((pixel != 1).any(1).flatten(1).sum(1) > 0).all()


def test_reflect_crop_is_a_window_of_the_reflect_padded_image():
    x = _images(8)
    out = random_crop(x, 4, torch.Generator().manual_seed(0), "reflect")
    padded = F.pad(x, (4,) * 4, mode="reflect")
    for i in range(len(x)):
        windows = padded[i].unfold(1, 32, 1).unfold(2, 32, 1)
        assert (windows == out[i][:, None, None]).flatten(3).all(-1).all(0).any()


def test_sharpness_jitter_matches_torchvision_when_applied():
    x = _images(4)
    out = random_sharpness(x, 2.0, 1.0, torch.Generator())
    assert torch.allclose(out, torch.stack([TF.adjust_sharpness(img, 2.0) for img in x]), atol=1e-6)
    assert torch.equal(random_sharpness(x, 2.0, 0.0, torch.Generator()), x)


def test_batch_augment_with_a_policy_and_erasing_is_deterministic():
    spec = AugmentSpec(policy="trivialaugment", erasing_prob=0.5, crop_padding_mode="reflect")
    aug = BatchAugment(spec, torch.tensor([0.5] * 3), torch.tensor([0.25] * 3), 10)
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    a, _ = aug(images, torch.arange(16), torch.Generator().manual_seed(3))
    b, _ = aug(images, torch.arange(16), torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (16, 3, 32, 32) and torch.isfinite(a).all()
