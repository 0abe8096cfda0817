"""Figures: training curves, confusion matrices, image grids. Drawn on matplotlib `Figure` objects, never through
pyplot: kit neither switches the backend nor touches pyplot's current figure, so a notebook's own `plt.plot(...);
plt.show()` stays the notebook's. Each `plot_*` returns its `KitFigure` (which a notebook displays as a PNG when it
is a cell's value) and writes it atomically when given a path."""

import io
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from kit.inference.checkpoint import better_weights
from kit.io import atomic_path

TITLE_CHARS_PER_INCH = 14  # characters of a 9-point title per inch of figure width


class KitFigure(Figure):
    """A matplotlib Figure that Jupyter shows as a PNG when a cell returns it (no pyplot, no backend)."""

    def _repr_png_(self) -> bytes:
        out = io.BytesIO()
        self.savefig(out, format="png", dpi=100)
        return out.getvalue()


def _figure(rows: int = 1, columns: int = 1, **kwargs):
    """A new KitFigure and its axes (as pyplot's `subplots` returns them)."""
    fig = KitFigure(figsize=kwargs.pop("figsize", None))
    return fig, fig.subplots(rows, columns, **kwargs)


def in_notebook() -> bool:
    """Whether this runs in a Jupyter kernel (Colab, Kaggle): figures then display inline, progress as its bar."""
    return "ipykernel" in sys.modules


def show(path: Path) -> Path:
    """Display a PNG inline in a notebook; elsewhere only return its path."""
    if in_notebook():
        from IPython.display import Image, display
        display(Image(filename=str(path)))
    return path


def _save(fig: Figure, path: Path | None) -> Figure:
    """Write the figure as a PNG at `path` (atomically) when given; returns the figure."""
    if path is not None:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
    return fig


def plot_curves(metrics: pd.DataFrame, path: Path | None = None, title: str = "") -> Figure:
    """Loss, accuracy (raw and EMA) and learning rate per epoch."""
    fig, axes = _figure(1, 3, figsize=(13, 3.6))
    axes[0].plot(metrics.epoch, metrics.train_loss, label="train")
    axes[0].plot(metrics.epoch, metrics.val_loss, label="validation")
    axes[0].set_title("loss")
    axes[1].plot(metrics.epoch, metrics.train_acc * 100, label="train")
    axes[1].plot(metrics.epoch, metrics.val_acc * 100, label="validation")
    if metrics.ema_val_acc.notna().any():
        axes[1].plot(metrics.epoch, metrics.ema_val_acc * 100, label="validation (EMA)")
    axes[1].set_title("accuracy (%)")
    axes[2].plot(metrics.epoch, metrics.lr)
    axes[2].set_title("learning rate")
    axes[2].set_yscale("log" if (metrics.lr > 0).all() else "linear")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[1].legend()
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_confusion(matrix: np.ndarray, classes: list[str], path: Path | None = None, title: str = "") -> Figure:
    """Confusion matrix with class names on both axes and counts in the cells (scikit-learn's display)."""
    from sklearn.metrics import ConfusionMatrixDisplay
    size = max(5, 0.45 * len(classes))
    fig, ax = _figure(figsize=(size + 1, size))
    display = ConfusionMatrixDisplay(matrix, display_labels=classes)
    display.plot(ax=ax, cmap="Blues", colorbar=False, xticks_rotation=60, include_values=len(classes) <= 20,
                 text_kw={"fontsize": 7})
    ax.tick_params(labelsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_val_curves(curves: dict[str, tuple[pd.DataFrame, bool]], path: Path | None = None, title: str = "") -> Figure:
    """Validation accuracy (the better of raw and EMA) per epoch, one line per run in the order given (a sweep's trials,
    a CV's folds), each labelled by its key; runs marked True dashed (pruned or failed trials)."""
    fig, ax = _figure(figsize=(7, 4))
    for label, (metrics, dashed) in curves.items():
        acc = better_weights(metrics.val_acc, metrics.ema_val_acc)[0] * 100
        ax.plot(metrics.epoch, acc, linestyle="--" if dashed else "-", marker=".", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_robustness(table: pd.DataFrame, path: Path | str | None = None) -> Figure:
    """Accuracy against severity, one panel per corruption: each checkpoint as trained (solid) and with its BatchNorm
    statistics re-estimated on the corrupted images (dashed); severity 0 is the clean images."""
    clean = table[table.severity == 0]
    names = [c for c in table.corruption.unique() if c != "clean"]
    cols = min(4, len(names))
    rows = -(-len(names) // cols)
    fig, axes = _figure(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False, sharey=True)
    for ax, name in zip(axes.flat, names):
        for checkpoint, rows_of in table[table.corruption == name].groupby("checkpoint", sort=False):
            start = clean[clean.checkpoint == checkpoint]
            part = pd.concat([start, rows_of]).sort_values("severity")
            line = ax.plot(part.severity, part.top1 * 100, marker=".", label=f"{checkpoint}")[0]
            if part.top1_adapted.notna().any():
                ax.plot(part.severity, part.top1_adapted * 100, marker=".", linestyle="--", color=line.get_color(),
                        label=f"{checkpoint} + adapt-bn")
        ax.set_title(name)
        ax.set_xlabel("severity")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    axes[0][0].set_ylabel("top-1 (%)")
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    return _save(fig, None if path is None else Path(path))


def plot_lr_find(found, path: Path | None = None) -> Figure:
    """kit lr-find: the loss (faint) and its centred average (what the rules read) against the LR (log scale), both
    suggestions marked."""
    fig, ax = _figure(figsize=(6.4, 4))
    ax.plot(found.lrs, found.losses, color="C0", alpha=0.25, label="loss of each update")
    ax.plot(found.lrs, found.smoothed, color="C0", label="centred average (what the rules read)")
    for rule, lr, color in (("minimum / 10", found.minimum, "C2"), ("steepest descent", found.steep, "C3")):
        ax.axvline(lr, color=color, linestyle="--", label=f"{rule}: {lr:.2g}")
    finite = found.smoothed[np.isfinite(found.smoothed)]
    if len(finite):  # a diverged end would flatten the rest of the curve
        low, start = finite.min(), finite[0]
        ax.set_ylim(low - 0.1 * abs(start - low) - 1e-3, max(start, low) + 0.5 * abs(start - low) + 1e-3)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (optim.lr)")
    ax.set_ylabel("training loss")
    ax.set_title(f"{found.recipe}: LR range test, {len(found.lrs)} updates" + (" (diverged)" if found.diverged else ""))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_image_grid(images: list, captions: list[str], path: Path | None = None, title: str = "", columns: int = 8) -> Figure:
    """uint8 (C, S, S) images as read (1 channel in gray, 3 in colour; None leaves a cell empty), a caption each."""
    import textwrap
    columns = max(1, min(columns, len(images)))
    rows = max(1, -(-len(images) // columns))
    width = max(columns * 1.5, 4.0)  # a few images still leave room for the title, wrapped to the width
    title = "\n".join(textwrap.wrap(title, int(width * TITLE_CHARS_PER_INCH))) if title else ""
    lines = title.count("\n") + 1 if title else 0
    fig, axes = _figure(rows, columns, figsize=(width, rows * 1.95 + 0.2 * lines), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, caption in zip(axes.flat, images, captions):
        if image is None:
            continue
        image = np.asarray(image)
        if image.shape[0] == 1:
            ax.imshow(image[0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        else:
            ax.imshow(image.transpose(1, 2, 0), interpolation="nearest")
        ax.set_title(caption, fontsize=6.5)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)
