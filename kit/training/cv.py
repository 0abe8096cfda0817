"""k-fold cross-validation: `kit train RECIPE --folds K` trains one ordinary run per fold (data.validation: fold, each
validated on its fold and trained on the others; scikit-learn's StratifiedKFold, seeded by data.split_seed) into one
CV directory:

    runs/<recipe>-cv-<time>/
        cv.yaml            the CV's recipe (kit.inference.checkpoint.CV_FILE: the folder stands for its k fold models)
        fold-0/ ...        each fold's run directory (recipe.yaml, metrics.csv, best.pt, last.pt, val.probs.npz)
        oof.probs.npz      every training image's probabilities from the fold model that held it out, once per id
        cv.csv, cv.png     each fold's accuracy and loss (the better weights at its best epoch), their mean and std,
                           and on the labelled test set (where the recipe has one) each fold model's and their ensemble's

The out-of-fold probabilities are a by-product: each fold's run keeps the probabilities it scored its best epoch
with (val.probs.npz), and they are gathered here, never predicted a second time. The CV stops and resumes as a run
does: `kit train --resume CVDIR` finishes the fold in progress from its last.pt and trains the rest."""

import dataclasses
import math
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from kit.data.datasets import Labelled, load_dataset
from kit.errors import KitError
from kit.inference.checkpoint import CV_FILE, FOLD_DIR, OOF_PROBS, is_cv_dir
from kit.inference.ensemble import load_ensemble
from kit.inference.probs import probs_arrays, read_probs, write_probs
from kit.inference.scores import probs_loss_acc, topk
from kit.io import write_text
from kit.recipe import Recipe, check_argument, load_recipe, recipe_as_dict, recipe_from_dict, save_recipe
from kit.training.distill import resolve_teachers
from kit.training.run import VAL_PROBS, new_run_dir, resume, stopped_early, train, with_data_root

CV_TABLE, CV_PLOT = "cv.csv", "cv.png"
CV_COLUMNS = ["fold", "images", "best_epoch", "weights_from", "val_acc", "val_loss", "test_acc"]


def with_fold(recipe: Recipe, folds: int, fold: int, source: str) -> Recipe:
    """The recipe validated on fold `fold` of `folds` (whatever its own validation choice was), checked as a recipe."""
    return recipe_from_dict(recipe_as_dict(recipe), source,
                            ("data.validation=fold", f"data.folds={folds}", f"data.fold={fold}"))


def train_cv(recipe: Recipe, folds: int, data_root: str | Path | None = None, out_root: str | Path = "runs",
             device: str = "auto", devices: tuple[str, ...] = (), jobs: int = 1,
             echo: Callable[[str], None] = print) -> Path:
    """Cross-validate `recipe` on `folds` folds into a new CV directory; returns its path."""
    check_argument("folds", folds, "--folds")
    recipe = resolve_teachers(with_data_root(with_fold(recipe, folds, 0, recipe.name), data_root), recipe.name)
    dataset = load_dataset(recipe.data)  # the folds are checked (too few images, a class with fewer than k) before any folder
    if recipe.pseudo.probs:  # every fold's pseudo-labels checked for leaks before any folder
        from kit.training.pseudo import fold_members
        probs = read_probs(recipe.pseudo.probs, labelled=False)
        for fold in range(folds):
            fold_members(probs, with_fold(recipe, folds, fold, recipe.name), dataset.split)
    cv_dir = new_run_dir(out_root, f"{recipe.name}-cv")
    for fold in range(folds):  # every fold's recipe first: the CV resumes from any moment after this
        (cv_dir / FOLD_DIR.format(fold)).mkdir()
        save_recipe(with_fold(recipe, folds, fold, recipe.name), cv_dir / FOLD_DIR.format(fold) / "recipe.yaml")
    save_recipe(recipe, cv_dir / CV_FILE)
    echo(f"{folds}-fold cross-validation of {recipe.name} (stratified, data.split_seed {recipe.data.split_seed}): {cv_dir}")
    return run_cv(cv_dir, data_root, device, devices, jobs, echo)


