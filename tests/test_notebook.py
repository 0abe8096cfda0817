"""Issue 41: kit in a Kaggle notebook. A real notebook kernel (nbclient + ipykernel) trains, predicts from an array,
interprets and plots inline, and its own matplotlib plot still shows; images in memory; the interpretation object;
progress that stays short; help() and dir(); nothing replaced without a word; the folder says what it is; kit pack
installs offline; kit runs."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import kit
from kit.cli import RECIPES_DIR
from kit.data.datasets import read_test_pickle
from kit.errors import KitError

DEMO = RECIPES_DIR / "demo.yaml"
TINY = {"train__epochs": 1, "model__args__width": 0.125}


def _cell(source: str) -> dict:
    return {"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [],
            "id": f"c{abs(hash(source)) % 10**8}", "source": source}


@pytest.mark.slow
def test_a_notebook_trains_predicts_interprets_and_keeps_its_own_plots(demo_data, tmp_path):
    import nbformat
    from nbclient import NotebookClient
    cells = [
        "import matplotlib.pyplot as plt\nimport numpy as np\nimport kit\n"
        "from kit.data.datasets import read_test_pickle",
        f"run = kit.train({str(DEMO)!r}, {str(demo_data)!r}, runs={str(tmp_path / 'runs')!r}, device='cpu', "
        "train__epochs=2, model__args__width=0.125)",
        f"images = read_test_pickle({str(demo_data / 'cifar_test_nolabel.pkl')!r}).images.permute(0, 2, 3, 1).numpy()\n"
        "table = kit.predict(run.dir, images[:8], device='cpu')\nlabel, probs = kit.predict(run.dir, images[0], device='cpu')\n"
        "assert len(table) == 8 and label == table.label.iloc[0] and abs(probs.sum() - 1) < 1e-4\nprint(table.shape)",
        "interp = kit.interpret(run.dir, held_out='test', device='cpu')\n"
        "print(interp.top_losses(3).shape, len(interp.most_confused()))\ninterp.plot_confusion()",
        f"found = kit.lr_find({str(DEMO)!r}, {str(demo_data)!r}, 'cpu', updates=12, model__args__width=0.125)\nfound",
        "found.plot()",
        "plt.plot([1, 2, 3], [3, 1, 2])\nplt.title('the notebook own plot')\nplt.show()",
    ]
    notebook = nbformat.v4.new_notebook(cells=[nbformat.from_dict(_cell(c)) for c in cells])
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [c.outputs for c in notebook.cells]
    kinds = [[o.output_type for o in out] for out in outputs]
    assert not any("error" in k for k in kinds), kinds
    train_text = "".join(o.get("text", "") for o in outputs[1])
    assert 3 <= len(train_text.strip().splitlines()) <= 6, train_text  # the start line, an epoch line each, no bar's lines
    assert "(8, 11)" in "".join(o.get("text", "") for o in outputs[2])
    assert any("image/png" in o.get("data", {}) for o in outputs[3])  # the confusion matrix, inline
    (found_repr,) = [o.data["text/plain"] for o in outputs[4] if o.output_type == "execute_result"]
    assert found_repr.startswith("LRFind(") and "\n" not in found_repr
    assert any("image/png" in o.get("data", {}) for o in outputs[5])
    assert any("image/png" in o.get("data", {}) for o in outputs[6])  # after kit: the notebook's own plot still shows


def test_images_in_memory_as_arrays_tensors_pil_images_and_paths(trained_run, demo_data, tmp_path, run):
    from PIL import Image
    test = read_test_pickle(demo_data / "cifar_test_nolabel.pkl")
    hwc = test.images.permute(0, 2, 3, 1).numpy()[:6]
    code, out = run("predict", trained_run, "--test", demo_data / "cifar_test_nolabel.pkl", "--tta", "none",
                    "--out", tmp_path / "s.csv", "--device", "cpu")
    assert code == 0, out
    from_file = np.load(tmp_path / "s.probs.npz")["probs"][:6]
    table = kit.predict(trained_run, hwc, tta="none", device="cpu")
    assert list(table.columns) == ["label", *[str(c) for c in range(10)]] and len(table) == 6
    np.testing.assert_allclose(table.iloc[:, 1:].to_numpy(), from_file, atol=1e-6)  # the same as from the file
    np.testing.assert_allclose(kit.predict(trained_run, torch.from_numpy(hwc).permute(0, 3, 1, 2), tta="none",
                                           device="cpu").iloc[:, 1:].to_numpy(), from_file, atol=1e-6)
    for i in range(2):
        Image.fromarray(hwc[i]).save(tmp_path / f"{i}.png")
    by_path = kit.predict(trained_run, [tmp_path / "0.png", tmp_path / "1.png"], tta="none", device="cpu")
    assert by_path.index.tolist() == [str(tmp_path / "0.png"), str(tmp_path / "1.png")]
    label, probs = kit.predict(trained_run, Image.fromarray(hwc[0]), tta="none", device="cpu")
    assert label == table.label.iloc[0] and probs.to_numpy() == pytest.approx(from_file[0], abs=1e-6)
    assert kit.predict(trained_run, tmp_path / "0.png", tta="none", device="cpu")[0] == label
    with pytest.raises(KitError, match="dict: not images kit reads; give a test file"):
        kit.predict(trained_run, {"a": 1}, device="cpu")
    with pytest.raises(KitError, match="has dtype float32; expected uint8"):
        kit.predict(trained_run, hwc.astype(np.float32), device="cpu")
    table = kit.evaluate(trained_run, images=hwc, labels=table.label.tolist(), tta="none", device="cpu", echo=lambda _: None)
    assert table.top1.iloc[0] == 1.0  # scored against its own predictions
    code, out = run("predict", trained_run, "--test", tmp_path / "0.png", "--device", "cpu")
    assert code == 2 and "one image, not a test set" in out and "unsafe" not in out, out


def test_the_interpretation_object_and_report_draw_the_same_mistakes(trained_run, demo_data, tmp_path, quiet):
    from kit.inference.interpret import Interpretation
    interp = kit.interpret(trained_run, held_out="test", device="cpu")
    assert isinstance(interp, Interpretation) and "\n" not in repr(interp)
    losses = interp.top_losses()
    assert losses.loss.is_monotonic_decreasing and len(losses) == len(interp.labels)
    assert set(losses.columns) == {"id", "true", "predicted", "p_true", "p_predicted", "loss"}
    pairs = interp.most_confused(min_count=1)
    assert (pairs["count"] >= 1).all() and (pairs.true != pairs.predicted).all()
    assert interp.plot_confusion()._repr_png_()[:4] == b"\x89PNG"
    with pytest.raises(KitError, match="needs an ensemble"):
        interp.plot_disagreement(demo_data / "cifar_test_nolabel.pkl")
    other = kit.train(DEMO, demo_data, tmp_path / "runs", "cpu", echo=quiet, train__seed=5, **TINY)
    both = kit.interpret([trained_run, other.dir], held_out="test", device="cpu")
    table = both.disagreement(demo_data / "cifar_test_nolabel.pkl")
    figure = both.plot_disagreement(demo_data / "cifar_test_nolabel.pkl", n=500)
    shown = int((table.agreement < 1).sum())
    assert (figure is None) == (shown == 0)
    if figure is not None:  # only the images without a unanimous vote, never 24 when 4 disagree
        assert f"The {shown} test images" in figure._suptitle.get_text() and "votes 9/3" not in figure._suptitle.get_text()


def test_progress_is_short_where_no_bar_draws_in_place(monkeypatch, demo_data):
    from kit.training import run as run_module
    monkeypatch.setattr(run_module, "in_notebook", lambda: True)
    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # a notebook without ipywidgets
    assert run_module.progress_bar(100, "epoch 1/1") is None  # not tqdm's text fallback, a line per refresh
    lines = []
    kit.lr_find(DEMO, demo_data, "cpu", updates=40, echo=lines.append, model__args__width=0.125)
    progress = [line for line in lines if line.startswith("lr-find: ")]
    assert 1 <= len(progress) <= 10 and progress[-1].startswith("lr-find: 40 of 40 updates")


def test_every_verb_says_its_arguments_and_what_it_returns():
    import inspect
    for name in ("train", "predict", "evaluate", "interpret", "report", "blend", "lr_find", "runs"):
        doc = inspect.getdoc(getattr(kit, name))
        assert "Returns:" in doc, name
        assert name == "runs" or "Args:" in doc, name
        for parameter in inspect.signature(getattr(kit, name)).parameters:
            assert parameter in ("echo", "overrides", "options") or parameter in doc, (name, parameter)
    assert {"train", "predict", "evaluate", "interpret", "report", "blend", "lr_find", "runs"} <= set(dir(kit))


def test_predict_and_report_say_what_they_replace(trained_run, demo_data, tmp_path, run):
    args = ("predict", trained_run, "--test", demo_data / "cifar_test_nolabel.pkl", "--out", tmp_path / "s.csv",
            "--device", "cpu")
    assert "replacing" not in run(*args)[1]
    assert f"replacing {tmp_path / 's.csv'}" in run(*args)[1]
    args = ("report", trained_run, "--report-dir", tmp_path / "r", "--device", "cpu")
    assert "replacing" not in run(*args)[1]
    assert f"replacing the report in {tmp_path / 'r' / trained_run.name}" in run(*args)[1]
    readme = (RECIPES_DIR.parent / "README.md").read_text()
    assert "--out submissions/" not in readme  # the README's commands never overwrite the committed submissions


@pytest.mark.parametrize("fmt", ["folder", "csv", "pixels", "npz"])
def test_the_folder_says_what_it_is(fmt, tmp_path, run):
    """kit data inspect finds each demo layout's own recipe keys; kit train with no data keys reads them itself."""
    from kit.data.demo import make_demo_format
    from kit.data.inspect import inspect
    from kit.recipe import DataSpec, load_recipe
    data = make_demo_format(tmp_path / "data", fmt)
    shipped = load_recipe(data / "recipe.yaml").data
    found = inspect(data).spec(DataSpec(), shipped.root)
    assert found == DataSpec(**{**shipped.__dict__, "classes": ()}) or found == shipped
    code, out = run("data", "inspect", data)
    assert code == 0 and "recipe keys: data.format=" in out, out
    code, out = run("train", DEMO, "--data-root", data, "--set", "train.epochs=1", "--set", "model.args.width=0.125",
                    "--runs", tmp_path / "runs", "--device", "cpu")
    assert code == 0 and f"recipe keys from the folder: data.format={fmt}" in out, out


