"""Issue 38: k-fold cross-validation (kit train --folds), a CV directory as a checkpoint set, blends and stacks on
out-of-fold probabilities, and pseudo-labels that never leak a fold's validation images."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from kit.cli import RECIPES_DIR
from kit.data.datasets import Labelled, folds_of, load_dataset
from kit.errors import KitError
from kit.inference.probs import read_probs
from kit.recipe import load_recipe

FAST = ("train.epochs=2", "model.args.width=0.125", "train.batch_size=32", "schedule.name=constant")
SETS = [a for o in FAST for a in ("--set", o)]


def cv_train(run, root: Path, runs: Path, *extra, recipe=RECIPES_DIR / "demo.yaml", folds: int = 3) -> Path:
    before = set(runs.glob("*-cv-*")) if runs.is_dir() else set()
    code, out = run("train", recipe, *(("--data-root", root) if root else ()), "--folds", folds, *SETS, *extra,
                    "--runs", runs, "--device", "cpu")
    assert code == 0, out
    (cv_dir,) = set(runs.glob("*-cv-*")) - before
    return cv_dir


@pytest.fixture(scope="module")
def cv_dir(demo_data, tmp_path_factory, run):
    """A 3-fold CV of the demo recipe at tiny size on the digits (made once for this module)."""
    return cv_train(run, demo_data, tmp_path_factory.mktemp("cv"))


def test_a_cv_directory_holds_every_fold_its_oof_table_and_plot(cv_dir, demo_data):
    """Each fold is an ordinary run validated on its fold; oof.probs.npz is each fold run's own validation
    probabilities (a by-product, no second pass), every training id exactly once; cv.csv has each fold, mean, std."""
    recipe = load_recipe(cv_dir / "cv.yaml")
    assert (recipe.data.validation, recipe.data.folds) == ("fold", 3)
    oof = read_probs(cv_dir / "oof.probs.npz", labelled=True)
    train = load_dataset(dataclasses.replace(recipe.data, validation="none"), demo_data).train
    assert list(map(str, oof.ids)) == list(map(str, train.ids))  # the training set's order, each id once
    assert torch.equal(oof.labels, train.labels)
    for fold in range(3):
        run = cv_dir / f"fold-{fold}"
        assert load_recipe(run / "recipe.yaml").data.fold == fold and (run / "best.pt").is_file()
        val = read_probs(run / "val.probs.npz", labelled=True)
        rows = np.flatnonzero(oof.folds == fold)
        assert list(map(str, oof.ids[rows])) == list(map(str, val.ids))
        assert torch.equal(oof.member_probs[0, rows], val.member_probs[0])
    table = pd.read_csv(cv_dir / "cv.csv", dtype={"fold": str})
    assert table.fold.tolist() == ["0", "1", "2", "mean", "std", "out-of-fold", "ensemble of 3"]
    folds = table.iloc[:3]
    assert table.val_acc[3] == pytest.approx(folds.val_acc.mean()) and table.val_acc[4] == pytest.approx(folds.val_acc.std())
    assert table.images[5] == len(train) and folds.images.sum() == len(train)
    assert table.test_acc[:3].notna().all() and not np.isnan(table.test_acc[6])  # the labelled test set: a second score
    assert (cv_dir / "cv.png").is_file()


UNLABELLED = {"folder": "test", "csv": "test", "pixels": "test.csv", "npz": "unlabelled.npz"}


@pytest.mark.parametrize("fmt", ["folder", "csv", "pixels", "npz"])
def test_oof_ids_cover_the_training_set_once_in_every_format(fmt, tmp_path, run):
    """The data's own ids (a folder's <class>/<stem>, a CSV's id column, ...) key the out-of-fold file, each once; the
    CV predicts the format's unlabelled set, and pseudo-labels read those images back from it."""
    from kit.data.demo import make_demo_format
    data = make_demo_format(tmp_path / "data", fmt)
    cv = cv_train(run, None, tmp_path / "runs", recipe=data / "recipe.yaml")
    recipe = load_recipe(cv / "cv.yaml")
    train = load_dataset(dataclasses.replace(recipe.data, validation="none")).train
    oof = read_probs(cv / "oof.probs.npz", labelled=True)
    assert sorted(map(str, oof.ids)) == sorted(map(str, train.ids)) and len(set(map(str, oof.ids))) == len(train)
    assert sorted(np.bincount(oof.folds).tolist()) == sorted(np.bincount(folds_of(train, 3, 0, "x")).tolist())
    code, out = run("predict", cv, "--test", data / UNLABELLED[fmt], "--out", tmp_path / "s.csv", "--device", "cpu")
    assert code == 0, out
    code, out = run("train", data / "recipe.yaml", *SETS, "--set", "train.epochs=1", "--pseudo", tmp_path / "s.probs.npz",
                    "--pseudo-threshold", 0, "--runs", tmp_path / "pseudo", "--device", "cpu")
    assert code == 0 and "pseudo-labels: 300 test images" in out, out


