"""`kit report`: per-class precision/recall/F1/support (scikit-learn), confusion matrix (CSV + PNG),
the most-confused class pairs, training curves, and a REPORT.md tying them together, per run."""

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from kit.data.datasets import Labelled, load_held_out, read_test_set
from kit.device import resolve_device
from kit.errors import KitError
from kit.inference.checkpoint import Checkpoint, checkpoint_from_payload, checkpoint_weights, read_payload
from kit.inference.ensemble import ensemble_of, expand_paths, load_ensemble
from kit.inference.plots import plot_confusion, plot_curves, plot_image_grid
from kit.inference.scores import topk
from kit.inference.tta import tta_views
from kit.io import write_text
from kit.recipe import REPORT_MISTAKES

PAIRS, PAIR_EXAMPLES = 5, 6  # the most-confused pairs shown, and examples of each


def per_class_table(labels: np.ndarray, predicted: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """precision, recall, f1, support per class (scikit-learn), plus macro and weighted averages."""
    index = list(range(len(classes)))
    p, r, f, s = precision_recall_fscore_support(labels, predicted, labels=index, zero_division=0)
    table = pd.DataFrame({"class": classes, "precision": p, "recall": r, "f1": f, "support": s})
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(labels, predicted, labels=index, average=average, zero_division=0)
        table.loc[len(table)] = [f"{average} avg", p, r, f, int(s.sum())]
    return table


def confused_pairs(matrix: np.ndarray, classes: list[str], top: int = 10) -> pd.DataFrame:
    """The largest off-diagonal cells: (true, predicted, count, share of the true class)."""
    rows = [(classes[i], classes[j], int(matrix[i, j]), matrix[i, j] / max(matrix[i].sum(), 1))
            for i in range(len(classes)) for j in range(len(classes)) if i != j and matrix[i, j] > 0]
    table = pd.DataFrame(rows, columns=["true", "predicted", "count", "share_of_true"])
    return table.sort_values("count", ascending=False, kind="stable").head(top).reset_index(drop=True)


@dataclass
class RunScores:
    raw_acc: float
    ema_acc: float | None
    tta_acc: float  # the better weights, averaged over the TTA views
    tta: str  # the TTA mode: the given --tta, or the recipe's predict.tta
    probs: np.ndarray  # (N, K) with the better weights and TTA

    @property
    def predicted(self) -> np.ndarray:
        return self.probs.argmax(1)


def score_run(path: str, data_root: str | None, held_out: str, tta: str | None, device: str,
              precision: str = "auto") -> tuple[Checkpoint, Labelled, RunScores]:
    """Accuracy of raw, EMA and the better of the two with TTA (default: the recipe's views) on the run's held-out data;
    the checkpoint is read once."""
    payload, dev = read_payload(path), resolve_device(device)
    raw = checkpoint_from_payload(payload, path, "raw", dev)
    ema = checkpoint_from_payload(payload, path, "ema", dev) if payload.get("ema") is not None else None
    best = ema if ema is not None and checkpoint_weights(payload, "better") == "ema" else raw
    ensemble = ensemble_of([path], [best], dev, tta, precision=precision)
    tta, prec = ensemble.tta, ensemble.prec
    device = prec.device
    data = load_held_out(best.recipe.data, data_root, held_out, best.path)
    images = data.images.to(device)

    def accuracy(checkpoint: Checkpoint, views: list) -> tuple[float, np.ndarray]:
        probs = checkpoint.probs(images, views, ensemble.batch_size, prec)
        return topk(probs, data.labels, 1), probs.numpy()

    raw_acc = accuracy(raw, tta_views("none"))[0]
    ema_acc = None if ema is None else accuracy(ema, tta_views("none"))[0]
    tta_acc, probs = accuracy(best, ensemble.views)
    return best, data, RunScores(raw_acc, ema_acc, tta_acc, tta, probs)


def report_run(path: str, out_dir: Path, data_root: str | None, held_out: str, tta: str | None, device: str,
               precision: str = "auto", mistakes: int = REPORT_MISTAKES) -> Path:
    """Write the per-class tables, confusion matrix, curves and REPORT.md of one run into out_dir."""
    checkpoint, data, scores = score_run(path, data_root, held_out, tta, device, precision)
    classes, labels = checkpoint.classes, data.labels.numpy()
    matrix = confusion_matrix(labels, scores.predicted, labels=list(range(len(classes))))
    per_class = per_class_table(labels, scores.predicted, classes)
    pairs = confused_pairs(matrix, classes)
    write_text(out_dir / "per_class.csv", per_class.to_csv(index=False))
    write_text(out_dir / "confusion.csv", pd.DataFrame(matrix, index=classes, columns=classes).to_csv())
    write_text(out_dir / "confused_pairs.csv", pairs.to_csv(index=False))
    plot_confusion(matrix, classes, out_dir / "confusion.png", f"{checkpoint.name} ({held_out}, tta {scores.tta})")
    metrics_path = Path(checkpoint.path).parent / "metrics.csv"
    if metrics_path.is_file():
        plot_curves(pd.read_csv(metrics_path), out_dir / "curves.png", checkpoint.recipe.name)
    pictures = mistake_pictures(data, scores.probs, classes, pairs, out_dir, mistakes)
    markdown = _markdown(checkpoint, scores, held_out=held_out, n=len(labels), per_class=per_class, pairs=pairs,
                         has_curves=metrics_path.is_file(), pictures=pictures)
    write_text(out_dir / "REPORT.md", markdown)
    return out_dir


def worst_mistakes(probs: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n misclassified images with the highest loss (-log of the true class's probability), worst first."""
    loss = -np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None))
    wrong = np.flatnonzero(probs.argmax(1) != labels)
    return wrong[np.argsort(-loss[wrong], kind="stable")][:n]


def pair_examples(probs: np.ndarray, labels: np.ndarray, true: int, predicted: int, n: int) -> np.ndarray:
    """Up to n images of class `true` predicted as `predicted`, the most confident mistakes first."""
    chosen = np.flatnonzero((labels == true) & (probs.argmax(1) == predicted))
    return chosen[np.argsort(-probs[chosen, predicted], kind="stable")][:n]


def mistake_pictures(data: Labelled, probs: np.ndarray, classes: list[str], pairs: pd.DataFrame, out_dir: Path,
                     n: int = REPORT_MISTAKES) -> dict[str, str]:
    """The worst mistakes and the most-confused pairs' examples as PNG grids of the images as read (uint8, at the data's
    size and channels); returns {section: file name} of those written (none when nothing is misclassified)."""
    labels, images = data.labels.numpy(), data.images.cpu().numpy()
    written = {}
    worst = worst_mistakes(probs, labels, n)
    if len(worst):
        captions = [f"{classes[labels[i]]} -> {classes[probs[i].argmax()]}\np(true) {probs[i, labels[i]]:.2f}, "
                    f"p(pred) {probs[i].max():.2f}" for i in worst]
        plot_image_grid([images[i] for i in worst], captions, out_dir / "worst_mistakes.png",
                        f"The {len(worst)} held-out images with the highest loss (true -> predicted)")
        written["worst"] = "worst_mistakes.png"
    index = {name: k for k, name in enumerate(classes)}
    cells, captions = [], []
    for pair in pairs.head(PAIRS).itertuples():
        chosen = pair_examples(probs, labels, index[pair.true], index[pair.predicted], PAIR_EXAMPLES)
        cells += [images[i] for i in chosen] + [None] * (PAIR_EXAMPLES - len(chosen))
        captions += [f"{pair.true} -> {pair.predicted}\np {probs[i, index[pair.predicted]]:.2f}" for i in chosen]
        captions += [""] * (PAIR_EXAMPLES - len(chosen))
    if cells:
        plot_image_grid(cells, captions, out_dir / "confused_examples.png",
                        "The most-confused pairs, a row each (true -> predicted)", columns=PAIR_EXAMPLES)
        written["pairs"] = "confused_examples.png"
    return written


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.2%}"


