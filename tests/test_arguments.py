"""One set of checks for the command line and the Python API (kit.recipe.ARGUMENTS): every flag of a checked name reads its
rule from ARGUMENTS, and the API refuses what the CLI refuses, in one line naming the argument."""

import math

import click
import pytest

import kit
from kit.cli import cli
from kit.cli.options import Checked
from kit.errors import KitError
from kit.recipe import ARGUMENTS, HELD_OUT, LABEL_STYLES, TTA_MODES, check_argument


def _params():
    for name, command in cli.commands.items():
        commands = command.commands.items() if isinstance(command, click.Group) else [(name, command)]
        for sub, cmd in commands:
            for param in cmd.params:
                if param.name in ARGUMENTS:
                    yield f"{sub} {param.opts[0]}", param


def test_every_checked_flag_reads_its_rule_from_the_one_owner():
    seen = 0
    for where, param in _params():
        arg = ARGUMENTS[param.name]
        if arg.choices:
            assert isinstance(param.type, click.Choice) and tuple(param.type.choices) == arg.choices, where
        else:
            assert isinstance(param.type, Checked) and param.type.argument == param.name, where
        seen += 1
    assert seen >= 30  # predict, evaluate, report, blend, lr-find, bench, export, ...
    assert ARGUMENTS["held_out"].choices is HELD_OUT and ARGUMENTS["tta"].choices is TTA_MODES
    assert ARGUMENTS["labels"].choices is LABEL_STYLES


@pytest.mark.parametrize("name, value", [("select_on", math.nan), ("select_on", 2), ("select_on", 0), ("adapt_prior", -1),
                                         ("adapt_prior", math.inf), ("batch_size", -1), ("batch_size", 2.5), ("rounds", 0),
                                         ("start_lr", math.nan), ("diverge", 1), ("held_out", "tst"), ("tta", "flips"),
                                         ("device", "gpu"), ("batch_size", True), ("select_on", "0.5")])
def test_out_of_range_and_unknown_values_are_one_line_naming_the_argument(name, value):
    with pytest.raises(KitError, match=rf"^{name}= .*(out of range|not allowed|expected)") as err:
        check_argument(name, value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name, value", [("select_on", 1), ("select_on", 0.5), ("adapt_prior", 0), ("batch_size", 1),
                                         ("held_out", "test"), ("tta", "flip-shift"), ("weights_from", "best")])
def test_allowed_values_pass(name, value):
    assert check_argument(name, value) == value


@pytest.mark.parametrize("args, fragment", [
    (("evaluate", "RUN", "--select-on", "nan"), "--select-on nan: out of range; allowed: a finite number > 0 and <= 1"),
    (("evaluate", "RUN", "--adapt-prior", "nan"), "--adapt-prior nan: out of range"),
    (("blend", "--labelled", "a", "--unlabelled", "b", "--out", "c", "--rounds", "0"), "--rounds 0: out of range"),
    (("predict", "RUN", "--test", "t", "--batch-size", "-1"), "--batch-size -1: out of range"),
    (("lr-find", "r.yaml", "--start-lr", "inf"), "--start-lr inf: out of range"),
    (("sweep", "r.yaml", "--grid", "optim.lr=0.1", "--db-wait", "nan"), "--db-wait nan: out of range"),
    (("sweep", "r.yaml", "--grid", "optim.lr=0.1", "--db-wait", "inf"), "--db-wait inf: out of range"),
    (("sweep", "r.yaml", "--grid", "optim.lr=0.1", "--heartbeat", "0"), "--heartbeat 0: out of range"),
    (("train", "r.yaml", "--folds", "1"), "--folds 1: out of range"),
    (("predict", "RUN", "--test", "t", "--batch-size", "x"), "--batch-size 'x': expected a whole number"),
])
def test_the_command_line_refuses_the_same_values_in_one_line(args, fragment, run, assert_one_line_error):
    code, out = run(*args)
    assert_one_line_error(code, out, fragment)


@pytest.mark.parametrize("verb, options, fragment", [
    ("evaluate", {"held_out": "tst"}, "held_out= 'tst': not allowed; choose one of val, test"),
    ("evaluate", {"select": True, "select_on": 2}, "select_on= 2: out of range"),
    ("predict", {"batch_size": -1}, "batch_size= -1: out of range"),
    ("blend", {"rounds": 0}, "rounds= 0: out of range"),
    ("predict", {"adapt_prior": -1}, "adapt_prior= -1: out of range"),
    ("report", {"mistakes": 0}, "mistakes= 0: out of range"),
])
def test_the_api_checks_its_arguments_as_the_command_line_does(verb, options, fragment, trained_run, tmp_path):
    """Checked before any file is read: the checkpoints and files named here need not even exist."""
    call = {"evaluate": lambda: kit.evaluate(tmp_path / "none", **options),
            "predict": lambda: kit.predict(tmp_path / "none", tmp_path / "t.pkl", **options),
            "blend": lambda: kit.blend([tmp_path / "a"], [tmp_path / "b"], tmp_path / "c.csv", **options),
            "report": lambda: kit.report(tmp_path / "none", **options)}[verb]
    with pytest.raises(KitError, match="^" + fragment.replace("(", r"\(").replace(")", r"\)")):
        call()
    assert not list(tmp_path.iterdir())


def test_the_api_refuses_nan_in_lr_find_and_a_bad_device_in_train(tmp_path):
    with pytest.raises(KitError, match="^diverge= nan: out of range"):
        kit.lr_find("recipes/demo.yaml", diverge=math.nan)
    with pytest.raises(KitError, match="^device= 'gpu': not allowed"):
        kit.train("recipes/demo.yaml", device="gpu")
