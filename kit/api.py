"""kit from Python (a notebook): the command line's verbs as functions that return what they made, on the same code
path as the commands (`kit train` and `kit.train` both call kit.training.run.train; `kit predict` is `kit.predict`).
Errors raise KitError with the one-line message the CLI prints. Overrides are keywords, `section__field=value`
(`kit.train("recipes/demo.yaml", train__epochs=3, optim__lr=0.01)`), checked like `--set section.field=value`."""

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd
import yaml

from kit.errors import KitError
from kit.inference.plots import show
from kit.recipe import LR_FIND_UPDATES, Recipe, check_argument, check_arguments, load_recipe


def overrides_of(overrides: dict) -> tuple[str, ...]:
    """`section__field=value` keywords as `--set section.field=value` strings (the value as YAML)."""
    return tuple(f"{key.replace('__', '.')}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
                 for key, value in overrides.items())


def _recipe(recipe: str | Path | Recipe, overrides: dict) -> Recipe:
    if isinstance(recipe, Recipe):
        return load_recipe_from(recipe, overrides_of(overrides))
    return load_recipe(recipe, overrides_of(overrides))


def load_recipe_from(recipe: Recipe, overrides: tuple[str, ...]) -> Recipe:
    from kit.recipe import recipe_as_dict, recipe_from_dict
    return recipe_from_dict(recipe_as_dict(recipe), recipe.name, overrides) if overrides else recipe


@dataclass(frozen=True)
class Run:
    """A trained run directory: its metrics, recipe and curves."""
    dir: Path

    @property
    def metrics(self) -> pd.DataFrame:
        """One row per epoch (metrics.csv)."""
        return pd.read_csv(self.dir / "metrics.csv")

    @property
    def recipe(self) -> Recipe:
        return load_recipe(self.dir / "recipe.yaml")

    def plot(self) -> Path:
        """The loss, accuracy and LR curves (curves.png), inline in a notebook."""
        return show(self.dir / "curves.png")

    def __str__(self) -> str:
        return str(self.dir)


@dataclass(frozen=True)
class CV:
    """A cross-validation directory (kit train --folds): its table, out-of-fold probabilities, plot and fold runs."""
    dir: Path

    @property
    def table(self) -> pd.DataFrame:
        """Each fold's accuracy and loss (and test accuracy), their mean and std, the pooled out-of-fold figures (cv.csv)."""
        return pd.read_csv(self.dir / "cv.csv", dtype={"fold": str})

    @property
    def oof(self) -> pd.DataFrame:
        """Every training image's out-of-fold probabilities: id, label, fold and one column per class."""
        from kit.inference.probs import read_probs
        probs = read_probs(self.dir / "oof.probs.npz", labelled=True)
        table = pd.DataFrame(probs.member_probs[0].numpy(), columns=probs.classes)
        return pd.concat([pd.DataFrame({"id": probs.ids, "label": probs.labels.numpy(), "fold": probs.folds}), table], axis=1)

    @property
    def folds(self) -> list[Run]:
        from kit.inference.checkpoint import fold_dirs
        return [Run(p) for p in fold_dirs(self.dir)]

    def plot(self) -> Path:
        """Each fold's validation accuracy per epoch (cv.png), inline in a notebook."""
        return show(self.dir / "cv.png")

    def __str__(self) -> str:
        return str(self.dir)


def train(recipe: str | Path | Recipe, data_root: str | Path | None = None, runs: str | Path = "runs", device: str = "auto",
          folds: int | None = None, echo: Callable[[str], None] = print, **overrides) -> Run | CV:
    """kit train: train a recipe into a new run directory under `runs`.

    Args:
        recipe: a recipe file (recipes/demo.yaml) or a Recipe.
        data_root: the data folder (else the recipe's data.root); a recipe without data keys reads them from the
            folder (kit data inspect).
        runs: the folder the run directory is made in.
        device: auto, cpu, cuda or cuda:N.
        folds: k >= 2 for k-fold cross-validation into a CV directory (kit train --folds k).
        echo: where the lines go (print).
        **overrides: recipe keys as `section__field=value` (train__epochs=3, optim__lr=0.01, model__args__width=0.5,
            pseudo__probs="sub.probs.npz" for pseudo-labels), checked like --set.

    Returns:
        Run (its .dir, .metrics, .recipe, .plot()), or with folds a CV (.dir, .table, .oof, .folds, .plot()).
    """
    from kit.training import run
    check_argument("device", device)
    recipe = _recipe(recipe, overrides)
    recipe = _recognized(recipe, data_root, echo)
    if folds is not None:
        from kit.training.cv import train_cv
        check_argument("folds", folds)
        return CV(Path(train_cv(recipe, folds, data_root, runs, device, echo=echo)))
    return Run(Path(run.train(recipe, data_root, runs, device, echo=echo)))


