"""`kit.interpret`: what a model (or an ensemble) gets wrong on labelled images, as an object to ask (fastai's
`ClassificationInterpretation`): `top_losses(k)` and `most_confused(min_count)` as DataFrames, and `plot_top_losses`,
`plot_confused_examples`, `plot_confusion` and `plot_disagreement` as figures (shown inline when a notebook cell
returns one). `kit report` writes its pictures through it: one path for the files and the notebook."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import confusion_matrix

from kit.data.datasets import Labelled, read_test_set
from kit.errors import KitError
from kit.inference.ensemble import Ensemble
from kit.inference.plots import plot_confusion, plot_image_grid
from kit.recipe import REPORT_MISTAKES

PAIRS, PAIR_EXAMPLES = 5, 6  # the most-confused pairs shown, and examples of each


@dataclass
class Interpretation:
    """Labelled images with the probabilities a model (or ensemble) gives them."""
    name: str  # what is interpreted: a checkpoint's name, or "ensemble of N"
    data: Labelled  # the scored images, as read (uint8), with labels and ids
    probs: np.ndarray  # (N, K)
    classes: list[str]
    ensemble: Ensemble | None = None  # the models behind `probs` (for plot_disagreement)
    held_out: str = "val"

    @property
    def labels(self) -> np.ndarray:
        return self.data.labels.numpy()

    @property
    def predicted(self) -> np.ndarray:
        return self.probs.argmax(1)

    @property
    def losses(self) -> np.ndarray:
        """(N,) each image's loss: -log of its true class's probability."""
        return -np.log(np.clip(self.probs[np.arange(len(self.labels)), self.labels], 1e-12, None))

    def __repr__(self) -> str:
        wrong = int((self.predicted != self.labels).sum())
        return (f"Interpretation({self.name}: {len(self.labels):,} {self.held_out} images, {wrong:,} wrong; "
                f"top_losses(k), most_confused(), plot_top_losses(k), plot_confusion())")

    def confusion(self) -> np.ndarray:
        return confusion_matrix(self.labels, self.predicted, labels=list(range(len(self.classes))))

    def top_losses(self, k: int | None = None, mistakes_only: bool = False) -> pd.DataFrame:
        """The k images with the highest loss, highest first (all of them when k is None): id, true and predicted
        class, their probabilities, the loss."""
        order = np.argsort(-self.losses, kind="stable")
        if mistakes_only:
            order = order[self.predicted[order] != self.labels[order]]
        rows = order[:k]
        return pd.DataFrame({"id": self.data.ids[rows], "true": [self.classes[c] for c in self.labels[rows]],
                             "predicted": [self.classes[c] for c in self.predicted[rows]],
                             "p_true": self.probs[rows, self.labels[rows]], "p_predicted": self.probs[rows].max(1),
                             "loss": self.losses[rows]}, index=pd.Index(rows, name="image"))

    def most_confused(self, min_count: int = 1) -> pd.DataFrame:
        """Pairs (true, predicted) of different classes with at least min_count images, the most frequent first, with
        the share of the true class they are."""
        matrix = self.confusion()
        rows = [(self.classes[i], self.classes[j], int(matrix[i, j]), matrix[i, j] / max(matrix[i].sum(), 1))
                for i in range(len(self.classes)) for j in range(len(self.classes))
                if i != j and matrix[i, j] >= max(min_count, 1)]
        table = pd.DataFrame(rows, columns=["true", "predicted", "count", "share_of_true"])
        return table.sort_values("count", ascending=False, kind="stable").reset_index(drop=True)

    def plot_top_losses(self, k: int = REPORT_MISTAKES, path: Path | None = None):
        """The k misclassified images with the highest loss, as read, with the true and predicted class (None: no
        mistake)."""
        worst = self.top_losses(k, mistakes_only=True)
        if worst.empty:
            return None
        images = self.data.images.cpu().numpy()
        captions = [f"{r.true} -> {r.predicted}\np(true) {r.p_true:.2f}, p(pred) {r.p_predicted:.2f}" for r in worst.itertuples()]
        return plot_image_grid([images[i] for i in worst.index], captions, path,
                               f"{self.name}: the {len(worst)} {self.held_out} images with the highest loss (true -> predicted)")

    def plot_confused_examples(self, pairs: int = PAIRS, examples: int = PAIR_EXAMPLES, path: Path | None = None):
        """A row per most-confused pair: its most confident mistakes (None: no mistake)."""
        images, index = self.data.images.cpu().numpy(), {name: k for k, name in enumerate(self.classes)}
        cells, captions = [], []
        for pair in self.most_confused().head(pairs).itertuples():
            true, predicted = index[pair.true], index[pair.predicted]
            chosen = np.flatnonzero((self.labels == true) & (self.predicted == predicted))
            chosen = chosen[np.argsort(-self.probs[chosen, predicted], kind="stable")][:examples]
            cells += [images[i] for i in chosen] + [None] * (examples - len(chosen))
            captions += [f"{pair.true} -> {pair.predicted}\np {self.probs[i, predicted]:.2f}" for i in chosen]
            captions += [""] * (examples - len(chosen))
        if not cells:
            return None
        return plot_image_grid(cells, captions, path, "The most-confused pairs, a row each (true -> predicted)",
                               columns=examples)

    def plot_confusion(self, path: Path | None = None, title: str | None = None):
        return plot_confusion(self.confusion(), self.classes, path, title or f"{self.name} ({self.held_out})")

    def plot_disagreement(self, test: str | Path, n: int = REPORT_MISTAKES, path: Path | None = None):
        """The unlabelled images the ensemble's members disagree on most (least agreement first; only images without
        a unanimous vote), with the ensemble's class and each member's vote; None when every vote is unanimous."""
        return disagreement(self._members(), test, n, path)[1]

    def disagreement(self, test: str | Path) -> pd.DataFrame:
        """Every unlabelled image with the share of members voting for the ensemble's class (`agreement`), the spread
        of their probabilities and each member's vote, least agreement first."""
        return disagreement(self._members(), test, 0, None)[0]

    def _members(self) -> Ensemble:
        if self.ensemble is None or len(self.ensemble.checkpoints) < 2:
            raise KitError(f"{self.name}: the members' disagreement needs an ensemble: give two or more checkpoints")
        return self.ensemble