def run_cv(cv_dir: str | Path, data_root: str | Path | None = None, device: str = "auto", devices: tuple[str, ...] = (),
           jobs: int = 1, echo: Callable[[str], None] = print) -> Path:
    """Train every fold not finished yet (from its last.pt when it has one), side by side over `devices` when given,
    then gather the out-of-fold probabilities and the table. Also how `kit train --resume CVDIR` goes on."""
    cv_dir = Path(cv_dir)
    if not is_cv_dir(cv_dir):
        raise KitError(f"{cv_dir}: not a CV directory (no {CV_FILE})")
    recipe = load_recipe(cv_dir / CV_FILE)
    folds = recipe.data.folds
    pending = [fold for fold in range(folds) if not fold_finished(cv_dir / FOLD_DIR.format(fold))]
    if devices:
        _train_side_by_side(cv_dir, pending, data_root, device, devices, jobs, echo)
    for fold in pending if not devices else ():
        fold_dir = cv_dir / FOLD_DIR.format(fold)
        echo(f"fold {fold} ({fold + 1} of {folds}): {fold_dir}")
        if (fold_dir / "last.pt").is_file():
            resume(fold_dir, data_root=data_root, device=device, echo=echo)
        else:
            train(load_recipe(fold_dir / "recipe.yaml"), data_root, device=device, echo=echo, run_dir=fold_dir)
    table = gather(cv_dir, data_root, device)
    echo(f"cross-validation of {recipe.name}, {folds} folds: {cv_dir}")
    shown = table.astype(object).where(table.notna(), "")
    echo(shown.to_string(index=False, formatters={c: _percent for c in ("val_acc", "test_acc")}))
    return cv_dir


def fold_finished(fold_dir: Path) -> bool:
    """Whether a fold's run has trained its planned epochs (or stopped early): read from its last.pt."""
    from kit.inference.checkpoint import read_payload
    if not (fold_dir / "last.pt").is_file():
        return False
    payload = read_payload(fold_dir / "last.pt")
    patience = load_recipe(fold_dir / "recipe.yaml").train.early_stopping_patience
    return payload.get("in_epoch", 0) == 0 and (payload["epoch"] >= payload["planned_epochs"]
                                                 or stopped_early(payload["epoch"], payload["best_epoch"], patience))


def _train_side_by_side(cv_dir: Path, pending: list[int], data_root, device: str, devices: tuple[str, ...], jobs: int,
                        echo: Callable[[str], None]) -> None:
    """One process per fold (`kit train --resume FOLD_DIR`), pinned to the devices as --seeds runs are."""
    from kit.training.seeds import Job, kit_command, run_jobs
    runs = [Job(f"fold {fold}", kit_command("train", "--resume", str(cv_dir / FOLD_DIR.format(fold)), "--device", device,
                                            data_root=str(data_root) if data_root else None),
                cv_dir / f"{FOLD_DIR.format(fold)}.log") for fold in pending]
    failed = [job.name for job in run_jobs(runs, devices, jobs, echo) if job.code != 0]
    if failed:
        raise KitError(f"{cv_dir}: {', '.join(failed)} failed (see {cv_dir}/fold-*.log); continue with "
                       f"kit train --resume {cv_dir}")