def test_the_fold_ensemble_is_what_predict_evaluate_report_and_export_use(cv_dir, demo_data, tmp_path, run):
    folds = [cv_dir / f"fold-{i}" for i in range(3)]
    test = demo_data / "cifar_test_nolabel.pkl"
    code, out = run("predict", cv_dir, "--test", test, "--out", tmp_path / "cv.csv", "--device", "cpu")
    assert code == 0, out
    code, out = run("predict", *folds, "--test", test, "--out", tmp_path / "folds.csv", "--device", "cpu")
    assert code == 0, out
    assert (tmp_path / "cv.csv").read_text() == (tmp_path / "folds.csv").read_text()
    probs = read_probs(tmp_path / "cv.probs.npz", labelled=False)
    assert probs.member_folds.tolist() == [0, 1, 2] and len(set(probs.member_splits)) == 1
    assert probs.test == str(test.resolve())
    code, out = run("evaluate", cv_dir, "--held-out", "test", "--device", "cpu")
    assert code == 0 and all(f"{cv_dir.name}/fold-{i}" in out for i in range(3)), out
    code, out = run("report", cv_dir, "--report-dir", tmp_path / "reports", "--device", "cpu")
    assert code == 0 and sorted(p.name for p in (tmp_path / "reports").iterdir()) == ["fold-0", "fold-1", "fold-2"], out
    code, out = run("export", cv_dir, "--format", "safetensors", "--out", tmp_path / "exported")
    assert code == 0 and sorted(p.name for p in (tmp_path / "exported").iterdir()) == [f"fold-{i}.safetensors" for i in range(3)]


def test_an_unfinished_cv_is_no_checkpoint_set(cv_dir, tmp_path, run, assert_one_line_error):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(cv_dir, copy)
    (copy / "oof.probs.npz").unlink()
    code, out = run("predict", copy, "--test", "x.pkl", "--device", "cpu")
    assert_one_line_error(code, out, "its cross-validation has not finished", f"kit train --resume {copy}")


