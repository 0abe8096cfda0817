"""kit from Python: `import kit` gives the command line's verbs on the same code path, returning what they made
(a Run with its metrics, the submission as a DataFrame, the evaluation table, the LR sweep); errors raise KitError with
the line the CLI prints."""

import pandas as pd
import pytest

import kit
from kit.cli import RECIPES_DIR
from kit.errors import KitError

TIMING = ["seconds", "images_per_s"]


def test_the_api_and_the_cli_write_the_same_submission(demo_data, tmp_path, run, quiet):
    test = demo_data / "cifar_test_nolabel.pkl"
    code, out = run("train", RECIPES_DIR / "demo.yaml", "--data-root", demo_data, "--runs", tmp_path / "cli", "--device", "cpu",
                    "--set", "train.epochs=1", "--set", "model.args.width=0.25")
    assert code == 0, out
    (cli_run,) = (tmp_path / "cli").iterdir()
    code, out = run("predict", cli_run, "--test", test, "--out", tmp_path / "cli.csv", "--device", "cpu")
    assert code == 0, out
    trained = kit.train(RECIPES_DIR / "demo.yaml", demo_data, tmp_path / "api", "cpu", echo=quiet, train__epochs=1,
                        model__args__width=0.25)
    assert isinstance(trained, kit.Run) and len(trained.metrics) == 1 and trained.recipe.train.epochs == 1
    pd.testing.assert_frame_equal(trained.metrics.drop(columns=TIMING),
                                  pd.read_csv(cli_run / "metrics.csv").drop(columns=TIMING))
    submission = kit.predict(trained.dir, test, out=tmp_path / "api.csv", device="cpu", echo=quiet)
    assert submission.equals(pd.read_csv(tmp_path / "cli.csv", dtype=str, keep_default_na=False))
    assert len(submission) == 300 and list(submission.columns) == ["ID", "Labels"]
    table = kit.evaluate([trained.dir], device="cpu", echo=quiet)
    assert table.top1.between(0, 1).all() and trained.plot() == trained.dir / "curves.png"


def test_errors_raise_the_line_the_cli_prints(demo_data, tmp_path, run):
    code, out = run("predict", tmp_path / "none", "--test", demo_data / "cifar_test_nolabel.pkl")
    with pytest.raises(KitError) as raised:
        kit.predict(tmp_path / "none", demo_data / "cifar_test_nolabel.pkl")
    assert code == 2 and out.strip() == f"error: {raised.value}"
    with pytest.raises(KitError, match=r"train.epochs: .*(--set train.epochs=-1)"):
        kit.train(RECIPES_DIR / "demo.yaml", demo_data, tmp_path, "cpu", train__epochs=-1)


def test_lr_find_returns_the_sweep_and_draws_it(demo_data, tmp_path, quiet):
    found = kit.lr_find(RECIPES_DIR / "demo.yaml", demo_data, "cpu", updates=12, echo=quiet, model__args__width=0.25)
    assert len(found.lrs) == 12 and found.minimum > 0
    figure = found.plot(tmp_path / "lr.png")
    assert (tmp_path / "lr.png").read_bytes()[:4] == b"\x89PNG" and figure._repr_png_()[:4] == b"\x89PNG"
    assert found.plot() is not figure and not (tmp_path / "lr_find").exists()  # no path: nothing written
    assert repr(found).count("\n") == 0 and f"suggested optim.lr {found.minimum:.3g}" in repr(found)


def test_kit_leaves_matplotlib_to_the_notebook(demo_data, tmp_path):
    """Issue 41: kit draws on Figure objects: importing it, training (curves.png) and plotting never switch the backend
    nor add a figure to pyplot's state, so a notebook's own plt.plot(); plt.show() still shows."""
    import subprocess
    import sys
    code = f"""
import matplotlib
matplotlib.use("svg")  # stands in for a notebook's inline backend
import matplotlib.pyplot as plt
import kit
run = kit.train({str(RECIPES_DIR / 'demo.yaml')!r}, {str(demo_data)!r}, {str(tmp_path)!r}, "cpu", echo=lambda _: None,
                train__epochs=1, model__args__width=0.125)
found = kit.lr_find({str(RECIPES_DIR / 'demo.yaml')!r}, {str(demo_data)!r}, "cpu", updates=12, echo=lambda _: None,
                    model__args__width=0.125)
found.plot()
print(matplotlib.get_backend(), plt.get_fignums(), (run.dir / "curves.png").is_file())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[-2] == "svg [] True"


def test_import_kit_loads_no_torch_until_a_verb_is_used():
    import subprocess
    import sys
    code = "import sys, kit; print('torch' in sys.modules); kit.train; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True"]
