"""Test-time augmentation views: tiny named functions on normalized (B, C, H, W) batches
(airbench's infer_mirror / infer_mirror_translate idea)."""

import torch
import torch.nn.functional as F

from kit.errors import KitError


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


def mirror(x: torch.Tensor) -> torch.Tensor:
    return x.flip(-1)


def translate(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Shift content by (dy, dx) pixels, filling the border by reflection."""
    pad = max(abs(dy), abs(dx))
    padded = F.pad(x, (pad,) * 4, mode="reflect")
    h, w = x.shape[-2:]
    return padded[..., pad - dy:pad - dy + h, pad - dx:pad - dx + w]


def shift_up_left(x: torch.Tensor) -> torch.Tensor:
    return translate(x, -1, -1)


def shift_down_right(x: torch.Tensor) -> torch.Tensor:
    return translate(x, 1, 1)


def _mirrored(view):
    def both(x: torch.Tensor) -> torch.Tensor:
        return mirror(view(x))
    both.__name__ = f"mirror+{view.__name__}"
    return both


TTA_VIEWS = {
    "none": [identity],
    "flip": [identity, mirror],
    "shift": [identity, shift_up_left, shift_down_right],
    "flip-shift": [identity, mirror, shift_up_left, shift_down_right, _mirrored(shift_up_left), _mirrored(shift_down_right)],
}


def tta_views(name: str) -> list:
    """The views for a TTA mode; probabilities are averaged over them."""
    if name not in TTA_VIEWS:
        raise KitError(f"--tta {name}: unknown; choose one of {', '.join(TTA_VIEWS)}")
    return TTA_VIEWS[name]
