"""A recipe's model, checked against its parameter budget."""

from torch import nn

from kit.errors import KitError
from kit.models.registry import create_model
from kit.recipe import Recipe


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def stage_breakdown(model: nn.Module) -> list[tuple[str, int]]:
    """(top-level child, trainable parameters) in order, skipping children without parameters."""
    rows = [(name, count_parameters(child)) for name, child in model.named_children()]
    return [(name, n) for name, n in rows if n]


def build_model(recipe: Recipe, source: str = "recipe", check_budget: bool = True) -> nn.Module:
    """Build the recipe's model; over-budget models fail here with the count and the budget."""
    spec = recipe.model
    try:
        model = create_model(spec.name, spec.num_classes, spec.args, spec.pretrained_path, source)
    except ValueError as err:
        raise KitError(f"{source}: model.args: {err}") from None
    limit = recipe.budget.max_params
    if check_budget and limit is not None and count_parameters(model) > limit:
        raise KitError(f"{source}: the model has {count_parameters(model):,} parameters, over the budget of "
                       f"{limit:,} (budget.max_params)")
    return model
