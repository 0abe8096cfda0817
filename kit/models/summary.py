"""Tables about recipes: the recipe index and a model's per-stage parameter breakdown."""

from pathlib import Path

import pandas as pd

from kit.errors import KitError
from kit.models import build_model, count_parameters, stage_breakdown
from kit.recipe import load_recipe


def _budget_state(params: int, limit: int | None) -> str:
    if limit is None:
        return "off"
    return "ok" if params <= limit else "over"


def recipes_table(paths: list[Path]) -> str:
    """name, model, exact parameters, budget ok/over/off, the paper's reported accuracy."""
    rows = []
    for path in paths:
        recipe = load_recipe(path)
        model = build_model(recipe, str(path), check_budget=False, on_meta=True)  # counted, never allocated
        params = count_parameters(model)
        acc = recipe.paper.reported_accuracy
        rows.append({"recipe": recipe.name, "model": recipe.model.name, "dataset": recipe.data.dataset,
                     "parameters": f"{params:,}", "budget": _budget_state(params, recipe.budget.max_params),
                     "paper accuracy": "-" if acc is None else f"{acc:.2f}%"})
    if not rows:
        raise KitError("no recipe files found")
    return pd.DataFrame(rows).to_string(index=False)


def params_table(path: str, overrides: tuple[str, ...] = ()) -> str:
    """Trainable parameters of each top-level part of the model, and the total against the budget."""
    recipe = load_recipe(path, overrides)
    model = build_model(recipe, str(path), check_budget=False, on_meta=True)  # counted, never allocated
    total = count_parameters(model)
    rows = [{"part": name, "parameters": f"{n:,}"} for name, n in stage_breakdown(model)]
    rows.append({"part": "total", "parameters": f"{total:,}"})
    limit = recipe.budget.max_params
    budget = "off" if limit is None else f"{limit:,} ({_budget_state(total, limit)})"
    return f"{recipe.name}: {recipe.model.name}\n{pd.DataFrame(rows).to_string(index=False)}\nbudget: {budget}"