def _markdown(checkpoint: Checkpoint, scores: RunScores, held_out: str, n: int, per_class: pd.DataFrame,
              pairs: pd.DataFrame, has_curves: bool, pictures: dict[str, str]) -> str:
    r = checkpoint.recipe
    lines = [f"# Report: {checkpoint.name}", "",
             f"- recipe: `{r.name}` ({r.description or r.model.name}); source: {r.paper.source or '-'}",
             f"- model: `{r.model.name}`, {checkpoint.num_params:,} parameters",
             f"- scored on: {held_out} set, {n:,} labelled images; better weights: {checkpoint.weights_from}",
             f"- accuracy: raw {_pct(scores.raw_acc)} · EMA {_pct(scores.ema_acc)} · better weights + TTA ({scores.tta}) {_pct(scores.tta_acc)}",
             f"- paper reports: {'-' if r.paper.reported_accuracy is None else f'{r.paper.reported_accuracy:.2f}%'} ({r.paper.metric})",
             "", "## Per class (better weights + TTA)", "", _table(per_class),
             "", "## Most confused pairs", "", _table(pairs) if len(pairs) else "none",
             *(["", f"![examples of the most-confused pairs]({pictures['pairs']})"] if "pairs" in pictures else []),
             "", "## The worst mistakes", "",
             f"![the worst mistakes]({pictures['worst']})" if "worst" in pictures else "none: every image is right",
             "", "## Confusion matrix", "", "![confusion](confusion.png) · [confusion.csv](confusion.csv)"]
    if has_curves:
        lines += ["", "## Training curves", "", "![curves](curves.png)"]
    return "\n".join(lines) + "\n"


