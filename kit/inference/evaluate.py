"""`kit evaluate`: accuracy of each checkpoint and of the ensemble on labelled data, with and without
TTA; `--select` runs greedy ensemble selection with replacement (Caruana et al., 2004)."""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from kit.data.datasets import Labelled, load_held_out
from kit.errors import KitError
from kit.inference.blend import greedy_selection, selection_halves
from kit.inference.checkpoint import Checkpoint
from kit.inference.ensemble import Ensemble, ensemble_probs, load_ensemble
from kit.inference.probs import probs_arrays, write_probs
from kit.inference.scores import topk
from kit.inference.tta import tta_views
from kit.io import write_text


def scored_images(checkpoints: list[Checkpoint], data_root: str | None, held_out: str) -> Labelled:
    """The labelled images every checkpoint is scored on; they must agree on it."""
    chosen, first, loaded = None, None, {}
    for c in checkpoints:
        if c.recipe.data not in loaded:  # checkpoints of one recipe family share their data: read it once
            loaded[c.recipe.data] = load_held_out(c.recipe.data, data_root, held_out, c.path)
        data = loaded[c.recipe.data]
        if chosen is None:
            chosen, first = data, c
        elif len(data) != len(chosen) or not torch.equal(data.labels, chosen.labels) or not torch.equal(data.images, chosen.images):
            raise KitError(f"{c.path}: validates on other images than {first.path} (a split vs the test_batch?); "
                           f"use --held-out test to score all of them on the test set")
    return chosen


def given_labelled(images, labels, checkpoint: Checkpoint) -> Labelled:
    """Images in memory (kit.data.datasets.images_given) with one label each: a class name or index of the checkpoint's."""
    from kit.data.datasets import images_given
    from kit.data.formats import label_indices
    if labels is None:
        raise KitError("images given without labels: give labels=[...] (a class name or index per image)")
    test, one = images_given(images, checkpoint.recipe.data)
    labels = [labels] if one and not isinstance(labels, (list, tuple)) else list(labels)
    if len(labels) != len(test.ids):
        raise KitError(f"{len(test.ids)} images but {len(labels)} labels")
    indices, _ = label_indices(labels, checkpoint.classes, Path("labels="), [f"label {i}" for i in range(len(labels))])
    return Labelled(test.images, torch.from_numpy(indices), test.ids)


@dataclass
class Scored:
    plain: list[torch.Tensor]  # per checkpoint, the identity view only
    with_views: list[torch.Tensor]  # per checkpoint, averaged over the TTA views


def score_checkpoints(ensemble: Ensemble, data: Labelled) -> Scored:
    plain = ensemble.probs(data.images, tta_views("none"))
    with_views = ensemble.probs(data.images) if len(ensemble.views) > 1 else plain
    return Scored(plain, with_views)


def _row(name: str, params: int, plain: torch.Tensor, with_views: torch.Tensor, labels: torch.Tensor, top5: bool) -> dict:
    row = {"checkpoint": name, "parameters": params, "top1": topk(plain, labels, 1), "top1_tta": topk(with_views, labels, 1)}
    if top5:
        row.update(top5=topk(plain, labels, 5), top5_tta=topk(with_views, labels, 5))
    return row


def _subset(scored: Scored, index: torch.Tensor) -> Scored:
    return Scored([p[index] for p in scored.plain], [p[index] for p in scored.with_views])


def evaluate_files(paths: list[str], select: bool = False, rounds: int = 20, select_on: float = 1.0,
                   csv_out: str | None = None, select_out: str | None = None,
                   echo: Callable[[str], None] = print) -> pd.DataFrame:
    """Each member of labelled probability files (aligned by id; files of other ids are refused) and their mean, and
    with `select` the greedy blend, chosen on `select_on` of the images and scored on the rest. On out-of-fold files
    the blend is chosen on every training image; its selection names the files' members (CV directories), which
    kit predict --blend reads."""
    from kit.inference.blend import aligned_members, class_names_of
    from kit.inference.probs import read_probs
    files = [read_probs(p, labelled=True) for p in paths]
    side = aligned_members(files, "labelled", class_names_of(files))
    scored, labels = side.probs, side.labels
    choose = report = torch.arange(len(labels))
    if select and select_on < 1:
        choose, report = selection_halves(labels, select_on)
        echo(f"blend chosen on {len(choose):,} images; every figure below is on the other {len(report):,}")
    top5 = scored.shape[2] > 10

    def row(name: str, probs: torch.Tensor) -> dict:
        figures = {"top1": topk(probs, labels[report], 1)}
        return {"member": name, **figures, **({"top5": topk(probs, labels[report], 5)} if top5 else {})}

    rows = [row(m, p[report]) for m, p in zip(side.members, scored)]
    rows.append(row("ensemble (mean)", ensemble_probs(list(scored[:, report]))))
    if select:
        blend = greedy_selection(list(scored[:, choose]), labels[choose], rounds)
        rows.append(row("ensemble (selected)", ensemble_probs(list(scored[:, report]), blend)))
        _selected(side.members, side.members, blend, select_out, {"select_on": select_on, "top1": rows[-1]["top1"],
                                                                   "scored_on": len(report), "files": paths}, "", echo)
    return _table(rows, f"{len(paths)} probability file(s): {len(report):,} labelled images", csv_out, echo)


