"""`kit report`: per-class precision/recall/F1/support (scikit-learn), confusion matrix (CSV + PNG),
the most-confused class pairs, training curves, and a REPORT.md tying them together, per run."""

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from kit.data.datasets import load_held_out
from kit.device import resolve_device
from kit.inference.checkpoint import Checkpoint, checkpoint_from_payload, checkpoint_weights, read_payload
from kit.inference.ensemble import ensemble_of
from kit.inference.plots import plot_confusion, plot_curves
from kit.inference.scores import topk
from kit.inference.tta import tta_views
from kit.io import write_text


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
    tta_acc: float  # best weights, averaged over the TTA views
    tta: str  # the TTA mode: the given --tta, or the recipe's predict.tta
    predicted: np.ndarray  # with the best weights and TTA


def score_run(path: str, data_root: str | None, held_out: str, tta: str | None, device: str,
              precision: str = "auto") -> tuple[Checkpoint, np.ndarray, RunScores]:
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
    images, labels = data.images.to(device), data.labels.numpy()

    def accuracy(checkpoint: Checkpoint, views: list) -> tuple[float, np.ndarray]:
        probs = checkpoint.probs(images, views, ensemble.batch_size, prec)
        return topk(probs, data.labels, 1), probs.argmax(1).numpy()

    raw_acc = accuracy(raw, tta_views("none"))[0]
    ema_acc = None if ema is None else accuracy(ema, tta_views("none"))[0]
    tta_acc, predicted = accuracy(best, ensemble.views)
    return best, labels, RunScores(raw_acc, ema_acc, tta_acc, tta, predicted)


def report_run(path: str, out_dir: Path, data_root: str | None, held_out: str, tta: str | None, device: str,
               precision: str = "auto") -> Path:
    """Write the per-class tables, confusion matrix, curves and REPORT.md of one run into out_dir."""
    checkpoint, labels, scores = score_run(path, data_root, held_out, tta, device, precision)
    classes = checkpoint.classes
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
    markdown = _markdown(checkpoint, scores, held_out=held_out, n=len(labels), per_class=per_class, pairs=pairs,
                         has_curves=metrics_path.is_file())
    write_text(out_dir / "REPORT.md", markdown)
    return out_dir


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.2%}"


def _markdown(checkpoint: Checkpoint, scores: RunScores, held_out: str, n: int, per_class: pd.DataFrame,
              pairs: pd.DataFrame, has_curves: bool) -> str:
    r = checkpoint.recipe
    lines = [f"# Report: {checkpoint.name}", "",
             f"- recipe: `{r.name}` ({r.description or r.model.name}); source: {r.paper.source or '-'}",
             f"- model: `{r.model.name}`, {checkpoint.num_params:,} parameters",
             f"- scored on: {held_out} set, {n:,} labelled images; best weights: {checkpoint.weights_from}",
             f"- accuracy: raw {_pct(scores.raw_acc)} · EMA {_pct(scores.ema_acc)} · best weights + TTA ({scores.tta}) {_pct(scores.tta_acc)}",
             f"- paper reports: {'-' if r.paper.reported_accuracy is None else f'{r.paper.reported_accuracy:.2f}%'} ({r.paper.metric})",
             "", "## Per class (best weights + TTA)", "", _table(per_class),
             "", "## Most confused pairs", "", _table(pairs) if len(pairs) else "none",
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
           tta: str | None = None, device: str = "auto", precision: str = "auto",
           echo: Callable[[str], None] = print) -> list[Path]:
    """One report folder per checkpoint: RUN/report/ by default, or REPORT_DIR/<run name>/."""
    written = []
    for path in paths:
        base = Path(path) if Path(path).is_dir() else Path(path).parent
        out_dir = Path(report_dir) / base.name if report_dir else base / "report"
        written.append(report_run(path, out_dir, data_root=data_root, held_out=held_out, tta=tta, device=device,
                                  precision=precision))
        echo(f"report: {out_dir / 'REPORT.md'}")
    return written
