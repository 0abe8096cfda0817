"""Per-sample random augmentation done on whole batches on the device (no DataLoader, no host copies).

Order: crop (zero or reflect padding) -> flip -> TrivialAugment/RandAugment/AugMix -> sharpness -> rotation -> colour
jitter -> normalize -> cutout -> random erasing -> mixup/cutmix.
Every random draw comes from one torch.Generator on the device, so a run resumes bit-exactly.
"""

import math

import torch
import torch.nn.functional as F

from kit.data.autoaugment import AUGMIX_OPS, OPS, augmix, magnitudes, rand_augment, sharpen, trivial_augment
from kit.recipe import AugmentSpec


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float in [0, 1]."""
    return images.float().div_(255)


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std with per-channel (C,) tensors."""
    return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def _uniform(n: int, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=gen, device=gen.device) * (high - low) + low


def random_crop(x: torch.Tensor, padding: int, gen: torch.Generator, mode: str = "zeros") -> torch.Tensor:
    """Each image gets its own crop of the padded batch (torchvision RandomCrop(padding=p, padding_mode=...))."""
    b, c, h, w = x.shape
    padded = F.pad(x, (padding,) * 4, mode="reflect" if mode == "reflect" else "constant")
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=gen, device=gen.device)
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=gen, device=gen.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # (B, 1, 1, W)
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows, cols]