def gather(cv_dir: Path, data_root: str | Path | None = None, device: str = "auto") -> pd.DataFrame:
    """oof.probs.npz, cv.csv and cv.png from the finished folds; returns the table."""
    from kit.inference.plots import plot_val_curves
    recipe = load_recipe(cv_dir / CV_FILE)
    folds = recipe.data.folds
    runs = [cv_dir / FOLD_DIR.format(fold) for fold in range(folds)]
    val = [read_probs(run / VAL_PROBS, labelled=True) for run in runs]
    metrics = [pd.read_csv(run / "metrics.csv") for run in runs]
    rows = [_fold_row(fold, f, m) for fold, (f, m) in enumerate(zip(val, metrics))]
    has_test = recipe.data.format == "cifar" or bool(recipe.data.test)
    data = load_dataset(dataclasses.replace(recipe.data, validation="none"), data_root, "test" if has_test else "val")
    oof = _out_of_fold(cv_dir, recipe, data.train, val)
    test = _test_scores(runs, data.held_out, device) if has_test else None
    for row, acc in zip(rows, test[0] if test else ()):
        row["test_acc"] = acc
    table = pd.DataFrame(rows, columns=CV_COLUMNS)
    scores = ["val_acc", "val_loss", "test_acc"]
    summary = [{"fold": "mean", **table[scores].mean().to_dict()}, {"fold": "std", **table[scores].std(ddof=1).to_dict()}]
    loss, acc = probs_loss_acc(torch.from_numpy(oof["probs"]), torch.from_numpy(oof["labels"]))
    pooled = {"fold": "out-of-fold", "images": len(oof["ids"]), "val_acc": acc, "val_loss": loss}
    ensemble = [{"fold": f"ensemble of {folds}", "test_acc": test[1]}] if test else []
    table = pd.concat([table, pd.DataFrame(summary + [pooled] + ensemble)], ignore_index=True)[CV_COLUMNS]
    table = table.astype({"images": "Int64", "best_epoch": "Int64"})
    write_probs(cv_dir / OOF_PROBS, oof)
    write_text(cv_dir / CV_TABLE, table.to_csv(index=False))
    plot_val_curves({f"fold {fold}": (m, False) for fold, m in enumerate(metrics)}, cv_dir / CV_PLOT,
                    f"{cv_dir.name}: validation accuracy per fold (mean at the best epochs "
                    f"{table.val_acc[folds]:.2%} ± {table.val_acc[folds + 1]:.2%})")
    return table


def _fold_row(fold: int, val, metrics: pd.DataFrame) -> dict:
    """One fold's figures: the better weights at its best epoch, as its val.probs.npz holds them."""
    from kit.inference.checkpoint import better_weights
    scores, sources = better_weights(metrics.val_acc, metrics.ema_val_acc)
    best = int(np.nanargmax(scores.to_numpy()))
    loss, acc = probs_loss_acc(val.member_probs[0], val.labels)
    return {"fold": str(fold), "images": len(val.labels), "best_epoch": int(metrics.epoch[best]),
            "weights_from": sources[best], "val_acc": acc, "val_loss": loss, "test_acc": math.nan}


def _out_of_fold(cv_dir: Path, recipe: Recipe, train: Labelled, val: list) -> dict:
    """Every image of `train` (the whole training set) with its probabilities from the fold model that held it out,
    in the training set's order: each id exactly once (checked), with its label and fold."""
    position = {str(i): n for n, i in enumerate(train.ids)}
    k = val[0].member_probs.shape[2]
    probs, labels, folds = np.full((len(train), k), np.nan, np.float32), np.full(len(train), -1), np.full(len(train), -1)
    for fold, f in enumerate(val):
        rows = np.array([position.get(str(i), -1) for i in f.ids])
        if (rows < 0).any():
            raise KitError(f"{f.path}: the id {f.ids[np.argmax(rows < 0)]} is not a training image of {recipe.data.root}")
        if (folds[rows] >= 0).any():
            raise KitError(f"{f.path}: the id {f.ids[np.argmax(folds[rows] >= 0)]} was held out by two folds")
        probs[rows], labels[rows], folds[rows] = f.member_probs[0].numpy(), f.labels.numpy(), fold
    if (folds < 0).any():
        raise KitError(f"{cv_dir}: no fold held out the training image {train.ids[np.argmax(folds < 0)]} "
                       f"({int((folds < 0).sum())} images have no out-of-fold prediction)")
    classes = val[0].classes or [str(c) for c in range(k)]
    return probs_arrays(train.ids, probs, classes, [str(cv_dir)], probs[None], labels,
                        source=f"{cv_dir}'s out-of-fold predictions", extra={"folds": folds})


def _test_scores(runs: list[Path], test: Labelled, device: str) -> tuple[list[float], float]:
    """Each fold model's accuracy on the labelled test set (the better weights, no TTA) and their ensemble's."""
    ensemble = load_ensemble([str(r) for r in runs], "better", device, tta="none")
    per_fold = ensemble.probs(test.images)
    return [topk(p, test.labels, 1) for p in per_fold], topk(torch.stack(per_fold).mean(0), test.labels, 1)


def _percent(value) -> str:
    return "" if value == "" or pd.isna(value) else f"{value:.2%}"