def _recognized(recipe: Recipe, data_root, echo: Callable[[str], None]) -> Recipe:
    """The recipe with the data keys its folder says, when it sets none (as kit train does)."""
    import dataclasses

    from kit.data.inspect import recognized
    spec, found = recognized(recipe.data, data_root)
    if found is None:
        return recipe
    echo(found.describe())
    return load_recipe_from(dataclasses.replace(recipe, data=spec), ())


def predict(checkpoints: list[str | Path] | str | Path, test, out: str | Path | None = None,
            echo: Callable[[str], None] = print, **options):
    """kit predict: the checkpoints' ensemble (with TTA and blend) on a test set, or on images in memory.

    Args:
        checkpoints: run directories, checkpoint files, a CV directory (its k fold models), a sweep folder; or a list.
        test: a test file (the competition's pickle, a folder of images, a pixels CSV, an .npz): the submission CSV and
            its .probs.npz are written; or images in memory: a numpy array or torch tensor of uint8 pixels (N, H, W, C)
            or (N, C, H, W), one image (H, W, C) or (C, H, W), a PIL image or a list of them, an image file or a list
            of image paths: nothing is written.
        out: the submission CSV (a test file only; default submissions/<recipe>.csv or submissions/ensemble.csv).
        **options: tta, blend, weights_from, batch_size, device, adapt_bn, adapt_prior, precision; for a test file also
            template and fmt (kit.inference.submission.SubmissionFormat).

    Returns:
        For a test file, the submission as written (a DataFrame, every cell as text). For images, a DataFrame with the
        predicted class (`label`) and one probability column per class, a row per image; for one image, a tuple
        (its class, its probabilities as a Series).
    """
    from kit.data.datasets import images_given_in_memory
    from kit.inference.predict import predict as run_predict
    from kit.inference.predict import predict_images
    check_arguments(options)
    paths = [str(c) for c in _listed(checkpoints)]
    if images_given_in_memory(test):
        unused = sorted(k for k in ("template", "fmt") if options.get(k) is not None) + (["out"] if out is not None else [])
        if unused:
            raise KitError(f"{', '.join(unused)}: a submission file is written for a test file, not for images in memory")
        return predict_images(paths, test, **options)
    path = run_predict(paths, str(test), out=None if out is None else str(out), echo=echo, **options)
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def evaluate(checkpoints: list[str | Path] | str | Path, images=None, labels=None, echo: Callable[[str], None] = print,
             **options) -> pd.DataFrame:
    """kit evaluate: top-1 (and top-5 for more than 10 classes) of each checkpoint and of their ensemble, with and
    without TTA.

    Args:
        checkpoints: as for predict; or labelled probability files (.npz, such as a CV directory's oof.probs.npz).
        images, labels: images in memory (as predict takes them) with a class name or index each, instead of the
            checkpoints' held-out images.
        **options: held_out (val or test), data_root, tta, select, rounds, select_on, select_out, csv_out, probs_out,
            weights_from, batch_size, device, adapt_bn, adapt_prior, precision.

    Returns:
        The accuracy table, a row per checkpoint and for the ensemble (DataFrame).
    """
    from kit.inference.evaluate import evaluate as run_evaluate
    check_arguments(options)
    return run_evaluate([str(c) for c in _listed(checkpoints)], images=images, labels=labels, echo=echo, **options)


