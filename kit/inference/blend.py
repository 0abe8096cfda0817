"""Choosing an ensemble's blend weights, and `kit blend`: an ensemble built from saved probabilities alone.

`kit evaluate --probs-out` saves each checkpoint's probabilities on labelled images, `kit predict` saves them on the
unlabelled test set (SUBMISSION.probs.npz); other software's files blend too (an .npz with an (N, K) `probs` array,
`ids`, and `labels` on the labelled side). `kit blend` chooses the weights on the labelled probabilities (greedy
selection, Caruana et al. 2004, on a stratified share of the images; the figures are on the rest) and writes the
submission from the unlabelled ones: on the CPU, in seconds, with no checkpoint at hand."""

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from kit.data.formats import id_key
from kit.errors import KitError
from kit.inference.ensemble import ensemble_probs
from kit.inference.probs import ProbFile, probs_arrays, read_probs
from kit.inference.scores import topk
from kit.inference.submission import (
    SubmissionFormat,
    format_from_template,
    submission_table,
    template_order,
    warn_one_class,
    write_submission,
)


def paired(labelled: list[ProbFile], unlabelled: list[ProbFile]) -> tuple[list[ProbFile], list[ProbFile]]:
    """The two sides' files, the i-th of one paired with the i-th of the other: where one of a pair is one member (a
    CV directory's oof.probs.npz) and the other several (the same CV's k fold models on the test set), the several are
    taken as one, as their file mixed them."""
    if len(labelled) != len(unlabelled):
        return labelled, unlabelled
    out_l, out_u = [], []
    for a, b in zip(labelled, unlabelled):
        m, n = len(a.member_probs), len(b.member_probs)
        out_l.append(a.as_one() if n == 1 and m > 1 else a)
        out_u.append(b.as_one() if m == 1 and n > 1 else b)
    return out_l, out_u


def greedy_selection(probs: list[torch.Tensor], labels: torch.Tensor, rounds: int) -> list[float]:
    """Caruana et al. (2004): repeatedly add (with replacement) the member that most improves the ensemble's
    accuracy (ties: lower log-loss); keep the best prefix. Returns one blend weight per member."""
    counts, best_counts, best_score = [0] * len(probs), None, None
    total = torch.zeros_like(probs[0])
    for _ in range(rounds):
        n = sum(counts) + 1
        scores = []
        for p in probs:
            mix = (total + p) / n
            nll = torch.nn.functional.nll_loss(mix.clamp_min(1e-12).log(), labels).item()
            scores.append(((mix.argmax(1) == labels).float().mean().item(), -nll))
        pick = max(range(len(probs)), key=lambda i: scores[i])
        counts[pick] += 1
        total += probs[pick]
        if best_score is None or scores[pick] > best_score:
            best_score, best_counts = scores[pick], list(counts)
    return [c / sum(best_counts) for c in best_counts]


