"""Recipes: every file loads with its exact parameter count; bad recipes fail with clear messages."""

import dataclasses

import pytest
import yaml

from kit.cli import recipe_files
from kit.errors import KitError
from kit.models import build_model, count_parameters
from kit.recipe import Recipe, load_recipe, recipe_from_dict, recipe_to_yaml

EXACT_COUNTS = {  # the papers' reported counts (DEVELOPERS.md / issue 2), demo and kit's own recipes included
    "preact_gelu": 2_796_714,
    "resnet_4643": 4_902_186,
    "resnet_443": 4_697_162,
    "resnet_dropout": 4_709_914,
    "resnet18_cifar100": 11_227_812,
    "resnet18_cifar100_preact": 11_226_020,
    "resnet18_cifar100_3x3": 12_604_068,
    "resnet18_cifar100_wide": 44_695_716,
    "resnet18_cifar100_new_wide": 50_266_276,
    "demo": 78_042,
    "kit_best": 4_298_970,  # WRN-22-4's shape in the family
    "kit_fast": 2_193_282,
}


def test_every_recipe_is_counted():
    assert sorted(p.stem for p in recipe_files()) == sorted(EXACT_COUNTS)


@pytest.mark.parametrize("path", recipe_files(), ids=lambda p: p.stem)
def test_recipe_builds_with_exact_count(path):
    recipe = load_recipe(path)
    assert count_parameters(build_model(recipe, str(path))) == EXACT_COUNTS[path.stem]


@pytest.mark.parametrize("path", recipe_files(), ids=lambda p: p.stem)
def test_recipe_round_trips_through_yaml(path, tmp_path):
    recipe = load_recipe(path)
    copy = tmp_path / f"{path.stem}.yaml"
    copy.write_text(recipe_to_yaml(recipe))
    assert load_recipe(copy) == recipe


def test_unknown_top_level_key(write_recipe):
    path = write_recipe("trian:\n  epochs: 3\n")
    with pytest.raises(KitError, match=r"r\.yaml: unknown key 'trian'; valid keys here: name, description, paper, data"):
        load_recipe(path)


def test_unknown_nested_key_names_dotted_path_and_valid_keys(write_recipe):
    path = write_recipe("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(KitError, match=r"unknown key 'optim\.learning_rate'; valid keys here: name, lr, momentum"):
        load_recipe(path)


@pytest.mark.parametrize("text, message", [
    ("train:\n  epochs: three\n", r"train\.epochs: expected int, got 'three'"),
    ("train:\n  epochs: true\n", r"train\.epochs: expected int, got True"),
    ("train:\n  epochs: 0\n", r"train\.epochs: 0 \(int\) is out of range; allowed: a finite number > 0"),
    ("optim:\n  lr: -1\n", r"optim\.lr: -1\.0 \(float\) is out of range"),
    ("optim:\n  name: sgdd\n", r"optim\.name: 'sgdd' \(str\) is not allowed; choose one of sgd, momentum, adam"),
    ("data:\n  val_fraction: 1.5\n", r"data\.val_fraction: 1\.5 .* out of range; allowed: a finite number > 0 and < 1"),
    ("schedule:\n  name: multistep\n", r"schedule\.milestones: a multistep schedule needs"),
    ("schedule:\n  milestones: [40, 30]\n", r"must be increasing"),
    ("budget:\n  max_params: null\n", r"budget\.reason must say why"),
    ("model:\n  args:\n    blocks: [2, 2]\n", r"model\.args: blocks \[2, 2\] and channels \[64, 128, 256, 512\] need one entry per stage"),
    ("train: 5\n", r"train: expected a mapping"),
    ("- a\n- b\n", r"a recipe must be a mapping"),
])
def test_bad_values_name_file_key_and_allowed(write_recipe, text, message):
    path = write_recipe(text)
    with pytest.raises(KitError, match=message) as err:
        recipe = load_recipe(path)
        build_model(recipe, str(path))
    assert str(path) in str(err.value)


def test_unknown_model_arg_is_reported_with_its_path(write_recipe):
    path = write_recipe("model:\n  args:\n    depth: 3\n")
    with pytest.raises(KitError, match=r"unknown key 'model\.args\.depth'; valid keys here: block, blocks, channels"):
        build_model(load_recipe(path), str(path))


def test_invalid_yaml_reports_line(write_recipe):
    path = write_recipe("train:\n  epochs: [1\n")
    with pytest.raises(KitError, match=r"not valid YAML at line"):
        load_recipe(path)


def test_missing_file():
    with pytest.raises(KitError, match="nope.yaml: recipe file not found"):
        load_recipe("nope.yaml")


def test_name_defaults_to_file_stem(write_recipe):
    assert load_recipe(write_recipe("{}\n", "my_model.yaml")).name == "my_model"


def test_overrides_apply_and_validate():
    base = recipe_files()[0]
    recipe = load_recipe(base, ("optim.lr=0.05", "train.epochs=2", "model.args.width=0.5"))
    assert (recipe.optim.lr, recipe.train.epochs, recipe.model.args["width"]) == (0.05, 2, 0.5)
    with pytest.raises(KitError, match=r"unknown key 'optim\.lrr'"):
        load_recipe(base, ("optim.lrr=0.05",))
    with pytest.raises(KitError, match=r"train\.epochs: expected int"):
        load_recipe(base, ("train.epochs=2.5",))
    with pytest.raises(KitError, match=r"expected KEY=VALUE"):
        load_recipe(base, ("train.epochs",))


def test_over_budget_model_fails_at_build_with_count_and_budget():
    recipe = recipe_from_dict({"model": {"name": "resnet18"}}, "big.yaml")
    with pytest.raises(KitError, match=r"big\.yaml: the model has 11,173,962 parameters, over the budget of 5,000,000"):
        build_model(recipe, "big.yaml")
    off = dataclasses.replace(recipe, budget=dataclasses.replace(recipe.budget, max_params=None, reason="test"))
    assert count_parameters(build_model(off, "big.yaml")) == 11_173_962


def test_resolved_recipe_lists_every_field():
    text = recipe_to_yaml(Recipe())
    assert set(yaml.safe_load(text)) == {f.name for f in dataclasses.fields(Recipe)}
