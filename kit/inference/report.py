"""`kit report`: per-class precision/recall/F1/support (scikit-learn), confusion matrix (CSV + PNG),
the most-confused class pairs, the worst mistakes as pictures, training curves, and a REPORT.md tying them together,
per run; the tables and pictures of mistakes come from kit.inference.interpret (as `kit.interpret` gives them)."""

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from sklearn.metrics import precision_recall_fscore_support

from kit.data.datasets import Labelled, load_held_out
from kit.device import resolve_device
from kit.errors import KitError
from kit.inference.checkpoint import Checkpoint, checkpoint_from_payload, checkpoint_weights, read_payload
from kit.inference.ensemble import ensemble_of, expand_paths, load_ensemble
from kit.inference.interpret import Interpretation, disagreement
from kit.inference.plots import plot_curves
from kit.inference.scores import topk
from kit.inference.tta import tta_views
from kit.io import write_text
from kit.recipe import REPORT_MISTAKES

CONFUSED_PAIRS = 10  # rows of confused_pairs.csv and the report's table


def per_class_table(labels: np.ndarray, predicted: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """precision, recall, f1, support per class (scikit-learn), plus macro and weighted averages."""
    index = list(range(len(classes)))
    p, r, f, s = precision_recall_fscore_support(labels, predicted, labels=index, zero_division=0)
    table = pd.DataFrame({"class": classes, "precision": p, "recall": r, "f1": f, "support": s})
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(labels, predicted, labels=index, average=average, zero_division=0)
        table.loc[len(table)] = [f"{average} avg", p, r, f, int(s.sum())]
    return table


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
    interp = Interpretation(checkpoint.name, data, scores.probs, classes, held_out=held_out)
    matrix = interp.confusion()
    per_class = per_class_table(labels, scores.predicted, classes)
    pairs = interp.most_confused().head(CONFUSED_PAIRS)
    write_text(out_dir / "per_class.csv", per_class.to_csv(index=False))
    write_text(out_dir / "confusion.csv", pd.DataFrame(matrix, index=classes, columns=classes).to_csv())
    write_text(out_dir / "confused_pairs.csv", pairs.to_csv(index=False))
    interp.plot_confusion(out_dir / "confusion.png", f"{checkpoint.name} ({held_out}, tta {scores.tta})")
    metrics_path = Path(checkpoint.path).parent / "metrics.csv"
    if metrics_path.is_file():
        plot_curves(pd.read_csv(metrics_path), out_dir / "curves.png", checkpoint.recipe.name)
    pictures = {}  # the pictures drawn, by section: none when nothing is misclassified
    if interp.plot_top_losses(mistakes, out_dir / "worst_mistakes.png") is not None:
        pictures["worst"] = "worst_mistakes.png"
    if interp.plot_confused_examples(path=out_dir / "confused_examples.png") is not None:
        pictures["pairs"] = "confused_examples.png"
    markdown = _markdown(checkpoint, scores, held_out=held_out, n=len(labels), per_class=per_class, pairs=pairs,
                         has_curves=metrics_path.is_file(), pictures=pictures)
    write_text(out_dir / "REPORT.md", markdown)
    return out_dir


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
        if (out_dir / "REPORT.md").is_file():
            echo(f"replacing the report in {out_dir}")
        written.append(report_run(path, out_dir, data_root=data_root, held_out=held_out, tta=tta, device=device,
                                  precision=precision, mistakes=mistakes))
        echo(f"report: {out_dir / 'REPORT.md'}")
    if test is not None:
        out_dir = Path(report_dir or "reports") / "ensemble"
        ensemble = load_ensemble(paths, "better", device, tta, precision=precision)
        table, figure = disagreement(ensemble, test, mistakes, out_dir / "disagreement.png")
        write_text(out_dir / "disagreement.csv", table.to_csv(index=False))
        picture = f"{out_dir / 'disagreement.png'}, " if figure is not None else "no picture: "
        echo(f"disagreement: {out_dir / 'disagreement.csv'} ({picture}{(table.agreement < 1).sum():,} of {len(table):,} "
             f"test images without a unanimous vote)")
        written.append(out_dir)
    return written