def selection_halves(labels: torch.Tensor, fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(choose, report) index sets: a stratified `fraction` of the images to choose the blend on, the rest to report on."""
    from sklearn.model_selection import train_test_split
    index = torch.arange(len(labels)).numpy()
    choose, report = train_test_split(index, train_size=fraction, random_state=seed, stratify=labels.numpy())
    return torch.from_numpy(choose).sort().values, torch.from_numpy(report).sort().values


@dataclass
class Side:
    """One side of a blend: every member's probabilities, rows on the first file's ids, columns on the classes."""
    probs: torch.Tensor  # (M, N, K)
    members: list[str]
    ids: np.ndarray
    labels: torch.Tensor | None  # as indices into the classes


def class_names_of(files: list[ProbFile]) -> list[str] | None:
    """The class names of the first file that has them."""
    return next((f.classes for f in files if f.classes is not None), None)


def aligned_members(files: list[ProbFile], side: str, classes: list[str] | None) -> Side:
    """Every member's (N, K) probabilities on one side, rows aligned on the first file's ids and columns on the class
    names `classes`: a file listing the same classes in another order is reordered, one with other classes refused."""
    first = files[0]
    keys = [id_key(i) for i in first.ids]
    out, labels = [], None
    for f in files:
        if f.member_probs.shape[2] != first.member_probs.shape[2]:
            raise KitError(f"{f.path}: {f.member_probs.shape[2]} classes but {first.path} has {first.member_probs.shape[2]}")
        position = {id_key(i): n for n, i in enumerate(f.ids)}
        if sorted(position) != sorted(keys) or len(position) != len(keys):
            missing = sorted(set(keys) - set(position)) or sorted(set(position) - set(keys)) or ["(a duplicate)"]
            raise KitError(f"{f.path}: its ids differ from {first.path}'s on the {side} side (e.g. {missing[0]})")
        order = torch.tensor([position[k] for k in keys])
        columns = f.columns_in(classes)
        if f.labels is not None:
            theirs = torch.argsort(columns)[f.labels[order]]  # their class indices, as indices into `classes`
            if labels is not None and not torch.equal(theirs, labels):
                raise KitError(f"{f.path}: its labels differ from {first.path}'s for the same ids")
            labels = theirs
        out.append(f.member_probs[:, order][:, :, columns])
    return Side(torch.cat(out), [m for f in files for m in f.members], first.ids, labels)


def blend(labelled: list[str], unlabelled: list[str], out: str, rounds: int = 20, select_on: float = 0.5,
          template: str | None = None, fmt: SubmissionFormat | None = None, given_classes: list[str] | None = None,
          stacker: str | None = None, echo: Callable[[str], None] = print) -> Path:
    """Choose the blend on the labelled files' members and write the submission (and its .probs.npz) from the
    unlabelled files' members: the i-th member of one side is the i-th of the other. The labelled files may be
    out-of-fold probabilities (a CV directory's oof.probs.npz): the blend is then chosen on every training image.
    `stacker` (logistic): a stacker fitted on the labelled side writes the submission instead, after the stacked,
    blended and averaged scores are printed side by side."""
    if not labelled or not unlabelled:
        raise KitError("kit blend needs --labelled and --unlabelled probability files")
    labelled_files, unlabelled_files = paired([read_probs(p, True) for p in labelled], [read_probs(p, False) for p in unlabelled])
    named = class_names_of(labelled_files + unlabelled_files)
    scored_side = aligned_members(labelled_files, "labelled", named)
    test_side = aligned_members(unlabelled_files, "unlabelled", named)
    scored, names, test, test_names = scored_side.probs, scored_side.members, test_side.probs, test_side.members
    if len(test) != len(scored):
        raise KitError(f"{len(scored)} members on the labelled side ({', '.join(labelled)}) but {len(test)} on the "
                       f"unlabelled side ({', '.join(unlabelled)}): give each model's files in the same order")
    if test.shape[2] != scored.shape[2]:
        raise KitError(f"{unlabelled[0]}: {test.shape[2]} classes but {labelled[0]} has {scored.shape[2]}")
    if given_classes and named and given_classes != named:
        raise KitError(f"--classes {','.join(given_classes)}: the probability files name their classes "
                       f"({', '.join(named[:5])}{', ...' if len(named) > 5 else ''}); leave --classes out")
    known = named or given_classes
    classes = known or [str(i) for i in range(scored.shape[2])]
    if given_classes and len(given_classes) != scored.shape[2]:
        raise KitError(f"--classes names {len(given_classes)} classes but the probability files have {scored.shape[2]}")
    fmt = format_from_template(template, classes) if template else fmt or SubmissionFormat()
    if fmt.style == "name" and not known:
        raise KitError(f"{labelled[0]}: the probability files carry no class names (a 'classes' array), so the "
                       f"submission's class names are unknown; give --classes A,B,...")
    template_order(fmt, test_side.ids, unlabelled[0])  # the template's ids, checked before anything is written
    labels = scored_side.labels
    if stacker is not None:
        return _stacked(scored_side, test_side, classes, fmt, unlabelled[0], out, rounds, labelled[0], echo)
    choose = report = torch.arange(len(labels))
    if select_on < 1:
        counts = torch.bincount(labels)
        if ((counts > 0) & (counts < 2)).any():
            lonely = int(torch.nonzero((counts > 0) & (counts < 2))[0])
            raise KitError(f"{labelled[0]}: the class {classes[lonely]!r} has one labelled image, too few to split between "
                           f"choosing the blend and scoring it (--select-on {select_on:g}); use --select-on 1")
        choose, report = selection_halves(labels, select_on)
    weights = greedy_selection(list(scored[:, choose]), labels[choose], rounds)
    rows = [{"member": m, "top1": topk(p[report], labels[report], 1)} for m, p in zip(names, scored)]
    rows.append({"member": "mean", "top1": topk(ensemble_probs(list(scored[:, report])), labels[report], 1)})
    rows.append({"member": "selected", "top1": topk(ensemble_probs(list(scored[:, report]), weights), labels[report], 1)})
    where = (f"chosen on {len(choose):,} labelled images; accuracy on the other {len(report):,}" if select_on < 1
             else f"chosen and scored on the same {len(report):,} labelled images (--select-on 1)")
    echo(f"blend {where}")
    echo(pd.DataFrame(rows).to_string(index=False, formatters={"top1": "{:.2%}".format}))
    echo("weights: " + ", ".join(f"{m} {w:.3f}" for m, w in zip(names, weights) if w > 0))
    probs = ensemble_probs(list(test), weights)
    arrays = probs_arrays(test_side.ids, probs.numpy(), classes, test_names, test.numpy(), blend=weights, source="the blend")
    write_submission(submission_table(fmt, test_side.ids, probs.numpy(), classes, unlabelled[0]), out, arrays)
    warn_one_class(probs.argmax(1).numpy(), classes, echo)
    used = sum(w > 0 for w in weights)
    echo(f"submission: {out} ({len(test_side.ids):,} rows; {used} of {len(test)} members carry weight)")
    return Path(out)


def _stacked(scored: Side, test: Side, classes: list[str], fmt: SubmissionFormat, test_path: str, out: str, rounds: int,
             where: str, echo: Callable[[str], None]) -> Path:
    """kit blend --stacker logistic: the three ways scored side by side, the submission from the stacker."""
    from kit.inference.stack import compare, fit_and_predict
    table = compare(scored.probs, scored.labels, lambda probs, labels: greedy_selection(probs, labels, rounds), where)
    echo(f"{len(scored.members)} members on {len(scored.labels):,} labelled images (out-of-fold where the files are); "
         f"each score is on images that did not fit it")
    echo(table.to_string(index=False, formatters={"top1": "{:.2%}".format, "log_loss": "{:.4f}".format}))
    probs = fit_and_predict(scored.probs, scored.labels, test.probs)
    arrays = probs_arrays(test.ids, probs, classes, test.members, test.probs.numpy(), source="the stacker",
                          extra={"stacker": "logistic"})
    write_submission(submission_table(fmt, test.ids, probs, classes, test_path), out, arrays)
    warn_one_class(probs.argmax(1), classes, echo)
    echo(f"submission: {out} ({len(test.ids):,} rows; logistic regression stacked on {len(test.members)} members, fitted "
         f"on all {len(scored.labels):,} labelled images)")
    return Path(out)
