"""TrivialAugment-Wide (Müller & Hutter, 2021) and RandAugment (Cubuk et al., 2020) where every image draws
its own op and magnitude, on whole batches on the device. torchvision and kornia draw one op per call;
here the draw is per sample. The geometric ops (shear, translate, rotate) are one per-sample affine warp,
the colour ops per-sample broadcasts selected by masks, so shapes never depend on the draw (the update stays
capturable). Semantics, magnitude tables and the nearest-neighbour warp follow torchvision.transforms.v2
on float images in [0, 1]; tests compare each op with torchvision's functional op."""

import math

import torch
import torch.nn.functional as F

OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast",
       "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")
SIGNED = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast", "Sharpness")
NUM_BINS = 31  # torchvision's num_magnitude_bins
GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


def magnitudes(policy: str, size: int, num_bins: int = NUM_BINS) -> torch.Tensor:
    """(len(OPS), num_bins + 1): each op's magnitude at each bin (0 for ops without one), torchvision's tables,
    and a last column that is 1 for the signed ops."""
    wide = policy == "trivialaugment"
    lin = lambda high: torch.linspace(0.0, high, num_bins)  # noqa: E731
    table = {
        "ShearX": lin(0.99 if wide else 0.3), "ShearY": lin(0.99 if wide else 0.3),
        "TranslateX": lin(32.0 if wide else 150.0 / 331.0 * size), "TranslateY": lin(32.0 if wide else 150.0 / 331.0 * size),
        "Rotate": lin(135.0 if wide else 30.0),
        **{op: lin(0.99 if wide else 0.9) for op in ("Brightness", "Color", "Contrast", "Sharpness")},
        "Posterize": (8 - (torch.arange(num_bins) / ((num_bins - 1) / (6 if wide else 4)))).round(),
        "Solarize": torch.linspace(1.0, 0.0, num_bins),
    }
    signed = torch.tensor([[float(op in SIGNED)] for op in OPS])
    return torch.cat([torch.stack([table.get(op, torch.zeros(num_bins)) for op in OPS]), signed], 1)


def _op(name: str) -> int:
    return OPS.index(name)


def _inverse_affine(op: torch.Tensor, m: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, 2, 3) inverse affine matrices in pixel units about the image centre, torchvision's
    _get_inverse_affine_matrix per sample; the identity for non-geometric ops."""
    zero = torch.zeros_like(m)
    is_ = lambda name: op == _op(name)  # noqa: E731
    shear_x = torch.where(is_("ShearX"), torch.atan(m), zero)  # radians(degrees(atan(m)))
    shear_y = torch.where(is_("ShearY"), torch.atan(m), zero)
    rot = torch.where(is_("Rotate"), -m * (math.pi / 180), zero)  # F.rotate passes -angle to the affine
    tx = torch.where(is_("TranslateX"), m.trunc(), zero)  # int(magnitude)
    ty = torch.where(is_("TranslateY"), m.trunc(), zero)
    top_left = is_("ShearX") | is_("ShearY")  # shears use center=[0, 0]: the top-left corner
    cx = torch.where(top_left, torch.full_like(m, -w * 0.5), zero)
    cy = torch.where(top_left, torch.full_like(m, -h * 0.5), zero)
    a = torch.cos(rot - shear_y) / torch.cos(shear_y)
    b = -torch.cos(rot - shear_y) * torch.tan(shear_x) / torch.cos(shear_y) - torch.sin(rot)
    c = torch.sin(rot - shear_y) / torch.cos(shear_y)
    d = -torch.sin(rot - shear_y) * torch.tan(shear_x) / torch.cos(shear_y) + torch.cos(rot)
    m0, m1, m3, m4 = d, -b, -c, a
    m2 = m0 * (-cx - tx) + m1 * (-cy - ty) + cx
    m5 = m3 * (-cx - tx) + m4 * (-cy - ty) + cy
    return torch.stack([torch.stack([m0, m1, m2], 1), torch.stack([m3, m4, m5], 1)], 1)


def warp(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour warp with zero fill by per-sample (B, 2, 3) pixel-space inverse matrices (torchvision's _affine_grid)."""
    b, _, h, w = x.shape
    xs = torch.linspace(-w * 0.5 + 0.5, w * 0.5 - 0.5, w, device=x.device)
    ys = torch.linspace(-h * 0.5 + 0.5, h * 0.5 - 0.5, h, device=x.device)
    base = torch.stack([xs.expand(h, w), ys[:, None].expand(h, w), torch.ones(h, w, device=x.device)], -1)  # (H, W, 3)
    inv_half = torch.linspace(2.0 / w, 2.0 / h, 2, device=x.device, dtype=theta.dtype)  # [2/w, 2/h], made on the device
    grid = base.view(1, h * w, 3).expand(b, -1, -1).bmm(theta.transpose(1, 2) * inv_half)  # (B, H*W, 2)
    return F.grid_sample(x, grid.view(b, h, w, 2).to(x.dtype), mode="nearest", padding_mode="zeros", align_corners=False)


