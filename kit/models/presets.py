"""Registered presets of the ResNet family. Papers' final models are recipes on top of these."""

from kit.models.registry import register_model
from kit.models.resnet import ResNetConfig


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