def interpret(checkpoints: list[str | Path] | str | Path, held_out: str = "val", images=None, labels=None, **options):
    """What the checkpoints (their ensemble when several) get wrong, as fastai's ClassificationInterpretation.

    Args:
        checkpoints: as for predict.
        held_out: val (each run's validation images) or test (the labelled test set).
        images, labels: images in memory with their labels instead.
        **options: data_root, tta, weights_from, device, precision, batch_size.

    Returns:
        Interpretation: top_losses(k) and most_confused(min_count) as DataFrames; plot_top_losses(k),
        plot_confusion(), plot_confused_examples() and plot_disagreement(test) as figures (shown inline when a notebook
        cell returns one; give path= to write a PNG).
    """
    from kit.inference.interpret import interpret as run_interpret
    check_arguments({"held_out": held_out, **options})
    return run_interpret([str(c) for c in _listed(checkpoints)], held_out, images=images, labels=labels, **options)


def report(checkpoints: list[str | Path] | str | Path, echo: Callable[[str], None] = print, **options) -> list[Path]:
    """kit report: per-class precision, recall and F1, the confusion matrix, the most-confused pairs and the worst
    mistakes as pictures, curves and REPORT.md, per checkpoint (a CV directory: per fold).

    Args:
        checkpoints: as for predict.
        **options: data_root, report_dir, held_out, tta, device, precision, mistakes, test (an unlabelled set: where
            the ensemble's members disagree).

    Returns:
        The report folders written (the first run's worst mistakes display inline in a notebook).
    """
    from kit.inference.report import report as run_report
    check_arguments(options)
    written = run_report([str(c) for c in _listed(checkpoints)], echo=echo, **options)
    if (written[0] / "worst_mistakes.png").is_file():
        show(written[0] / "worst_mistakes.png")
    return written


def blend(labelled: list[str | Path], unlabelled: list[str | Path], out: str | Path, echo: Callable[[str], None] = print,
          **options) -> pd.DataFrame:
    """kit blend: an ensemble from saved probabilities: the blend chosen (or, with stacker="logistic", a stacker fitted)
    on the labelled files, the submission written from the unlabelled ones.

    Args:
        labelled: probability files on labelled images (kit evaluate --probs-out, a CV directory's oof.probs.npz).
        unlabelled: the same models' probability files on the test set (kit predict's SUBMISSION.probs.npz).
        out: the submission CSV (its .probs.npz goes beside it).
        **options: rounds, select_on, template, fmt, given_classes, stacker.

    Returns:
        The submission as written (a DataFrame, every cell as text).
    """
    from kit.inference.blend import blend as run_blend
    check_arguments(options)
    path = run_blend([str(p) for p in labelled], [str(p) for p in unlabelled], str(out), echo=echo, **options)
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def lr_find(recipe: str | Path | Recipe, data_root: str | Path | None = None, device: str = "auto",
            updates: int = LR_FIND_UPDATES, start_lr: float = 1e-7, end_lr: float = 10.0, diverge: float = 4.0,
            echo: Callable[[str], None] = print, **overrides):
    """kit lr-find: an LR range test run by the recipe's own update, with a bar (or a line each tenth) while it runs.

    Args:
        recipe, data_root, device, **overrides: as for train.
        updates: how many updates the LR rises over; start_lr, end_lr: its range; diverge: the sweep stops when the
            running loss passes this many times its lowest.

    Returns:
        LRFind: its repr is the suggestion; .minimum, .steep, .suggestion(rule), .describe(); .lrs, .losses,
        .smoothed (arrays); .plot(path=None) draws it (inline in a notebook).
    """
    from kit.training.lr_find import lr_find as run_lr_find
    check_arguments({"device": device, "updates": updates, "start_lr": start_lr, "end_lr": end_lr, "diverge": diverge})
    return run_lr_find(_recipe(recipe, overrides), data_root, device, start_lr, end_lr, updates, diverge, echo=echo)


def runs(runs_dir: str | Path = "runs") -> pd.DataFrame:
    """kit runs: every run below `runs_dir` (a CV's folds, a sweep's trials included), best first.

    Returns:
        A DataFrame: run, recipe, what differs from the recipe file, parameters, epochs, the best validation accuracy
        (its epoch and raw/EMA weights), the last epoch's raw and EMA validation accuracy, minutes, precision, device.
    """
    from kit.training.runs import runs_table
    return runs_table(runs_dir)


def _listed(checkpoints) -> list:
    return list(checkpoints) if isinstance(checkpoints, (list, tuple)) else [checkpoints]