def gray(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) luminance (a grayscale image is its own)."""
    if x.shape[1] == 1:
        return x
    return x[:, :1] * GRAY[0] + x[:, 1:2] * GRAY[1] + x[:, 2:3] * GRAY[2]


def blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """x * f + other * (1 - f), clamped; factor (B,)."""
    f = factor.view(-1, 1, 1, 1)
    return (x * f + other * (1 - f)).clamp(0, 1)


def sharpen(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_sharpness: blend the interior with a 3x3 smoothing (1s around a 5, over 13); borders kept."""
    kernel = torch.full((3, 3), 1.0 / 13.0, device=x.device, dtype=x.dtype)
    kernel[1, 1].fill_(5.0 / 13.0)  # fill_ writes on the device; `= 5.0 / 13.0` would copy a host tensor in
    blurred = F.conv2d(x, kernel.expand(x.shape[1], 1, 3, 3), groups=x.shape[1])
    inner = x[..., 1:-1, 1:-1]
    out = x.clone()
    out[..., 1:-1, 1:-1] = inner + (blurred - inner) * (1 - factor.view(-1, 1, 1, 1))
    return out.clamp(0, 1)


def posterize(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    levels = (2 ** bits).view(-1, 1, 1, 1)
    return torch.minimum((x * levels).floor(), levels - 1) / levels


def autocontrast(x: torch.Tensor) -> torch.Tensor:
    low, high = x.amin((-2, -1), keepdim=True), x.amax((-2, -1), keepdim=True)
    flat = high == low
    scale = torch.where(flat, torch.ones_like(high), high - low)
    return ((x - torch.where(flat, torch.zeros_like(low), low)) / scale).clamp(0, 1)


def equalize(x: torch.Tensor) -> torch.Tensor:
    """Per image and channel histogram equalization with PIL's lookup table (torchvision's equalize_image)."""
    b, c, h, w = x.shape
    flat = (x * (256 - 1e-3)).to(torch.uint8).flatten(2).long()  # torchvision's float -> uint8 conversion
    hist = torch.zeros(b, c, 256, dtype=torch.long, device=x.device).scatter_add_(2, flat, torch.ones_like(flat))
    cum = hist.cumsum(2)
    last = cum.argmax(2, keepdim=True)  # the last non-empty bin
    step = (h * w - hist.gather(2, last)).div(255, rounding_mode="floor")  # (B, C, 1)
    lut = ((cum[..., :-1] + step // 2).div(step.clamp(min=1), rounding_mode="floor")).clamp(0, 255)
    lut = torch.cat([torch.zeros_like(lut[..., :1]), lut], 2)
    out = lut.gather(2, flat).view(b, c, h, w).to(torch.uint8)
    out = torch.where((step != 0).view(b, c, 1, 1), out, flat.view(b, c, h, w).to(torch.uint8))
    return out.float() / 255


def apply_ops(x: torch.Tensor, op: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Each image's op (index into OPS) at its signed magnitude: (B, 3, H, W) floats in [0, 1] -> same."""
    x = warp(x, _inverse_affine(op, m, x.shape[-2], x.shape[-1]))
    is_ = lambda name: (op == _op(name)).view(-1, 1, 1, 1)  # noqa: E731
    x = torch.where(is_("Brightness"), (x * (1 + m).view(-1, 1, 1, 1)).clamp(0, 1), x)
    x = torch.where(is_("Color"), blend(x, gray(x), 1 + m), x)
    x = torch.where(is_("Contrast"), blend(x, gray(x).mean((1, 2, 3), keepdim=True), 1 + m), x)
    x = torch.where(is_("Sharpness"), sharpen(x, 1 + m), x)
    x = torch.where(is_("Posterize"), posterize(x, m), x)
    x = torch.where(is_("Solarize") & (x >= m.view(-1, 1, 1, 1)), 1 - x, x)
    x = torch.where(is_("AutoContrast"), autocontrast(x), x)
    return torch.where(is_("Equalize"), equalize(x), x)


def _draw(table: torch.Tensor, bins: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's op, and its magnitude at `bins`, negated half the time for signed ops. `table` is
    magnitudes() on the device with a last column marking the signed ops (no host copy here: capturable)."""
    op = torch.randint(0, len(OPS), (len(bins),), generator=gen, device=gen.device)
    return op, _signed_magnitude(table, op, bins, gen)


def _signed_magnitude(table: torch.Tensor, op: torch.Tensor, bins: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    flip = (table[op, -1] > 0) & (torch.rand(len(op), generator=gen, device=gen.device) <= 0.5)
    m = table[op, bins]
    return torch.where(flip, -m, m)


def trivial_augment(x: torch.Tensor, gen: torch.Generator, table: torch.Tensor) -> torch.Tensor:
    """TrivialAugment-Wide: one op per image at a uniformly drawn magnitude bin."""
    bins = torch.randint(0, table.shape[1] - 1, (x.shape[0],), generator=gen, device=gen.device)
    return apply_ops(x, *_draw(table, bins, gen))


def rand_augment(x: torch.Tensor, gen: torch.Generator, table: torch.Tensor, num_ops: int, magnitude: int) -> torch.Tensor:
    """RandAugment(N, M): N rounds, each image drawing its own op at magnitude bin M."""
    bins = torch.full((x.shape[0],), magnitude, device=gen.device, dtype=torch.long)
    for _ in range(num_ops):
        x = apply_ops(x, *_draw(table, bins, gen))
    return x


AUGMIX_OPS = ("AutoContrast", "Equalize", "Posterize", "Rotate", "Solarize", "ShearX", "ShearY", "TranslateX", "TranslateY")
# AugMix's operations: none of them is a CIFAR-10-C corruption (no colour, contrast, brightness or sharpness)


def augmix_weights(n: int, width: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: chain weights ~ Dirichlet(1, ..., 1) (normalized Exp(1) draws) and the share kept of the original
    image ~ Beta(1, 1) (uniform). Alpha 1 is AugMix's default, and the one these draws from the run's own generator
    give exactly (torch's Gamma sampler has no generator argument). (n, width) and (n,)."""
    exp = -torch.log(torch.rand(n, width, generator=gen, device=gen.device).clamp_min(1e-12))
    return exp / exp.sum(1, keepdim=True), torch.rand(n, generator=gen, device=gen.device)


def augmix(x: torch.Tensor, gen: torch.Generator, table: torch.Tensor, ops: torch.Tensor, magnitude: int,
           width: int = 3, depth: int = 3) -> torch.Tensor:
    """AugMix (Hendrycks et al., 2020) per image: `width` chains, each of 1..`depth` ops drawn from `ops` (indices
    into OPS, on the device) at magnitude bin `magnitude`, mixed by Dirichlet weights, then mixed with the image by
    a Beta draw: m * x + (1 - m) * sum_i w_i chain_i(x). Shorter chains run Identity in their last rounds, so every
    image runs the same kernels (capturable)."""
    b = x.shape[0]
    weights, keep = augmix_weights(b, width, gen)
    lengths = torch.randint(1, depth + 1, (b, width), generator=gen, device=gen.device)
    bins = torch.full((b,), magnitude, dtype=torch.long, device=gen.device)
    mixed = torch.zeros_like(x)
    for i in range(width):
        chain = x
        for j in range(depth):
            op = ops.index_select(0, torch.randint(0, len(ops), (b,), generator=gen, device=gen.device))
            op = torch.where(lengths[:, i] > j, op, torch.zeros_like(op))  # OPS[0] is Identity
            chain = apply_ops(chain, op, _signed_magnitude(table, op, bins, gen))
        mixed = mixed + weights[:, i].view(-1, 1, 1, 1) * chain
    keep = keep.view(-1, 1, 1, 1)
    return keep * x + (1 - keep) * mixed
