"""A sweep's plan: the recipe, its fixed overrides, and a grid or a TPE space, validated before any trial
starts and kept in the sweep folder's sweep.yaml (a re-run must plan the same sweep)."""

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from kit.errors import KitError
from kit.recipe import load_recipe, parse_value

SPACE_KEYS = {"low", "high", "log", "step", "choices"}


@dataclass(frozen=True)
class SweepPlan:
    """What a sweep folder's sweep.yaml holds: the recipe, its fixed overrides, and a grid or a space."""
    recipe: str
    overrides: tuple[str, ...] = ()
    grid: dict = field(default_factory=dict)  # dotted key -> list of values
    space: dict = field(default_factory=dict)  # dotted key -> {low, high, log, step} or {choices}
    trials: int = 0  # planned trials (the grid's size, or --trials)

    def as_dict(self) -> dict:
        return {"recipe": self.recipe, "overrides": list(self.overrides), "grid": self.grid, "space": self.space,
                "trials": self.trials}


def parse_grid(items: tuple[str, ...]) -> dict:
    """`KEY=V1,V2,...` -> {KEY: [V1, V2, ...]}, each value read as YAML (0.1 is a float, true a bool)."""
    grid = {}
    for item in items:
        key, sep, text = item.partition("=")
        values = [parse_value(v, f"--grid {item}") for v in text.split(",") if v.strip()]
        if not sep or not key.strip() or not values:
            raise KitError(f"--grid {item}: expected KEY=V1,V2,..., e.g. --grid optim.lr=0.05,0.1")
        grid[key.strip()] = values
    return grid


def read_space(path: str) -> dict:
    """A space file: `KEY: {low: A, high: B, log: true}` (a float or int range) or `KEY: {choices: [...]}`."""
    try:
        space = yaml.safe_load(Path(path).read_text())
    except OSError:
        raise KitError(f"{path}: space file not found") from None
    except yaml.YAMLError as err:
        raise KitError(f"{path}: not valid YAML: {getattr(err, 'problem', err)}") from None
    if not isinstance(space, dict) or not space:
        raise KitError(f"{path}: expected a mapping of dotted recipe keys to ranges or choices")
    for key, spec in space.items():
        ok = isinstance(spec, dict) and set(spec) <= SPACE_KEYS and (
            ("choices" in spec and isinstance(spec["choices"], list) and spec["choices"] and len(spec) == 1)
            or ({"low", "high"} <= set(spec) and "choices" not in spec))
        if not ok:
            raise KitError(f"{path}: {key}: expected {{low: A, high: B}} (with optional log, step) or {{choices: [...]}}")
    return space


def suggest(trial, space: dict, grid: dict) -> dict:
    """The trial's values: the grid point it was queued with, or TPE's draw from the space."""
    params = {key: trial.suggest_categorical(key, values) for key, values in grid.items()}
    for key, spec in space.items():
        if "choices" in spec:
            params[key] = trial.suggest_categorical(key, spec["choices"])
        elif all(isinstance(spec[k], int) and not isinstance(spec[k], bool) for k in ("low", "high")):
            params[key] = trial.suggest_int(key, spec["low"], spec["high"], step=spec.get("step", 1), log=spec.get("log", False))
        else:
            params[key] = trial.suggest_float(key, float(spec["low"]), float(spec["high"]), step=spec.get("step"),
                                              log=spec.get("log", False))
    return params


def overrides_of(params: dict) -> list[str]:
    return [f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
            for key, value in params.items()]


def make_plan(recipe_path: str, overrides: tuple[str, ...], grid: tuple[str, ...], space: str | None,
          trials: int | None) -> SweepPlan:
    if bool(grid) == bool(space):
        raise KitError("give either --grid KEY=V1,V2 (repeatable) or --space SPACE.yaml --trials N")
    base = load_recipe(recipe_path, overrides)  # the base recipe must be valid before any trial starts
    if base.data.validation == "none":
        raise KitError(f"{recipe_path}: data.validation: none leaves nothing to compare trials on; sweep with split or test")
    recipe = str(Path(recipe_path).resolve())
    if grid:
        parsed = parse_grid(grid)
        _check_values(recipe_path, overrides, parsed)
        size = 1
        for values in parsed.values():
            size *= len(values)
        return SweepPlan(recipe, tuple(overrides), grid=parsed, trials=size)
    if not trials or trials < 1:
        raise KitError("--space needs --trials N (N >= 1)")
    parsed = read_space(space)
    _check_values(recipe_path, overrides, {k: v.get("choices", [v.get("low"), v.get("high")]) for k, v in parsed.items()})
    return SweepPlan(recipe, tuple(overrides), space=parsed, trials=trials)


def _check_values(recipe_path: str, overrides: tuple[str, ...], values: dict) -> None:
    """Every value a trial may take goes through the recipe's validation now, not when its trial starts."""
    for key, options in values.items():
        for value in options:
            load_recipe(recipe_path, tuple(overrides) + tuple(overrides_of({key: value})))


def check_same_plan(folder: Path, plan: SweepPlan) -> None:
    saved_path = folder / "sweep.yaml"
    if not saved_path.is_file():
        return
    saved = yaml.safe_load(saved_path.read_text())
    for key in ("recipe", "overrides", "grid", "space"):
        if saved.get(key) != plan.as_dict()[key]:
            raise KitError(f"{saved_path}: this folder holds another sweep (its {key} differs); "
                           f"give another --name, or the same command to continue it")
