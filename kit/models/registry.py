"""Model registry: named presets of the one ResNet family, any timm or torchvision model by name, and a
recipe's model built and checked against its parameter budget."""

import dataclasses
import difflib
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from kit.errors import KitError
from kit.models.resnet import ResNet, ResNetConfig
from kit.recipe import Recipe, known_num_classes
from kit.typed import build

_PRESETS: dict[str, ResNetConfig] = {}


def register_model(name: str) -> Callable[[Callable[[], ResNetConfig]], Callable[[], ResNetConfig]]:
    """Register a preset: a function returning the ResNetConfig its name stands for."""
    def wrap(fn: Callable[[], ResNetConfig]) -> Callable[[], ResNetConfig]:
        if name in _PRESETS:
            raise ValueError(f"model '{name}' is registered twice")
        _PRESETS[name] = fn()
        return fn
    return wrap


def list_models() -> list[str]:
    """Names of the registered presets (timm:NAME and torchvision:NAME are accepted too)."""
    return sorted(_PRESETS)


def preset_config(name: str, args: dict, source: str = "recipe") -> ResNetConfig:
    """The preset's config with `args` applied, validated like the recipe itself."""
    if name not in _PRESETS:
        close = difflib.get_close_matches(name, list_models(), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise KitError(f"{source}: model.name: unknown model '{name}'{hint} "
                       f"(registered: {', '.join(list_models())}; or timm:NAME, torchvision:NAME)")
    base = dataclasses.asdict(_PRESETS[name])
    base.update(args)
    return build(ResNetConfig, base, source, "model.args")


# Presets. Papers' final models are recipes on top of these.

@register_model("resnet")
def resnet() -> ResNetConfig:
    """The family's defaults: ResNet-18 layout with a CIFAR stem; shape it all through model.args."""
    return ResNetConfig()


@register_model("resnet18")
def resnet18() -> ResNetConfig:
    return ResNetConfig(blocks=(2, 2, 2, 2), channels=(64, 128, 256, 512))


@register_model("resnet34")
def resnet34() -> ResNetConfig:
    return ResNetConfig(blocks=(3, 4, 6, 3), channels=(64, 128, 256, 512))


@register_model("preact_resnet18")
def preact_resnet18() -> ResNetConfig:
    return ResNetConfig(block="preact", blocks=(2, 2, 2, 2), channels=(64, 128, 256, 512))


@register_model("resnet18_imagenet")
def resnet18_imagenet() -> ResNetConfig:
    """torchvision's ResNet-18 layout (7x7 stride-2 stem + max-pool) built by the family."""
    return ResNetConfig(stem="imagenet", blocks=(2, 2, 2, 2), channels=(64, 128, 256, 512))


@register_model("resnet_tiny")
def resnet_tiny() -> ResNetConfig:
    """Three small stages: the demo's and the tests' model (seconds per epoch on a CPU)."""
    return ResNetConfig(blocks=(1, 1, 1), channels=(16, 32, 64))


def create_model(name: str, num_classes: int, args: dict | None = None, pretrained_path: str | None = None,
                 source: str = "recipe", in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """Build a model by registered name, `timm:NAME` or `torchvision:NAME` for `in_channels` x image_size x image_size
    inputs; load local weights if given."""
    args = dict(args or {})
    if name.startswith("timm:"):
        model = _create_timm(name[5:], num_classes, {"in_chans": in_channels, **args}, source)
    elif name.startswith("torchvision:"):
        if in_channels != 3:
            raise KitError(f"{source}: model.name: torchvision's models take 3 channels, but data.channels is {in_channels}; "
                           f"use a kit preset or timm:NAME (in_chans)")
        model = _create_torchvision(name[12:], num_classes, args, source)
    else:
        model = ResNet(preset_config(name, {"input_size": image_size, **args}, source), num_classes, in_channels)
    if pretrained_path:
        load_pretrained(model, pretrained_path)
    return model


def _create_timm(name: str, num_classes: int, args: dict, source: str) -> nn.Module:
    import timm
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        raise KitError(f"{source}: model.name: timm has no model '{name}'" + (f"; did you mean {', '.join(close)}?" if close else ""))
    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, **args)
    except TypeError as err:
        raise KitError(f"{source}: model.args: timm:{name} rejected the arguments: {err}") from None


def _create_torchvision(name: str, num_classes: int, args: dict, source: str) -> nn.Module:
    import torchvision
    names = torchvision.models.list_models()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        raise KitError(f"{source}: model.name: torchvision has no model '{name}'" + (f"; did you mean {', '.join(close)}?" if close else ""))
    try:
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **args)
    except TypeError as err:
        raise KitError(f"{source}: model.args: torchvision:{name} rejected the arguments: {err}") from None


def load_pretrained(model: nn.Module, path: str) -> None:
    """Load local weights; tensors whose shape differs (a new classifier head) keep their fresh values."""
    if not Path(path).is_file():
        raise KitError(f"{path}: pretrained weights not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a bad file
        raise KitError(f"{path}: not a loadable weights file: {err}") from None
    state = state.get("model", state) if isinstance(state, dict) else state
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise KitError(f"{path}: no tensor matches the model's names and shapes")
    model.load_state_dict(usable, strict=False)


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def stage_breakdown(model: nn.Module) -> list[tuple[str, int]]:
    """(top-level child, trainable parameters) in order, skipping children without parameters."""
    rows = [(name, count_parameters(child)) for name, child in model.named_children()]
    return [(name, n) for name, n in rows if n]


def build_model(recipe: Recipe, source: str = "recipe", check_budget: bool = True, on_meta: bool = False) -> nn.Module:
    """Build the recipe's model. It is first built on the meta device (shapes, no memory), where an over-budget model
    fails with the count and the budget before a byte is allocated (a recipe, or a checkpoint from outside, could ask
    for tens of gigabytes); `on_meta` returns that skeleton (for counting parameters and checking shapes)."""
    spec, num_classes = recipe.model, known_num_classes(recipe)
    if num_classes is None:
        raise KitError(f"{source}: model.num_classes is left to the data's classes, which are not read here; set "
                       f"model.num_classes or data.classes to build the model without its data")

    def create(pretrained_path: str | None) -> nn.Module:
        try:
            return create_model(spec.name, num_classes, spec.args, pretrained_path, source, recipe.data.channels,
                                recipe.data.image_size)
        except ValueError as err:
            raise KitError(f"{source}: model.args: {err}") from None

    with torch.device("meta"), torch.random.fork_rng(devices=[]):  # the real build draws the same initial weights
        skeleton = create(None)
    limit = recipe.budget.max_params
    if check_budget and limit is not None and count_parameters(skeleton) > limit:
        raise KitError(f"{source}: the model has {count_parameters(skeleton):,} parameters, over the budget of "
                       f"{limit:,} (budget.max_params)")
    return skeleton if on_meta else create(spec.pretrained_path)
