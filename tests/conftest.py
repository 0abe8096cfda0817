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


def run(*args) -> tuple[int, str]:
    """`kit ARGS...` in this process (click's runner): (exit code, output)."""
    from click.testing import CliRunner

    from kit.cli import cli
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.output


def assert_one_line_error(code: int, output: str, *fragments: str) -> None:
    """Exit code 2 and one line `error: ...` holding each fragment, no traceback."""
    assert code == 2, output
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in output, output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# Any recipe at 1/8 width on the digits demo data, in seconds: CIFAR-100 recipes read the 10-class demo set,
# and compile is off (it is CUDA-only, and its kernels are not what these tests check).
TINY = ("model.args.width=0.125", "data.dataset=cifar10", "model.num_classes=10", "data.validation=test",
        "train.batch_size=16", "train.compile=none")


def tiny_trainer(path: Path, demo_data: Path, device: str = "cpu", overrides: tuple[str, ...] = ()):
    """A Trainer (kit.engine) for the recipe file at tiny size, on `device`."""
    import torch

    from kit.data import load_dataset
    from kit.engine import build_trainer
    recipe = load_recipe(path, TINY + tuple(overrides))
    return build_trainer(recipe, load_dataset(recipe.data, demo_data), torch.device(device), echo=quiet)


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


__all__ = ["RECIPES", "ROOT", "TINY", "assert_one_line_error", "quiet", "run", "recipe_from_dict", "tiny_recipe", "tiny_trainer"]
