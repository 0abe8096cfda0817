"""kit from Python (a notebook): the command line's verbs as functions that return what they made, on the same code
path as the commands (`kit train` and `kit.train` both call kit.training.run.train; `kit predict` is `kit.predict`).
Errors raise KitError with the one-line message the CLI prints. Overrides are keywords, `section__field=value`
(`kit.train("recipes/demo.yaml", train__epochs=3, optim__lr=0.01)`), checked like `--set section.field=value`."""

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd
import yaml

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
        return [Run(p) for p in sorted(self.dir.glob("fold-*"), key=lambda p: int(p.name.split("-")[1])) if p.is_dir()]

    def plot(self) -> Path:
        """Each fold's validation accuracy per epoch (cv.png), inline in a notebook."""
        return show(self.dir / "cv.png")

    def __str__(self) -> str:
        return str(self.dir)


def train(recipe: str | Path | Recipe, data_root: str | Path | None = None, runs: str | Path = "runs", device: str = "auto",
          folds: int | None = None, echo: Callable[[str], None] = print, **overrides) -> Run | CV:
    """kit train: a new run directory under `runs`; with `folds` (k >= 2), k-fold cross-validation into a CV directory
    (kit train --folds k). Pseudo-labels are recipe keys: pseudo__probs="sub.probs.npz", pseudo__threshold, pseudo__soft."""
    from kit.training import run
    check_argument("device", device)
    if folds is not None:
        from kit.training.cv import train_cv
        check_argument("folds", folds)
        return CV(Path(train_cv(_recipe(recipe, overrides), folds, data_root, runs, device, echo=echo)))
    return Run(Path(run.train(_recipe(recipe, overrides), data_root, runs, device, echo=echo)))


def predict(checkpoints: list[str | Path] | str | Path, test: str | Path, out: str | Path | None = None,
            echo: Callable[[str], None] = print, **options) -> pd.DataFrame:
    """kit predict: writes the submission (and its .probs.npz) and returns it as written (every cell as text).
    `options`: tta, blend, weights_from, template, batch_size, device, adapt_bn, adapt_prior, precision, fmt."""
    from kit.inference.predict import predict as run_predict
    check_arguments(options)
    path = run_predict([str(c) for c in _listed(checkpoints)], str(test), out=None if out is None else str(out), echo=echo,
                       **options)
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def evaluate(checkpoints: list[str | Path] | str | Path, echo: Callable[[str], None] = print, **options) -> pd.DataFrame:
    """kit evaluate: top-1 (and top-5) of each checkpoint and the ensemble, as a DataFrame."""
    from kit.inference.evaluate import evaluate as run_evaluate
    check_arguments(options)
    return run_evaluate([str(c) for c in _listed(checkpoints)], echo=echo, **options)


def report(checkpoints: list[str | Path] | str | Path, echo: Callable[[str], None] = print, **options) -> list[Path]:
    """kit report: the report folders written (REPORT.md, tables, the mistakes as pictures); the first run's worst
    mistakes display inline in a notebook."""
    from kit.inference.report import report as run_report
    check_arguments(options)
    written = run_report([str(c) for c in _listed(checkpoints)], echo=echo, **options)
    if (written[0] / "worst_mistakes.png").is_file():
        show(written[0] / "worst_mistakes.png")
    return written


def blend(labelled: list[str | Path], unlabelled: list[str | Path], out: str | Path, echo: Callable[[str], None] = print,
          **options) -> pd.DataFrame:
    """kit blend: writes the blended submission and returns it as written."""
    from kit.inference.blend import blend as run_blend
    check_arguments(options)
    path = run_blend([str(p) for p in labelled], [str(p) for p in unlabelled], str(out), echo=echo, **options)
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def lr_find(recipe: str | Path | Recipe, data_root: str | Path | None = None, device: str = "auto",
            updates: int = LR_FIND_UPDATES, start_lr: float = 1e-7, end_lr: float = 10.0, diverge: float = 4.0,
            echo: Callable[[str], None] = print, **overrides):
    """kit lr-find: the sweep (LRFind: lrs, losses, smoothed, minimum, steep; .plot() draws it, inline in a notebook)."""
    from kit.training.lr_find import lr_find as run_lr_find
    check_arguments({"device": device, "updates": updates, "start_lr": start_lr, "end_lr": end_lr, "diverge": diverge})
    return run_lr_find(_recipe(recipe, overrides), data_root, device, start_lr, end_lr, updates, diverge, echo=echo)


def _listed(checkpoints) -> list:
    return list(checkpoints) if isinstance(checkpoints, (list, tuple)) else [checkpoints]
