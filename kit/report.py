"""`kit report`: per-class precision/recall/F1/support (scikit-learn), confusion matrix (CSV + PNG),
the most-confused class pairs, training curves, and a REPORT.md tying them together, per run."""

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from kit.checkpoint import load_checkpoint
from kit.data import load_dataset
from kit.engine import Precision
from kit.io import write_text
from kit.members import member_from_checkpoint
from kit.plots import plot_confusion, plot_curves
from kit.session import resolve_device
from kit.tta import tta_views


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
    raw: float
    ema: float | None
    tta: float
    tta_name: str  # the views used: the given --tta, or the recipe's predict.tta
    predicted: np.ndarray  # with the best weights and TTA


def score_run(path: str, data_root: str | None, split: str, tta: str | None, device: torch.device):
    """Accuracy of raw, EMA and best-weights-with-TTA (default: the recipe's views) on the run's held-out data."""
    ckpt = load_checkpoint(path)
    best = member_from_checkpoint(ckpt, path, "best", device)
    tta = tta or best.recipe.predict.tta
    data = load_dataset(best.recipe.data, data_root, split).val
    prec = Precision(device, torch.bfloat16 if device.type == "cuda" else None)
    labels = data.labels.numpy()

    def accuracy(member, views) -> tuple[float, np.ndarray]:
        predicted = member.probs(data.images, views, best.recipe.predict.batch_size, prec).argmax(1).numpy()
        return float((predicted == labels).mean()), predicted

    raw = accuracy(member_from_checkpoint(ckpt, path, "raw", device), tta_views("none"))[0]
    ema = None
    if ckpt.get("ema") is not None:
        ema = accuracy(member_from_checkpoint(ckpt, path, "ema", device), tta_views("none"))[0]
    tta_acc, predicted = accuracy(best, tta_views(tta))
    return best, labels, RunScores(raw, ema, tta_acc, tta, predicted)


def report_run(path: str, out_dir: Path, data_root: str | None, split: str, tta: str | None, device: torch.device) -> Path:
    """Write the per-class tables, confusion matrix, curves and REPORT.md of one run into out_dir."""
    member, labels, scores = score_run(path, data_root, split, tta, device)
    tta = scores.tta_name
    classes = member.classes
    matrix = confusion_matrix(labels, scores.predicted, labels=list(range(len(classes))))
    per_class = per_class_table(labels, scores.predicted, classes)
    pairs = confused_pairs(matrix, classes)
    write_text(out_dir / "per_class.csv", per_class.to_csv(index=False))
    write_text(out_dir / "confusion.csv", pd.DataFrame(matrix, index=classes, columns=classes).to_csv())
    write_text(out_dir / "confused_pairs.csv", pairs.to_csv(index=False))
    plot_confusion(matrix, classes, out_dir / "confusion.png", f"{member.name} ({split}, tta {tta})")
    metrics_path = Path(member.path).parent / "metrics.csv"
    if metrics_path.is_file():
        plot_curves(pd.read_csv(metrics_path), out_dir / "curves.png", member.recipe.name)
    write_text(out_dir / "REPORT.md", _markdown(member, scores, split, tta, len(labels), per_class, pairs, metrics_path.is_file()))
    return out_dir


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.2%}"


def _markdown(member, scores: RunScores, split: str, tta: str, n: int, per_class: pd.DataFrame,
              pairs: pd.DataFrame, has_curves: bool) -> str:
    r = member.recipe
    lines = [f"# Report: {member.name}", "",
             f"- recipe: `{r.name}` ({r.description or r.model.name}); source: {r.paper.source or '-'}",
             f"- model: `{r.model.name}`, {member.num_params:,} parameters",
             f"- scored on: {split} set, {n:,} labelled images; best weights used: {member.weights_used}",
             f"- accuracy: raw {_pct(scores.raw)} · EMA {_pct(scores.ema)} · best weights + TTA ({tta}) {_pct(scores.tta)}",
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


def report(paths: list[str], data_root: str | None = None, out: str | None = None, split: str = "val", tta: str | None = None,
           device: str = "auto", echo: Callable[[str], None] = print) -> list[Path]:
    """One report folder per run: RUN/report/ by default, or OUT/<run name>/."""
    dev = resolve_device(device)
    written = []
    for path in paths:
        base = Path(path) if Path(path).is_dir() else Path(path).parent
        out_dir = Path(out) / base.name if out else base / "report"
        written.append(report_run(path, out_dir, data_root, split, tta, dev))
        echo(f"report: {out_dir / 'REPORT.md'}")
    return written
