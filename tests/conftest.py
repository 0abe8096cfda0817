"""Shared fixtures: the digits demo data and one short trained run, made once per session."""

import dataclasses
from pathlib import Path

import pytest

from kit.data import make_demo_data
from kit.recipe import Recipe, load_recipe, recipe_from_dict
from kit.train import train

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def tiny_recipe(**overrides) -> Recipe:
    """The demo recipe, three epochs at a constant lr; `section__field=value` keyword overrides."""
    recipe = load_recipe(ROOT / "recipes" / "demo.yaml", ("train.epochs=3", "schedule.name=constant", "optim.lr=0.004"))
    for key, value in overrides.items():
        section, name = key.split("__")
        recipe = dataclasses.replace(recipe, **{section: dataclasses.replace(getattr(recipe, section), **{name: value})})
    return recipe


def quiet(_: str) -> None:
    pass


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    return make_demo_data(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="session")
def trained_run(demo_data, tmp_path_factory) -> Path:
    """A 3-epoch run of the demo recipe (with EMA) on the demo data."""
    return train(tiny_recipe(), demo_data, tmp_path_factory.mktemp("runs"), "cpu", echo=quiet)


@pytest.fixture
def write_recipe(tmp_path):
    """Write YAML text to a recipe file and return its path."""
    def write(text: str, name: str = "r.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path
    return write


__all__ = ["RECIPES", "ROOT", "quiet", "recipe_from_dict", "tiny_recipe"]
