"""Model registry, the one parametrized ResNet family, and recipe-level building."""

from kit.models import presets  # noqa: F401  (registers the presets)
from kit.models.build import build_model, count_parameters, stage_breakdown
from kit.models.registry import create_model, list_models, register_model
from kit.models.resnet import ResNet, ResNetConfig

__all__ = ["build_model", "count_parameters", "create_model", "list_models", "register_model", "ResNet",
           "ResNetConfig", "stage_breakdown"]