def test_a_folder_of_no_known_layout_is_one_line(tmp_path, run, assert_one_line_error):
    (tmp_path / "notes.txt").write_text("x")
    code, out = run("data", "inspect", tmp_path)
    assert_one_line_error(code, out, "no layout kit reads")


def test_kit_runs_lists_the_runs_best_first(trained_run, demo_data, tmp_path, quiet, run):
    kit.train(DEMO, demo_data, tmp_path, "cpu", echo=quiet, **TINY)
    kit.train(DEMO, demo_data, tmp_path, "cpu", echo=quiet, train__epochs=2, model__args__width=0.25)
    table = kit.runs(tmp_path)
    assert len(table) == 2 and table.best_val_acc.is_monotonic_decreasing
    assert set(table.differs) == {"model.args.width=0.125; train.epochs=1", "model.args.width=0.25; train.epochs=2"}
    assert table.epochs.tolist() in (["1/1", "2/2"], ["2/2", "1/1"]) and (table.precision == "fp32").all()
    assert table.parameters.notna().all()
    code, out = run("runs", tmp_path)
    assert code == 0 and "best_val_acc" in out and len(out.strip().splitlines()) == 3, out


@pytest.mark.slow
def test_pack_installs_offline_in_a_fresh_venv_and_predicts(trained_run, demo_data, tmp_path, run):
    """kit pack's wheelhouse installs with --no-index into a fresh venv (the image's packages, torch and the rest, stand
    in as the image's: everything installed here but kit), and its inference script writes kit predict's submission."""
    from kit.cli.pack import IMAGE_HAS, download_command, lacking
    image_has = (*IMAGE_HAS, *lacking())
    test = demo_data / "cifar_test_nolabel.pkl"
    code, out = run("pack", trained_run, "--test", test, "--out", tmp_path / "pack", "--image-has", ",".join(image_has),
                    "--tta", "none")
    assert code == 0, out
    pack = tmp_path / "pack"
    assert json.loads((pack / "kit-wheels" / "dataset-metadata.json").read_text())["id"].endswith("/kit-wheels")
    assert [p.name for p in (pack / "kit-wheels").glob("*.whl")][0].startswith("kit-")
    image = tmp_path / "image"  # the image's site-packages: this environment's, without kit
    image.mkdir()
    site = Path(torch.__file__).resolve().parents[1]
    for entry in site.iterdir():
        if not entry.name.startswith(("kit", "__editable__", "_kit")):
            (image / entry.name).symlink_to(entry)
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(tmp_path / "venv")], check=True)  # pip: the image's
    venv_python = tmp_path / "venv" / "bin" / "python"
    venv_site = Path(subprocess.run([venv_python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                    capture_output=True, text=True, check=True).stdout.strip())
    (venv_site / "image.pth").write_text(f"{image}\n")
    result = subprocess.run([venv_python, pack / "inference.py", "--test", str(test), "--out", str(tmp_path / "sub.csv")],
                            capture_output=True, text=True, cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "kit" in subprocess.run([venv_python, "-m", "pip", "list"], capture_output=True, text=True).stdout
    code, out = run("predict", trained_run, "--test", test, "--tta", "none", "--out", tmp_path / "here.csv", "--device", "cpu")
    assert pd.read_csv(tmp_path / "sub.csv").equals(pd.read_csv(tmp_path / "here.csv"))
    command = download_command({"click": "8.1.0"}, tmp_path, "3.12", "manylinux2014_x86_64")
    assert command[-1] == "click==8.1.0" and "--no-deps" in command and command[command.index("--python-version") + 1] == "3.12"


def test_a_short_grids_title_is_wrapped_to_its_width_never_cut():
    from kit.inference.plots import TITLE_CHARS_PER_INCH, plot_image_grid
    title = "The 2 held-out images with the highest loss (true -> predicted), a title longer than two images are wide"
    figure = plot_image_grid([np.zeros((3, 8, 8), np.uint8)] * 2, ["a", "b"], title=title)
    width = figure.get_size_inches()[0]
    lines = figure._suptitle.get_text().split("\n")
    assert len(lines) > 1 and " ".join(lines) == title and max(map(len, lines)) <= width * TITLE_CHARS_PER_INCH
