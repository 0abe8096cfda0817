"""The CLI end to end: tables, the documented flows, and one-line errors with exit code 2."""

import os
import pickle
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from kit import __version__
from kit.cli import RECIPES_DIR


def test_version(run):
    assert run("--version") == (0, f"kit, version {__version__}\n")


def test_recipes_table_shows_exact_counts(run):
    code, out = run("recipes")
    assert code == 0
    for row in [("preact_gelu", "2,796,714", "ok", "90.76%"), ("resnet_4643", "4,902,186", "ok"),
                ("resnet_443", "4,697,162"), ("resnet_dropout", "4,709,914"), ("resnet18_cifar100 ", "11,227,812", "off")]:
        line = next(line for line in out.splitlines() if line.strip().startswith(row[0].strip() + " ") or line.split()[0] == row[0].strip())
        assert all(cell in line for cell in row), line


def test_params_breakdown_with_override(run):
    code, out = run("params", RECIPES_DIR / "resnet_4643.yaml", "--set", "model.args.width=0.5")
    assert code == 0 and "stage4" in out and "total" in out and "budget: 5,000,000 (ok)" in out


def test_unknown_key_through_train(tmp_path, assert_one_line_error, run):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochz: 3\n")
    code, out = run("train", bad)
    assert_one_line_error(code, out, "bad.yaml", "unknown key 'train.epochz'", "valid keys here: epochs")


@pytest.mark.parametrize("args, fragments", [
    (["train", "missing.yaml"], ["missing.yaml: recipe file not found"]),
    (["train", RECIPES_DIR / "demo.yaml", "--set", "optim.lr=fast"], ["--set", "optim.lr: expected float"]),
    (["train"], ["give either RECIPE or --resume RUN_DIR"]),
    (["train", RECIPES_DIR / "demo.yaml", "--data-root", "/no/such/dir", "--device", "cpu"], ["/no/such/dir: data root not found"]),
    (["train", "--resume", "/no/run"], ["/no/run: not a run directory"]),
    (["params", RECIPES_DIR / "demo.yaml", "--set", "model.name=resnet19"], ["unknown model 'resnet19'"]),
])
def test_bad_inputs_give_one_line_errors(args, fragments, assert_one_line_error, run):
    assert_one_line_error(*run(*args), *fragments)


def test_train_resume_predict_check_flow(demo_data, tmp_path, run):
    code, out = run("train", RECIPES_DIR / "demo.yaml", "--data-root", demo_data, "--runs", tmp_path / "runs",
                    "--device", "cpu", "--set", "train.epochs=1")
    assert code == 0, out
    run_dir = out.strip().splitlines()[-1].removeprefix("run: ")
    assert out.strip().splitlines()[-1].startswith("run: ")
    code, out = run("train", "--resume", run_dir, "--set", "train.epochs=2", "--device", "cpu")
    assert code == 0 and len(pd.read_csv(f"{run_dir}/metrics.csv")) == 2
    csv = tmp_path / "sub" / "s.csv"
    code, out = run("predict", run_dir, run_dir, "--test", demo_data / "cifar_test_nolabel.pkl", "--tta", "flip",
                    "--out", csv, "--device", "cpu")
    assert code == 0 and "tta views: identity, mirror" in out
    assert run("check-submission", csv, "--test", demo_data / "cifar_test_nolabel.pkl")[0] == 0


def test_wrong_shaped_pickle_fails_in_one_line_with_no_file(trained_run, tmp_path, assert_one_line_error, run):
    bad = tmp_path / "bad.pkl"
    with open(bad, "wb") as f:
        pickle.dump({b"data": np.zeros((4, 16, 16, 3), np.uint8), b"ids": np.arange(4)}, f)
    code, out = run("predict", trained_run, "--test", bad, "--out", tmp_path / "s.csv", "--device", "cpu")
    assert_one_line_error(code, out, "bad.pkl", "has shape (4, 16, 16, 3)")
    assert not list(tmp_path.glob("s.*"))


def test_check_submission_exit_code(tmp_path, demo_data, assert_one_line_error, run):
    csv = tmp_path / "s.csv"
    csv.write_text("ID,Labels\n0,1\n")
    code, out = run("check-submission", csv, "--test", demo_data / "cifar_test_nolabel.pkl")
    assert_one_line_error(code, out, "299 ids of")


@pytest.mark.slow
def test_installed_entry_point_prints_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name: [\n")
    env = {**os.environ, "PYTHONPATH": str(RECIPES_DIR.parent)}
    result = subprocess.run([sys.executable, "-m", "kit.cli", "train", str(bad)], capture_output=True, text=True, env=env)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "not valid YAML" in result.stderr and "Traceback" not in result.stderr


def test_bench_command_prints_every_figure(run):
    code, out = run("bench", RECIPES_DIR / "demo.yaml", "--updates", 2, "--untimed", 1, "--device", "cpu")
    assert code == 0, out
    for start in ("bench demo: batch 16", "kit engine  (fp32", "baseline    (", "ratio: ", "eager update: augmentation ", "model: "):
        assert any(line.startswith(start) for line in out.splitlines()), (start, out)


def test_data_demo_command(tmp_path, run):
    code, out = run("data", "demo", tmp_path / "d")
    assert code == 0 and (tmp_path / "d" / "cifar-10-batches-py" / "test_batch").is_file()
    assert (tmp_path / "d" / "test_labels.csv").is_file() and (tmp_path / "d" / "cifar_test_nolabel.pkl").is_file()


def test_unwritable_output_is_a_one_line_error(trained_run, demo_data, tmp_path, assert_one_line_error, run):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, out = run("predict", trained_run, "--test", demo_data / "cifar_test_nolabel.pkl", "--out", blocker / "s.csv",
                    "--device", "cpu")
    assert_one_line_error(code, out, str(blocker))


def test_export_command_writes_a_checkpoint_predict_reads(trained_run, demo_data, tmp_path, run):
    out = tmp_path / "m.safetensors"
    code, text = run("export", trained_run, "--format", "safetensors", "--out", out)
    assert code == 0 and text.strip().startswith(f"exported: {out} (safetensors, ") and out.is_file()
    code, text = run("predict", out, "--test", demo_data / "cifar_test_nolabel.pkl", "--out", tmp_path / "s.csv", "--device", "cpu")
    assert code == 0 and "model compute: " in text, text


def test_train_gpus_runs_its_own_arguments_again_under_torchrun(monkeypatch, run):
    from kit.training import distributed
    launched = []
    monkeypatch.setattr(distributed, "launch", lambda n, args: launched.append((n, args)) or 0)
    code, out = run("train", "r.yaml", "--gpus", 3, "--set", "optim.lr=0.1", "--runs", "somewhere", "--device", "cpu")
    assert code == 0, out
    assert launched == [(3, ["train", "r.yaml", "--set", "optim.lr=0.1", "--runs", "somewhere", "--device", "cpu"])]


def test_inference_does_not_import_the_sweep():
    """Arrows point down: ensembles read a list of runs, not kit.sweep (which needs Optuna)."""
    code = "import sys, kit.inference.ensemble, kit.inference.predict, kit.inference.evaluate, kit.inference.report; print(any(m.startswith('kit.sweep') for m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(RECIPES_DIR.parent)})
    assert result.stdout.strip() == "False", result.stderr


def test_each_choice_list_is_defined_once():
    from kit.inference.tta import TTA_VIEWS
    from kit.recipe import TTA_MODES
    assert tuple(TTA_VIEWS) == TTA_MODES
