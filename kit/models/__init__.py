"""The one parametrized ResNet family and its registry (presets, timm:/torchvision: names, recipe-level building)."""

from kit.models.registry import build_model, count_parameters, create_model, list_models, register_model, stage_breakdown
from kit.models.resnet import ResNet, ResNetConfig

__all__ = ["build_model", "count_parameters", "create_model", "list_models", "register_model", "ResNet",
           "ResNetConfig", "stage_breakdown"]