def disagreement_order(member: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For the members' (M, N, K) probabilities: the images least agreed on first (the share of members voting for the
    ensemble's class), ties broken by the larger spread (mean total variation around the members' mean); and both."""
    agreement = (member.argmax(2) == member.mean(0).argmax(1)).mean(0)
    spread = 0.5 * np.abs(member - member.mean(0)).sum(2).mean(0)
    return np.lexsort((-spread, agreement)), agreement, spread


def disagreement(ensemble: Ensemble, test_path: str | Path, n: int, path: Path | None) -> tuple[pd.DataFrame, object]:
    """(the table of every unlabelled image, least agreement first; the picture of the first n without a unanimous
    vote, or None)."""
    names = ensemble.checkpoints[0].classes
    test = read_test_set(test_path, ensemble.checkpoints[0].recipe.data)
    member = np.stack([p.numpy() for p in ensemble.probs(test.images)])  # (M, N, K)
    blended, votes = member.mean(0).argmax(1), member.argmax(2)  # (N,), (M, N)
    order, agreement, spread = disagreement_order(member)
    table = pd.DataFrame({"id": test.ids[order], "ensemble": [names[k] for k in blended[order]],
                          "agreement": agreement[order], "spread": spread[order],
                          **{f"member_{m}": [names[k] for k in votes[m, order]] for m in range(len(member))}})
    shown = order[agreement[order] < 1][:n]
    if not len(shown):
        return table, None
    captions = [f"id {test.ids[i]}: {names[blended[i]]}\nvotes " + ", ".join(names[k] for k in votes[:, i]) for i in shown]
    figure = plot_image_grid([test.images[i].numpy() for i in shown], captions, path,
                             f"The {len(shown)} test images the {len(member)} members disagree on most, of "
                             f"{int((agreement < 1).sum())} without a unanimous vote (ensemble's class, each vote)")
    return table, figure


def interpret(paths: list[str], held_out: str = "val", data_root: str | None = None, tta: str | None = None,
              weights_from: str = "better", device: str = "auto", precision: str = "auto", batch_size: int | None = None,
              images=None, labels=None) -> Interpretation:
    """The checkpoints (an ensemble when several: their blend of probabilities, with TTA) on their held-out images, or
    on `images` with `labels` given in memory."""
    from kit.inference.ensemble import ensemble_probs, load_ensemble
    from kit.inference.evaluate import given_labelled, scored_images
    ensemble = load_ensemble(paths, weights_from, device, tta, precision=precision, batch_size=batch_size)
    checkpoints = ensemble.checkpoints
    data = scored_images(checkpoints, data_root, held_out) if images is None else given_labelled(images, labels, checkpoints[0])
    probs = ensemble_probs(ensemble.probs(data.images), ensemble.blend).numpy()
    name = checkpoints[0].name if len(checkpoints) == 1 else f"ensemble of {len(checkpoints)}"
    return Interpretation(name, data.to(torch.device("cpu")), probs, checkpoints[0].classes, ensemble,
                          held_out if images is None else "given")
