"""Generated corruptions for `kit evaluate --corrupt`: how a checkpoint holds up when the hidden set comes from
another source. Seven corruptions at severities 1-5 on whole batches on the device, seeded, after CIFAR-10-C
(Hendrycks & Dietterich, 2019; its severity constants for 32x32 images): Gaussian noise, Gaussian blur,
contrast, brightness, saturation, JPEG (Pillow's codec, on the CPU) and pixelate. Images stay uint8 in
and out, as the data is stored."""

import io
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from kit.data.autoaugment import gray

CORRUPTIONS = ("noise", "blur", "contrast", "brightness", "saturation", "jpeg", "pixelate")
SEVERITIES = (1, 2, 3, 4, 5)
_LEVELS = {  # CIFAR-10-C's constants per severity (its make_cifar_c.py)
    "noise": (0.04, 0.06, 0.08, 0.09, 0.10),  # Gaussian noise sigma, on [0, 1]
    "blur": (0.4, 0.6, 0.7, 0.8, 1.0),  # Gaussian blur sigma, pixels
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),  # contrast kept
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),  # added to the HSV value (here: to each channel)
    "saturation": (0.3, 0.1, 2.0, 5.0, 20.0),  # CIFAR-10-C saturate's factor (below 1 desaturates)
    "jpeg": (80, 65, 58, 50, 40),  # JPEG quality
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),  # side kept before scaling back
}


def corrupt(images: torch.Tensor, name: str, severity: int, seed: int = 0) -> torch.Tensor:
    """uint8 (N, C, H, W) -> the same images under `name` at `severity` (1-5); the same seed gives the same result."""
    level = _LEVELS[name][severity - 1]
    x = images.float() / 255
    if name == "noise":
        gen = torch.Generator(device=images.device).manual_seed(seed)
        x = x + torch.randn(x.shape, generator=gen, device=x.device) * level
    elif name == "blur":
        x = _gaussian_blur(x, level)
    elif name == "contrast":
        m = x.mean((1, 2, 3), keepdim=True)
        x = (x - m) * level + m
    elif name == "brightness":
        x = x + level
    elif name == "saturation":
        luma = gray(x)
        x = luma + (x - luma) * level
    elif name == "jpeg":
        return _jpeg(images, int(level))
    elif name == "pixelate":
        h, w = x.shape[-2:]
        small = F.interpolate(x, size=(max(1, int(h * level)), max(1, int(w * level))), mode="area")
        x = F.interpolate(small, size=(h, w), mode="nearest")
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-t ** 2 / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    c = x.shape[1]
    padded = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(padded, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def _jpeg(images: torch.Tensor, quality: int) -> torch.Tensor:
    """Each image through Pillow's JPEG encoder and decoder at `quality`."""
    out = []
    for image in images.cpu().permute(0, 2, 3, 1).numpy():  # (H, W, C) uint8
        buffer = io.BytesIO()
        Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(buffer, "JPEG", quality=quality)
        out.append(np.asarray(Image.open(buffer)).reshape(image.shape))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous().to(images.device)