@pytest.mark.slow
def test_a_kill_in_the_middle_of_a_fold_resumes_to_the_same_cv_csv(cv_dir, demo_data, tmp_path):
    """SIGKILL in fold 1's second epoch (update 30 the second time it comes: 24 updates an epoch), then kit train
    --resume CVDIR: fold 1 finishes from its last.pt, fold 2 trains, and cv.csv and the out-of-fold file are the
    uninterrupted CV's."""
    env = {**os.environ, "KIT_FAULT": "update:30@2"}  # the threads of this process: the same sums, bit for bit
    args = [sys.executable, "-m", "kit.cli", "train", str(RECIPES_DIR / "demo.yaml"), "--data-root", str(demo_data),
            "--folds", "3", *SETS, "--runs", str(tmp_path), "--device", "cpu"]
    killed = subprocess.run(args, env=env, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stdout + killed.stderr
    (cv,) = tmp_path.glob("demo-cv-*")
    assert (cv / "fold-0" / "best.pt").is_file() and not (cv / "fold-2" / "last.pt").is_file()
    resumed = subprocess.run([sys.executable, "-m", "kit.cli", "train", "--resume", str(cv), "--device", "cpu"],
                             env={**env, "KIT_FAULT": ""}, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "fold 0 " not in resumed.stdout and "fold 2 (3 of 3)" in resumed.stdout, resumed.stdout
    assert f"resuming {cv / 'fold-1'} after epoch 1 of 2" in resumed.stdout
    assert (cv / "cv.csv").read_text() == (cv_dir / "cv.csv").read_text()
    ours, theirs = np.load(cv / "oof.probs.npz"), np.load(cv_dir / "oof.probs.npz")
    assert np.array_equal(ours["probs"], theirs["probs"]) and np.array_equal(ours["ids"], theirs["ids"])


def test_folds_are_checked_in_one_line(demo_data, tmp_path, run, assert_one_line_error, cv_dir):
    code, out = run("train", RECIPES_DIR / "demo.yaml", "--folds", 1, "--runs", tmp_path, "--device", "cpu")
    assert_one_line_error(code, out, "--folds 1: out of range", ">= 2")
    code, out = run("train", RECIPES_DIR / "demo.yaml", "--data-root", demo_data, "--folds", 200, "--runs", tmp_path,
                    "--device", "cpu")
    assert_one_line_error(code, out, "fewer than the 200 folds")
    assert not list(tmp_path.iterdir())  # nothing was made
    tiny = Labelled(torch.zeros(3, 3, 8, 8, dtype=torch.uint8), torch.tensor([0, 1, 0]), np.arange(3))
    with pytest.raises(KitError, match="3 training images are too few for 4 folds"):
        folds_of(tiny, 4, 0, "t")
    code, out = run("train", "--resume", cv_dir, "--set", "train.epochs=3", "--device", "cpu")
    assert_one_line_error(code, out, "a CV directory resumes as it was planned")


@pytest.mark.slow
def test_folds_train_side_by_side_pinned_to_devices(demo_data, tmp_path, monkeypatch):
    """--folds K --devices 0,1: one process per fold (kit train --resume FOLD_DIR), pinned as --seeds runs are."""
    from kit.training import cv as cv_module
    from kit.training import seeds as seeds_module
    pinned = []
    real_popen = subprocess.Popen

    def recording_popen(args, env=None, **kwargs):
        pinned.append((args[args.index("--resume") + 1], env.get("CUDA_VISIBLE_DEVICES")))
        return real_popen(args, env={**env, "OMP_NUM_THREADS": "1"}, **kwargs)

    monkeypatch.setattr(seeds_module.subprocess, "Popen", recording_popen)
    recipe = load_recipe(RECIPES_DIR / "demo.yaml", FAST)
    cv = cv_module.train_cv(recipe, 3, demo_data, tmp_path, "cpu", devices=("0", "1"), echo=lambda _: None)
    assert sorted(Path(p).name for p, _ in pinned) == ["fold-0", "fold-1", "fold-2"]
    assert [d for _, d in pinned[:2]] == ["0", "1"] and pinned[2][1] in ("0", "1")
    assert read_probs(cv / "oof.probs.npz", labelled=True).folds.max() == 2


def test_pseudo_labels_under_folds_come_from_each_folds_own_model(cv_dir, demo_data, tmp_path, run, assert_one_line_error):
    """Fold i trains on the test images its own fold model labels (never another's, which saw fold i); a file of a
    single run, or of other folds, is refused in one line before anything is made."""
    test = demo_data / "cifar_test_nolabel.pkl"
    assert run("predict", cv_dir, "--test", test, "--out", tmp_path / "cv.csv", "--device", "cpu")[0] == 0
    code, out = run("predict", cv_dir / "fold-0", "--test", test, "--out", tmp_path / "one.csv", "--device", "cpu")
    assert code == 0, out
    runs = tmp_path / "runs"
    code, out = run("train", RECIPES_DIR / "demo.yaml", "--data-root", demo_data, "--folds", 3, *SETS, "--pseudo",
                    tmp_path / "one.probs.npz", "--runs", runs, "--device", "cpu")
    assert_one_line_error(code, out, "none of its 1 models held out fold 1", "would leak fold 1's validation images")
    code, out = run("train", RECIPES_DIR / "demo.yaml", "--data-root", demo_data, "--folds", 3, *SETS, "--set",
                    "data.split_seed=1", "--pseudo", tmp_path / "cv.probs.npz", "--runs", runs, "--device", "cpu")
    assert_one_line_error(code, out, "none of its 3 models held out fold 0 of these folds")
    assert not runs.exists() or not list(runs.iterdir())
    cv = cv_train(run, demo_data, runs, "--pseudo", tmp_path / "cv.probs.npz", "--pseudo-threshold", 0.3)
    probs = read_probs(tmp_path / "cv.probs.npz", labelled=False)
    for fold in range(3):
        own = probs.member_probs[fold]
        confident = own.max(1).values >= 0.3
        expected = torch.bincount(own.argmax(1)[confident], minlength=10).tolist()
        assert pd.read_csv(cv / f"fold-{fold}" / "pseudo.csv").added.tolist() == expected


def test_pseudo_labels_join_the_training_images_only_hard_or_soft(trained_run, demo_data, tmp_path, run, tiny_recipe):
    from kit.training.pseudo import add_pseudo_labels
    test = demo_data / "cifar_test_nolabel.pkl"
    assert run("predict", trained_run, "--test", test, "--out", tmp_path / "s.csv", "--device", "cpu")[0] == 0
    file = read_probs(tmp_path / "s.probs.npz", labelled=False)
    confident = file.member_probs[0].max(1).values >= 0.2
    base = tiny_recipe()
    dataset = load_dataset(base.data, demo_data)
    for soft in (False, True):
        recipe = dataclasses.replace(base, pseudo=dataclasses.replace(base.pseudo, probs=str(tmp_path / "s.probs.npz"),
                                                                      threshold=0.2, soft=soft))
        added, table = add_pseudo_labels(dataset, recipe)
        assert len(added.train) == len(dataset.train) + int(confident.sum()) == len(dataset.train) + table.added.sum()
        assert added.held_out is dataset.held_out  # never the validation images
        assert torch.equal(added.train.labels[len(dataset.train):], file.member_probs[0].argmax(1)[confident])
        if soft:
            assert torch.equal(added.train.soft[len(dataset.train):], file.member_probs[0][confident])
            assert torch.equal(added.train.soft[:len(dataset.train)].argmax(1), dataset.train.labels)
        else:
            assert added.train.soft is None
    own = dict(np.load(tmp_path / "s.probs.npz"))  # a file whose own probs are not its members' mean (a stacker's)
    own["probs"] = np.eye(10, dtype=np.float32)[(own["probs"].argmax(1) + 1) % 10]
    np.savez(tmp_path / "stacked.npz", **own)
    recipe = dataclasses.replace(base, pseudo=dataclasses.replace(base.pseudo, probs=str(tmp_path / "stacked.npz")))
    added, _ = add_pseudo_labels(dataset, recipe)
    assert torch.equal(added.train.labels[len(dataset.train):], torch.from_numpy(own["probs"].argmax(1)))  # the file's
    code, out = run("train", RECIPES_DIR / "demo.yaml", "--data-root", demo_data, *SETS, "--pseudo", tmp_path / "s.probs.npz",
                    "--pseudo-soft", "--pseudo-threshold", 0.2, "--runs", tmp_path / "runs", "--device", "cpu")
    assert code == 0 and f"pseudo-labels: {int(confident.sum())} test images" in out, out
    run_dir = next((tmp_path / "runs").iterdir())
    assert load_recipe(run_dir / "recipe.yaml").pseudo.soft and (run_dir / "pseudo.csv").is_file()


def test_the_stacker_is_scikit_learns_and_cross_validated():
    """kit's stacked score is scikit-learn's LogisticRegression's cross_val_predict on the members' log-probabilities;
    on members that know nothing it scores near chance, where the same stacker scored on the images it was fitted on
    looks far better."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    from kit.inference.blend import greedy_selection
    from kit.inference.stack import compare, stack_features
    gen = torch.Generator().manual_seed(0)
    members = torch.softmax(torch.randn(3, 300, 10, generator=gen) * 2, -1)
    labels = torch.arange(300) % 10
    table = compare(members, labels, lambda p, y: greedy_selection(p, y, 5), "t")
    features = stack_features(members)
    theirs = cross_val_predict(LogisticRegression(max_iter=2000), features, labels.numpy(),
                               cv=StratifiedKFold(5, shuffle=True, random_state=0), method="predict_proba")
    assert table.top1[0] == pytest.approx((theirs.argmax(1) == labels.numpy()).mean())
    in_sample = LogisticRegression(max_iter=2000).fit(features, labels.numpy()).score(features, labels.numpy())
    assert table.top1[0] < 0.2 < in_sample
    assert table.ensemble.tolist()[2] == "averaged"


def test_blend_and_stack_on_out_of_fold_files(cv_dir, demo_data, tmp_path, run, assert_one_line_error):
    """Two CVs' out-of-fold files (aligned by training id) choose the blend and fit the stacker; each CV's k fold
    models on the test set count as one member beside its one out-of-fold member."""
    test = demo_data / "cifar_test_nolabel.pkl"
    other = cv_train(run, demo_data, tmp_path / "runs", "--set", "train.seed=1")
    for name, cv in (("a", cv_dir), ("b", other)):
        assert run("predict", cv, "--test", test, "--out", tmp_path / f"{name}.csv", "--device", "cpu")[0] == 0
    oof = [cv_dir / "oof.probs.npz", other / "oof.probs.npz"]
    code, out = run("blend", "--labelled", oof[0], "--labelled", oof[1], "--unlabelled", tmp_path / "a.probs.npz",
                    "--unlabelled", tmp_path / "b.probs.npz", "--out", tmp_path / "stacked.csv", "--stacker", "logistic")
    assert code == 0 and "stacked (logistic regression" in out and "blended (greedy" in out and "averaged" in out, out
    stacked = np.load(tmp_path / "stacked.probs.npz")
    assert stacked["member_probs"].shape[0] == 2 and str(stacked["stacker"]) == "logistic"
    code, out = run("evaluate", *oof, "--select", "--select-out", tmp_path / "sel.json")
    assert code == 0 and "ensemble (selected)" in out, out
    code, out = run("predict", cv_dir, other, "--blend", tmp_path / "sel.json", "--test", test, "--out",
                    tmp_path / "sel.csv", "--device", "cpu")
    assert code == 0, out
    moved = dict(np.load(oof[1]))
    moved["ids"] = np.array([f"x{i}" for i in moved["ids"]])
    np.savez(tmp_path / "moved.npz", **moved)
    code, out = run("blend", "--labelled", oof[0], "--labelled", tmp_path / "moved.npz", "--unlabelled",
                    tmp_path / "a.probs.npz", "--unlabelled", tmp_path / "b.probs.npz", "--out", tmp_path / "x.csv")
    assert_one_line_error(code, out, "its ids differ from")
    assert not (tmp_path / "x.csv").exists()


def test_kit_train_with_folds_from_python_returns_the_cv(demo_data, tmp_path, quiet, cv_dir):
    import kit
    cv = kit.train(RECIPES_DIR / "demo.yaml", demo_data, runs=tmp_path, device="cpu", folds=3, echo=quiet, train__epochs=2,
                   model__args__width=0.125, train__batch_size=32, schedule__name="constant")  # FAST
    assert isinstance(cv, kit.CV) and [r.dir.name for r in cv.folds] == ["fold-0", "fold-1", "fold-2"]
    (cv.dir / "fold-1.log").write_text("")  # what folds trained side by side (--devices) leave beside them
    assert [r.dir.name for r in cv.folds] == ["fold-0", "fold-1", "fold-2"]
    assert cv.table.equals(pd.read_csv(cv_dir / "cv.csv", dtype={"fold": str}))  # the CLI's CV, the same figures
    oof = cv.oof
    assert len(oof) == oof.id.nunique() and list(oof.columns[:3]) == ["id", "label", "fold"]
    with pytest.raises(KitError, match="folds= 1: out of range"):
        kit.train(RECIPES_DIR / "demo.yaml", demo_data, runs=tmp_path, device="cpu", folds=1)