def random_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mirror half of the images, chosen per image."""
    mask = torch.rand(x.shape[0], generator=gen, device=gen.device) < 0.5
    return torch.where(mask[:, None, None, None], x.flip(-1), x)


def alternating_flip(x: torch.Tensor, index: torch.Tensor, parity: torch.Tensor) -> torch.Tensor:
    """airbench's flip: image i is mirrored in every other epoch, starting from a fixed pseudo-random bit of i,
    so over any two epochs it is seen both ways (a fresh coin repeats a side half of the time)."""
    first = (index * 2654435761 >> 16) & 1  # Knuth's multiplicative hash: a fixed, well-mixed bit per image
    return torch.where(((first + parity) % 2 == 1)[:, None, None, None], x.flip(-1), x)


def random_rotation(x: torch.Tensor, degrees: float, gen: torch.Generator) -> torch.Tensor:
    """Rotate each image by its own angle in [-degrees, degrees] (bilinear, zero fill)."""
    angle = _uniform(x.shape[0], -degrees, degrees, gen) * (math.pi / 180)
    cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def color_jitter(x: torch.Tensor, strength: float, gen: torch.Generator) -> torch.Tensor:
    """Brightness, contrast and saturation factors in [1 - s, 1 + s], drawn per image (torchvision's ColorJitter math)."""
    b = x.shape[0]
    luma = lambda t: t if t.shape[1] == 1 else t[:, :1] * 0.299 + t[:, 1:2] * 0.587 + t[:, 2:3] * 0.114  # noqa: E731
    x = x * _uniform(b, 1 - strength, 1 + strength, gen).view(b, 1, 1, 1)
    mean = luma(x).mean((2, 3), keepdim=True)
    x = mean + (x - mean) * _uniform(b, 1 - strength, 1 + strength, gen).view(b, 1, 1, 1)
    gray = luma(x)
    x = gray + (x - gray) * _uniform(b, 1 - strength, 1 + strength, gen).view(b, 1, 1, 1)
    return x.clamp(0, 1)


def cutout(x: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """Zero a size x size square (clipped at the border) at a random centre in each image: rows
    cy - size//2 .. cy - size//2 + size - 1 (DeVries & Taylor's Cutout)."""
    b, _, h, w = x.shape
    cy = torch.randint(0, h, (b, 1, 1), generator=gen, device=gen.device)
    cx = torch.randint(0, w, (b, 1, 1), generator=gen, device=gen.device)
    ys = torch.arange(h, device=x.device).view(1, h, 1) - cy + size // 2  # 0..size-1 inside the square
    xs = torch.arange(w, device=x.device).view(1, 1, w) - cx + size // 2
    inside = (ys >= 0) & (ys < size) & (xs >= 0) & (xs < size)
    return x.masked_fill(inside[:, None], 0.0)


def random_erasing(x: torch.Tensor, prob: float, area: tuple[float, float], mode: str, gen: torch.Generator,
                   attempts: int = 10) -> torch.Tensor:
    """timm's RandomErasing per sample: with probability `prob`, a rectangle of area fraction in `area` and
    log-uniform aspect in [0.3, 1/0.3], the first of `attempts` draws that fits, filled with zeros (const),
    one random colour (rand) or random pixels (pixel), on normalized images."""
    b, c, h, w = x.shape
    dev = gen.device
    target = (torch.rand(b, attempts, generator=gen, device=dev) * (area[1] - area[0]) + area[0]) * (h * w)
    log_aspect = torch.rand(b, attempts, generator=gen, device=dev) * (2 * math.log(1 / 0.3)) - math.log(1 / 0.3)
    eh = (target * log_aspect.exp()).sqrt().round()
    ew = (target / log_aspect.exp()).sqrt().round()
    fits = (eh < h) & (ew < w)
    first = fits.float().argmax(1, keepdim=True)  # the first attempt that fits (timm's loop breaks there)
    eh, ew = eh.gather(1, first).view(b, 1, 1), ew.gather(1, first).view(b, 1, 1)
    top = (torch.rand(b, 1, 1, generator=gen, device=dev) * (h - eh + 1)).floor()
    left = (torch.rand(b, 1, 1, generator=gen, device=dev) * (w - ew + 1)).floor()
    apply = (torch.rand(b, generator=gen, device=dev) < prob) & fits.any(1)
    ys = torch.arange(h, device=dev).view(1, h, 1)
    xs = torch.arange(w, device=dev).view(1, 1, w)
    inside = (ys >= top) & (ys < top + eh) & (xs >= left) & (xs < left + ew) & apply.view(b, 1, 1)
    if mode == "const":
        fill = torch.zeros_like(x)
    elif mode == "rand":
        fill = torch.randn(b, c, 1, 1, generator=gen, device=dev, dtype=x.dtype).expand_as(x)
    else:
        fill = torch.randn(x.shape, generator=gen, device=dev, dtype=x.dtype)
    return torch.where(inside[:, None], fill, x)


def random_sharpness(x: torch.Tensor, factor: float, prob: float, gen: torch.Generator) -> torch.Tensor:
    """torchvision's RandomAdjustSharpness(factor, p), drawn per image."""
    apply = torch.rand(x.shape[0], generator=gen, device=gen.device) < prob
    return torch.where(apply.view(-1, 1, 1, 1), sharpen(x, torch.full((x.shape[0],), factor, device=x.device)), x)


class BatchAugment:
    """uint8 images + int labels -> normalized float inputs and the loss's targets, all on the device."""

    def __init__(self, spec: AugmentSpec, mean: torch.Tensor, std: torch.Tensor, num_classes: int,
                 label_smoothing: float = 0.0, image_size: int = 32):
        self.spec, self.mean, self.std = spec, mean, std
        self.policy_table = None
        if spec.policy != "none":
            self.policy_table = magnitudes(spec.policy, image_size).to(mean.device)  # RandAugment translates by size
        self.augmix_ops = torch.tensor([OPS.index(op) for op in AUGMIX_OPS], device=mean.device)  # made once, not per update
        self.mixup = None
        if spec.mixup_alpha > 0 or spec.cutmix_alpha > 0:
            from timm.data import Mixup
            self.mixup = Mixup(mixup_alpha=spec.mixup_alpha, cutmix_alpha=spec.cutmix_alpha, prob=spec.mix_prob,
                               label_smoothing=label_smoothing, num_classes=num_classes)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, gen: torch.Generator, index: torch.Tensor | None = None,
                 parity: torch.Tensor | None = None, soft: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`index` (the images' dataset indices) and `parity` (the epoch's, 0 or 1) drive alternating flips. `soft`:
        (B, K) class probabilities to train on instead of `labels` (pseudo-labels), mixed as mixup mixes labels."""
        spec, x = self.spec, to_float(images)
        if spec.crop_padding:
            x = random_crop(x, spec.crop_padding, gen, spec.crop_padding_mode)
        if spec.flip and spec.alternate_flip and index is not None:
            x = alternating_flip(x, index, parity)
        elif spec.flip:
            x = random_flip(x, gen)
        if spec.policy == "trivialaugment":
            x = trivial_augment(x, gen, self.policy_table)
        elif spec.policy == "randaugment":
            x = rand_augment(x, gen, self.policy_table, spec.randaugment_ops, spec.randaugment_magnitude)
        elif spec.policy == "augmix":
            x = augmix(x, gen, self.policy_table, self.augmix_ops, spec.augmix_magnitude, spec.augmix_width, spec.augmix_depth)
        if spec.sharpness_factor and spec.sharpness_prob:
            x = random_sharpness(x, spec.sharpness_factor, spec.sharpness_prob, gen)
        if spec.rotation_degrees:
            x = random_rotation(x, spec.rotation_degrees, gen)
        if spec.color_jitter:
            x = color_jitter(x, spec.color_jitter, gen)
        x = normalize(x, self.mean, self.std)
        if spec.cutout_size:
            x = cutout(x, spec.cutout_size, gen)
        if spec.erasing_prob:
            x = random_erasing(x, spec.erasing_prob, spec.erasing_area, spec.erasing_mode, gen)
        if self.mixup is not None and soft is not None:
            return x, self._mix_soft(x, soft)
        if self.mixup is not None:
            return self.mixup(x, labels)  # soft targets for SoftTargetCrossEntropy
        return x, labels if soft is None else soft  # nn.CrossEntropyLoss takes class indices or probabilities

    def _mix_soft(self, x: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
        """timm's Mixup on soft targets: the batch mixed in place with its reverse (timm's own `_mix_batch`, so the
        images are mixed exactly as for hard labels), the smoothed targets mixed with the same lambda
        (timm's `mixup_target` does this for class indices only)."""
        lam = self.mixup._mix_batch(x)
        smooth = self.mixup.label_smoothing
        targets = soft * (1 - smooth) + smooth / soft.shape[1]
        return targets * lam + targets.flip(0) * (1 - lam)