def _table(frame: pd.DataFrame) -> str:
    """A GitHub markdown table (floats to 4 places)."""
    cells = frame.map(lambda v: f"{v:.4f}" if isinstance(v, float) else str(v))
    head = "| " + " | ".join(frame.columns) + " |"
    rule = "|" + "---|" * len(frame.columns)
    return "\n".join([head, rule] + ["| " + " | ".join(row) + " |" for row in cells.values.tolist()])


def report(paths: list[str], data_root: str | None = None, report_dir: str | None = None, held_out: str = "val",
           tta: str | None = None, device: str = "auto", precision: str = "auto", mistakes: int = REPORT_MISTAKES,
           test: str | None = None, echo: Callable[[str], None] = print) -> list[Path]:
    """One report folder per checkpoint: RUN/report/ by default, or REPORT_DIR/<run name>/. With `test` (an unlabelled
    set) and several checkpoints, also the images the ensemble's members disagree on most, in REPORT_DIR/ensemble/
    (default reports/ensemble/). A CV directory stands for its fold runs (each reported on its own fold)."""
    paths = expand_paths(paths)
    if test is not None and len(paths) < 2:
        raise KitError(f"--test {test}: the members' disagreement needs an ensemble: give two or more checkpoints")
    written = []
    for path in paths:
        base = Path(path) if Path(path).is_dir() else Path(path).parent
        out_dir = Path(report_dir) / base.name if report_dir else base / "report"
        written.append(report_run(path, out_dir, data_root=data_root, held_out=held_out, tta=tta, device=device,
                                  precision=precision, mistakes=mistakes))
        echo(f"report: {out_dir / 'REPORT.md'}")
    if test is not None:
        out_dir = Path(report_dir or "reports") / "ensemble"
        table = disagreement(paths, test, out_dir, mistakes, tta=tta, device=device, precision=precision)
        echo(f"disagreement: {out_dir / 'disagreement.png'} ({(table.agreement < 1).sum():,} of {len(table):,} test images "
             f"without a unanimous vote)")
        written.append(out_dir)
    return written


def disagreement_order(member: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For the members' (M, N, K) probabilities: the images least agreed on first (the share of members voting for the
    ensemble's class), ties broken by the larger spread (mean total variation around the members' mean); and both."""
    agreement = (member.argmax(2) == member.mean(0).argmax(1)).mean(0)
    spread = 0.5 * np.abs(member - member.mean(0)).sum(2).mean(0)
    return np.lexsort((-spread, agreement)), agreement, spread


def disagreement(paths: list[str], test_path: str, out_dir: Path, n: int = REPORT_MISTAKES, tta: str | None = None,
                 device: str = "auto", precision: str = "auto") -> pd.DataFrame:
    """Where an ensemble's submission is a guess, without labels: every unlabelled image with the share of members voting
    for the ensemble's class (`agreement`) and how far the members' probabilities spread around their mean (mean total
    variation), least agreement first (disagreement.csv); the first n as a grid of the images as read."""
    ensemble = load_ensemble(paths, "better", device, tta, precision=precision)
    names = ensemble.checkpoints[0].classes
    test = read_test_set(test_path, ensemble.checkpoints[0].recipe.data)
    member = np.stack([p.numpy() for p in ensemble.probs(test.images)])  # (M, N, K)
    blended, votes = member.mean(0).argmax(1), member.argmax(2)  # (N,), (M, N)
    order, agreement, spread = disagreement_order(member)
    table = pd.DataFrame({"id": test.ids[order], "ensemble": [names[k] for k in blended[order]],
                          "agreement": agreement[order], "spread": spread[order],
                          **{f"member_{m}": [names[k] for k in votes[m, order]] for m in range(len(member))}})
    write_text(out_dir / "disagreement.csv", table.to_csv(index=False))
    shown = order[:n]
    captions = [f"id {test.ids[i]}: {names[blended[i]]}\nvotes " + "/".join(names[k] for k in votes[:, i]) for i in shown]
    plot_image_grid([test.images[i].numpy() for i in shown], captions, out_dir / "disagreement.png",
                    f"The {len(shown)} test images the {len(member)} members disagree on most (ensemble's class, each vote)")
    return table
