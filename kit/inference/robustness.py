"""`kit evaluate --corrupt`: accuracy of each checkpoint on the labelled images under generated corruptions
(kit.data.corrupt: 7 kinds x severities 1-5), with and without test-time BatchNorm adaptation (kit.inference.adapt), a table,
a plot per corruption, and one line saying whether adaptation helps this model. A team measures it on its own
labelled images before deciding how to predict a hidden set from another source."""

import dataclasses
from typing import Callable

import pandas as pd
import torch

from kit.data.corrupt import CORRUPTIONS, SEVERITIES, corrupt
from kit.device import Precision
from kit.inference.adapt import adapt_batchnorm, batchnorm_layers
from kit.inference.checkpoint import Checkpoint
from kit.inference.ensemble import load_ensemble
from kit.inference.evaluate import scored_images
from kit.inference.scores import topk
from kit.io import write_text

COLUMNS = ["checkpoint", "corruption", "severity", "top1", "top1_adapted"]


def _accuracy(checkpoint: Checkpoint, images: torch.Tensor, labels: torch.Tensor, views: list, batch_size: int,
              prec: Precision) -> float:
    return topk(checkpoint.probs(images, views, batch_size, prec), labels.cpu(), 1)


def score_under_shift(checkpoint: Checkpoint, images: torch.Tensor, labels: torch.Tensor, views: list, batch_size: int,
                      prec: Precision, prior: float) -> tuple[float, float]:
    """(accuracy as trained, accuracy with its BatchNorm statistics re-estimated on these images; NaN without BatchNorm)."""
    plain = _accuracy(checkpoint, images, labels, views, batch_size, prec)
    if not batchnorm_layers(checkpoint.model):
        return plain, float("nan")
    adapted = adapt_batchnorm(checkpoint.model, images, checkpoint.mean, checkpoint.std, prec, batch_size, prior, checkpoint.name)
    return plain, _accuracy(dataclasses.replace(checkpoint, model=adapted), images, labels, views, batch_size, prec)


def robustness(paths: list[str], data_root: str | None = None, held_out: str = "val", tta: str | None = "none",
               weights_from: str = "better", corruptions: tuple[str, ...] = CORRUPTIONS, severities: tuple[int, ...] = SEVERITIES,
               prior: float = 0.0, seed: int = 0, batch_size: int | None = None, device: str = "auto", csv_out: str | None = None,
               plot_out: str | None = None, precision: str = "auto", echo: Callable[[str], None] = print) -> pd.DataFrame:
    """The table (one row per checkpoint x corruption x severity, severity 0 = clean), printed, and written."""
    ensemble = load_ensemble(paths, weights_from, device, tta, precision=precision, batch_size=batch_size)
    data = scored_images(ensemble.checkpoints, data_root, held_out)
    images, labels = data.images.to(ensemble.prec.device), data.labels
    rows = []
    for name, severity in [("clean", 0)] + [(c, s) for c in corruptions for s in severities]:
        shifted = images if severity == 0 else corrupt(images, name, severity, seed)
        for c in ensemble.checkpoints:
            plain, adapted = score_under_shift(c, shifted, labels, ensemble.views, ensemble.batch_size, ensemble.prec, prior)
            rows.append({"checkpoint": c.name, "corruption": name, "severity": severity, "top1": plain, "top1_adapted": adapted})
    table = pd.DataFrame(rows, columns=COLUMNS)
    echo(f"{held_out} set: {len(labels):,} labelled images, tta {ensemble.tta}, BatchNorm prior strength {prior:g}")
    summary = table.groupby(["checkpoint", "corruption"], sort=False)[["top1", "top1_adapted"]].mean().reset_index()
    echo(summary.to_string(index=False, formatters={c: "{:.2%}".format for c in ("top1", "top1_adapted")}))
    for c in ensemble.checkpoints:
        echo(recommendation(table[table.checkpoint == c.name], c.name))
    if csv_out:
        write_text(csv_out, table.to_csv(index=False))
        echo(f"table: {csv_out}")
    if plot_out:
        from kit.inference.plots import plot_robustness
        plot_robustness(table, plot_out)
        echo(f"plot: {plot_out}")
    return table


def recommendation(rows: pd.DataFrame, name: str) -> str:
    """One line: does re-estimating BatchNorm help this checkpoint on the corrupted sets, and what does it cost clean?"""
    clean, shifted = rows[rows.severity == 0], rows[rows.severity > 0]
    if rows.top1_adapted.isna().all():
        return f"{name}: no BatchNorm layer, so --adapt-bn does not apply"
    gain = float((shifted.top1_adapted - shifted.top1).mean()) * 100
    clean_change = float((clean.top1_adapted - clean.top1).mean()) * 100
    verdict = "use --adapt-bn on a shifted hidden set" if gain > 0.5 else "--adapt-bn does not help this model"
    return (f"{name}: adaptation changes accuracy by {gain:+.1f} points on average over the {len(shifted)} corrupted sets "
            f"and by {clean_change:+.1f} on the clean images: {verdict}")