def _selected(names: list[str], paths: list[str], blend: list[float], select_out: str | None, details: dict, use: str,
              echo: Callable[[str], None]) -> None:
    """Print the selected blend and write its selection file (for kit predict --blend) when asked."""
    echo("selected: " + ", ".join(f"{n} {w:.3f}" for n, w in zip(names, blend) if w > 0))
    if select_out:
        selection = {"blend": {str(Path(p).resolve()): w for p, w in zip(paths, blend) if w > 0}, **details}
        write_text(select_out, json.dumps(selection, indent=2))
        echo(f"selection: {select_out} (use: kit predict {' '.join(paths)} --blend {select_out}{use})")


def _table(rows: list[dict], header: str, csv_out: str | None, echo: Callable[[str], None]) -> pd.DataFrame:
    """Print the accuracy table (and write it as a CSV when asked)."""
    table = pd.DataFrame(rows)
    echo(header)
    echo(table.to_string(index=False, formatters={c: "{:.2%}".format for c in table.columns if c.startswith("top")}))
    if csv_out:
        write_text(csv_out, table.to_csv(index=False))
        echo(f"table: {csv_out}")
    return table


def evaluate(paths: list[str], data_root: str | None = None, held_out: str = "val", tta: str | None = None, select: bool = False,
             rounds: int = 20, weights_from: str = "better", csv_out: str | None = None, select_out: str | None = None,
             batch_size: int | None = None, device: str = "auto", select_on: float = 1.0, adapt_bn: bool = False,
             adapt_prior: float = 0.0, precision: str = "auto", probs_out: str | None = None,
             images=None, labels=None, echo: Callable[[str], None] = print) -> pd.DataFrame:
    """Print and write the accuracy table (on `images` with their `labels` when given: images in memory, as
    kit.predict takes them, labels as class names or indices); with `select`, also the chosen blend (and a selection file).
    `select_on` < 1 chooses the blend on that stratified share of the images and scores the table on the
    others, so the ensemble's figure is not measured on the images that chose it. A sweep folder stands
    for its completed trials, a CV directory for its fold models. `probs_out`: each checkpoint's probabilities (with
    TTA) on every scored image, for `kit blend`. Probability files (.npz with labels, such as CV directories'
    oof.probs.npz) instead of checkpoints are scored and selected as they are (`evaluate_files`)."""
    if paths and all(str(p).endswith(".npz") for p in paths):
        return evaluate_files(paths, select, rounds, select_on, csv_out, select_out, echo)
    ensemble = load_ensemble(paths, weights_from, device, tta, precision=precision, batch_size=batch_size)
    paths, checkpoints, tta = ensemble.paths, ensemble.checkpoints, ensemble.tta
    data = scored_images(checkpoints, data_root, held_out) if images is None else given_labelled(images, labels, checkpoints[0])
    held_out = held_out if images is None else "given"
    if adapt_bn:  # the labelled images stand in for the unlabelled set: their labels are not used for it
        ensemble.adapt_batchnorm(data.images, adapt_prior)
        echo(f"BatchNorm statistics re-estimated on the {len(data):,} {held_out} images (prior strength {adapt_prior:g})")
    scored = score_checkpoints(ensemble, data)
    if probs_out:
        write_probs(probs_out, probs_arrays(data.ids, ensemble_probs(scored.with_views).numpy(), checkpoints[0].classes,
                                            paths, torch.stack(scored.with_views).numpy(), data.labels.numpy(),
                                            source=f"the predictions on the {held_out} images"))
        echo(f"probabilities: {probs_out} ({len(paths)} checkpoints x {len(data):,} {held_out} images, tta {tta})")
    labels, top5 = data.labels, len(checkpoints[0].classes) > 10
    chosen_on = scored, labels
    if select and select_on < 1:
        choose, report = selection_halves(labels, select_on)
        chosen_on = _subset(scored, choose), labels[choose]
        scored, labels = _subset(scored, report), labels[report]
        echo(f"blend chosen on {len(choose):,} images; every figure below is on the other {len(report):,}")
    rows = [_row(c.name, c.num_params, p, v, labels, top5) for c, p, v in zip(checkpoints, scored.plain, scored.with_views)]
    total = sum(c.num_params for c in checkpoints)
    rows.append(_row("ensemble (mean)", total, ensemble_probs(scored.plain), ensemble_probs(scored.with_views), labels, top5))
    if select:
        blend = greedy_selection(chosen_on[0].with_views, chosen_on[1], rounds)
        used = sum(c.num_params for c, w in zip(checkpoints, blend) if w > 0)
        rows.append(_row("ensemble (selected)", used, ensemble_probs(scored.plain, blend),
                         ensemble_probs(scored.with_views, blend), labels, top5))
        _selected([c.name for c in checkpoints], paths, blend, select_out,
                  {"tta": tta, "held_out": held_out, "select_on": select_on, "top1_tta": rows[-1]["top1_tta"],
                   "scored_on": len(labels)}, f" --tta {tta}", echo)
    return _table(rows, f"{held_out} set: {len(labels):,} labelled images, tta {tta}", csv_out, echo)
