"""One parametrized ResNet covering every team's network: basic or pre-activation blocks, any
blocks/channels per stage, CIFAR or ImageNet stem, 1x1 or 3x3 projection shortcuts, activation,
dropout, pooling and a width multiplier.

Layout conventions (they are what reproduce the papers' exact parameter counts):
- basic (He et al. 2016a): stem conv-BN-act; block conv-BN-act-conv-BN (+ shortcut), act;
  projection shortcut conv-BN.
- preact (He et al. 2016b): stem is a bare conv; block BN-act-conv-BN-act-conv (+ shortcut);
  projection shortcut a bare conv; one BN-act after the last stage.
- whiten stem (airbench): a 2x2 convolution without padding, 24 filters (each whitening direction of the
  training images' 2x2 patches and its negation, set by `init_whitening` before training), then the activation.
- dropout (paper 004) follows the first activation inside the residual branch (WRN-style,
  `dropout_position: branch`), or is applied to each block's output (`output`), which also drops
  the identity path and compounds over the blocks.
"""

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "elu": nn.ELU}
WHITEN_KERNEL = 2


def whiten_width(in_channels: int) -> int:
    """Every whitening direction of a 2x2xC patch, and its negation."""
    return 2 * in_channels * WHITEN_KERNEL ** 2


@dataclass(frozen=True)
class ResNetConfig:
    block: Literal["basic", "preact"] = "basic"
    blocks: tuple[int, ...] = field(default=(2, 2, 2, 2), metadata={"min": 1})  # blocks per stage
    channels: tuple[int, ...] = field(default=(64, 128, 256, 512), metadata={"min": 1})  # per stage
    stem: Literal["cifar", "imagenet", "whiten"] = "cifar"  # 3x3 stride 1; 7x7 stride 2 + max-pool; airbench's 2x2 whitening
    zero_init_residual: bool = False  # each block starts as the identity (last BN of the branch at 0; Goyal et al.)
    stem_width: int | None = field(default=None, metadata={"min": 1})  # default: channels[0]
    shortcut_kernel: Literal[1, 3] = 1
    activation: Literal["relu", "gelu", "silu", "elu"] = "relu"
    dropout: float = field(default=0.0, metadata={"min": 0, "lt": 1})
    dropout_position: Literal["branch", "output"] = "branch"
    pool: Literal["adaptive", "fixed"] = "adaptive"
    pool_kernel: int = field(default=4, metadata={"min": 1})  # for pool: fixed (average pool)
    width: float = field(default=1.0, metadata={"gt": 0})  # multiplies stem width and every stage's channels
    input_size: int = field(default=32, metadata={"min": 8})  # sizes the classifier when pool: fixed (default: data.image_size)

    def __post_init__(self):
        if len(self.blocks) != len(self.channels):
            raise ValueError(f"blocks {list(self.blocks)} and channels {list(self.channels)} need one entry per stage")


def _conv(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False)


def _act_then_dropout(cfg: ResNetConfig) -> nn.Module:
    """The branch's first activation, followed by dropout when it sits in the branch. One slot either
    way, so the state-dict keys do not depend on where the dropout is."""
    act = ACTIVATIONS[cfg.activation]()
    if cfg.dropout and cfg.dropout_position == "branch":
        return nn.Sequential(act, nn.Dropout(cfg.dropout))
    return act


def _output_dropout(cfg: ResNetConfig) -> nn.Module:
    return nn.Dropout(cfg.dropout) if cfg.dropout and cfg.dropout_position == "output" else nn.Identity()


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, cfg: ResNetConfig):
        super().__init__()
        act = ACTIVATIONS[cfg.activation]
        self.residual = nn.Sequential(
            _conv(cin, cout, 3, stride), nn.BatchNorm2d(cout), _act_then_dropout(cfg),
            _conv(cout, cout, 3), nn.BatchNorm2d(cout))
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(_conv(cin, cout, cfg.shortcut_kernel, stride), nn.BatchNorm2d(cout))
        self.act = act()
        self.dropout = _output_dropout(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.act(self.residual(x) + self.shortcut(x)))


class PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, cfg: ResNetConfig):
        super().__init__()
        act = ACTIVATIONS[cfg.activation]
        self.pre = nn.Sequential(nn.BatchNorm2d(cin), act())
        self.residual = nn.Sequential(
            _conv(cin, cout, 3, stride), nn.BatchNorm2d(cout), _act_then_dropout(cfg), _conv(cout, cout, 3))
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = _conv(cin, cout, cfg.shortcut_kernel, stride)
        self.dropout = _output_dropout(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pre(x)
        # the projection sees the pre-activated input, the identity the raw one (He et al. 2016b)
        skip = x if self.shortcut is None else self.shortcut(out)
        return self.dropout(self.residual(out) + skip)


class ResNet(nn.Module):
    """stem -> stage1..stageN -> (final BN-act for preact) -> pool -> fc."""

    def __init__(self, cfg: ResNetConfig, num_classes: int, in_channels: int = 3):
        super().__init__()
        channels = [max(1, round(c * cfg.width)) for c in cfg.channels]
        stem_width = max(1, round((cfg.stem_width or cfg.channels[0]) * cfg.width))
        if cfg.stem == "whiten":
            stem_width = whiten_width(in_channels)
        self.stem = self._stem(cfg, stem_width, in_channels)
        block = BasicBlock if cfg.block == "basic" else PreActBlock
        cin = stem_width
        for index, (count, cout) in enumerate(zip(cfg.blocks, channels)):
            layers = []
            for b in range(count):
                stride = 2 if index > 0 and b == 0 else 1
                layers.append(block(cin, cout, stride, cfg))
                cin = cout
            self.add_module(f"stage{index + 1}", nn.Sequential(*layers))
        self.num_stages = len(channels)
        self.final = nn.Sequential(nn.BatchNorm2d(cin), ACTIVATIONS[cfg.activation]()) if cfg.block == "preact" else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1) if cfg.pool == "adaptive" else nn.AvgPool2d(cfg.pool_kernel)
        self.fc = nn.Linear(cin * self._pooled_area(cfg), num_classes)
        if cfg.zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, PreActBlock)):
                    last = [b for b in m.residual if isinstance(b, nn.BatchNorm2d)]
                    target = last[-1] if isinstance(m, BasicBlock) else m.residual[-1]
                    nn.init.zeros_(target.weight)  # basic: the branch's last BN; preact: its last conv

    @staticmethod
    def _stem(cfg: ResNetConfig, width: int, in_channels: int) -> nn.Sequential:
        act = ACTIVATIONS[cfg.activation]
        if cfg.stem == "whiten":
            return nn.Sequential(nn.Conv2d(in_channels, width, WHITEN_KERNEL, bias=True), act())
        kernel, stride = (3, 1) if cfg.stem == "cifar" else (7, 2)
        layers: list[nn.Module] = [_conv(in_channels, width, kernel, stride)]
        if cfg.block == "basic":
            layers += [nn.BatchNorm2d(width), act()]
        if cfg.stem == "imagenet":
            layers.append(nn.MaxPool2d(3, stride=2, padding=1))
        return nn.Sequential(*layers)

    def _pooled_area(self, cfg: ResNetConfig) -> int:
        if cfg.pool == "adaptive":
            return 1
        size = cfg.input_size - (WHITEN_KERNEL - 1 if cfg.stem == "whiten" else 0)
        size = -(-(size // (4 if cfg.stem == "imagenet" else 1)) // 2 ** (len(cfg.channels) - 1))  # stride-2 convs round up
        side = (size - cfg.pool_kernel) // cfg.pool_kernel + 1
        if side < 1:
            raise ValueError(f"pool_kernel {cfg.pool_kernel} is larger than the final {size}x{size} feature map")
        return side * side

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, num_classes)
        x = self.stem(x)
        for index in range(self.num_stages):
            x = getattr(self, f"stage{index + 1}")(x)
        x = self.pool(self.final(x))
        return self.fc(torch.flatten(x, 1))


def whiten_stem(model: nn.Module) -> nn.Conv2d | None:
    """The whiten stem's convolution, or None when the model has another stem."""
    stem = getattr(model, "stem", None)
    conv = stem[0] if isinstance(stem, nn.Sequential) and len(stem) and isinstance(stem[0], nn.Conv2d) else None
    if conv is None or conv.kernel_size != (WHITEN_KERNEL, WHITEN_KERNEL) or conv.out_channels != whiten_width(conv.in_channels):
        return None
    return conv


@torch.no_grad()
def init_whitening(conv: nn.Conv2d, images: torch.Tensor, eps: float = 5e-4) -> None:
    """Set a whiten stem's filters from normalized training images (B, C, H, W): the eigenvectors of the
    2x2 patch covariance scaled by 1/sqrt(eigenvalue + eps), and their negations (Keller Jordan's airbench)."""
    k, c = WHITEN_KERNEL, images.shape[1]
    patches = images.float().unfold(2, k, 1).unfold(3, k, 1).transpose(1, 3).reshape(-1, c * k * k)  # (M, 4C)
    patches = patches - patches.mean(0)
    cov = patches.T @ patches / len(patches)
    eigenvalues, eigenvectors = torch.linalg.eigh(cov.double())
    filters = (eigenvectors.T / (eigenvalues + eps).sqrt()[:, None]).float().view(-1, c, k, k)  # patches are (C, kh, kw)
    conv.weight.copy_(torch.cat([filters, -filters]).to(conv.weight))
