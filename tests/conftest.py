"""Shared fixtures, each written once: the digits demo data and one short trained run (made once per session), the
demo recipe at tiny size, a Trainer of any recipe at tiny size, `kit` run in this process, the one-line error check,
a silent echo, and the on_epoch_end that stops a run after its first epoch. Paths come from kit.cli (RECIPES_DIR)."""

import dataclasses
from pathlib import Path

import pytest

from kit.cli import RECIPES_DIR
from kit.data.datasets import make_demo_data
from kit.recipe import Recipe, load_recipe
from kit.training.run import train

# Any recipe at 1/8 width on the digits demo data, in seconds: CIFAR-100 recipes read the 10-class demo set,
# and compile is off (it is CUDA-only, and its kernels are not what these tests check).
TINY = ("model.args.width=0.125", "data.dataset=cifar10", "model.num_classes=10", "data.validation=test",
        "train.batch_size=16", "train.compile=none")


def _quiet(_: str) -> None:
    pass


def _tiny_recipe(**overrides) -> Recipe:
    """The demo recipe, three epochs at a constant lr; `section__field=value` keyword overrides."""
    recipe = load_recipe(RECIPES_DIR / "demo.yaml", ("train.epochs=3", "schedule.name=constant", "optim.lr=0.004"))
    for key, value in overrides.items():
        section, name = key.split("__")
        recipe = dataclasses.replace(recipe, **{section: dataclasses.replace(getattr(recipe, section), **{name: value})})
    return recipe


@pytest.fixture(scope="session")
def quiet():
    """An echo that prints nothing."""
    return _quiet


@pytest.fixture(scope="session")
def tiny_recipe():
    """`tiny_recipe(section__field=value, ...)`: the demo recipe, three epochs at a constant lr."""
    return _tiny_recipe


@pytest.fixture(scope="session")
def tiny_trainer():
    """`tiny_trainer(recipe_path, demo_data, device="cpu", overrides=())`: a Trainer for the recipe at tiny size."""
    def make(path: Path, demo_data: Path, device: str = "cpu", overrides: tuple[str, ...] = ()):
        import torch

        from kit.data.datasets import load_dataset
        from kit.training.engine import build_trainer
        recipe = load_recipe(path, TINY + tuple(overrides))
        return build_trainer(recipe, load_dataset(recipe.data, demo_data), torch.device(device), echo=_quiet)
    return make


@pytest.fixture(scope="session")
def run():
    """`run(*args)`: `kit ARGS...` in this process (click's runner), returning (exit code, output)."""
    from click.testing import CliRunner

    from kit.cli import cli

    def invoke(*args) -> tuple[int, str]:
        result = CliRunner().invoke(cli, [str(a) for a in args])
        return result.exit_code, result.output
    return invoke


@pytest.fixture(scope="session")
def assert_one_line_error():
    """`assert_one_line_error(code, output, *fragments)`: exit code 2 and one line `error: ...` holding each fragment,
    no traceback."""
    def check(code: int, output: str, *fragments: str) -> None:
        assert code == 2, output
        lines = output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in output, output
        for fragment in fragments:
            assert fragment in lines[0], lines[0]
    return check


@pytest.fixture(scope="session")
def stop_after_first_epoch():
    """An on_epoch_end that stops a run (KeyboardInterrupt, as Ctrl-C would) once its first epoch is saved."""
    def stop(run) -> None:
        if run.epoch == 1:
            raise KeyboardInterrupt
    return stop


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    return make_demo_data(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="session")
def trained_run(demo_data, tmp_path_factory) -> Path:
    """A 3-epoch run of the demo recipe (with EMA) on the demo data."""
    return train(_tiny_recipe(), demo_data, tmp_path_factory.mktemp("runs"), "cpu", echo=_quiet)


@pytest.fixture
def write_recipe(tmp_path):
    """Write YAML text to a recipe file and return its path."""
    def write(text: str, name: str = "r.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path
    return write
