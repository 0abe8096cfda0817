"""Pseudo-labels (`kit train RECIPE --pseudo TEST.probs.npz [--pseudo-threshold 0.9] [--pseudo-soft]`, recipe keys
pseudo.*): the unlabelled test images a probability file is of, read from the test file it names, join the training
images (never the validation images) with the class the file gives them where its probability reaches the threshold,
or with the probabilities themselves as soft targets.

Under k-fold cross-validation, fold i's pseudo-labels must come from models that never saw fold i's validation images:
the file's members are matched by the folds they held out (`member_folds`, `member_splits`, written by kit predict),
and only fold i's own models of the same folds are used; a file with none is refused."""

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from kit.data.datasets import Dataset, Labelled, concat, read_test_set
from kit.data.formats import id_key
from kit.errors import KitError
from kit.inference.probs import NOT_A_FOLD, ProbFile, read_probs
from kit.recipe import Recipe

PSEUDO_TABLE = "pseudo.csv"  # a run's pseudo-labels: how many images of each class it added


def fold_members(probs: ProbFile, recipe: Recipe, split: str) -> list[int]:
    """The members whose pseudo-labels this run may train on: all of them, or under validation: fold, those that held
    out this very fold of these very folds (`split`); none of those is one line, naming the leak."""
    if recipe.data.validation != "fold":
        return list(range(len(probs.member_probs)))
    fold = recipe.data.fold
    if probs.member_folds is None:
        raise KitError(f"{probs.path}: records no folds for its models, so fold {fold}'s validation images may have "
                       f"trained them: with --folds, give the test probabilities of a CV directory with the same folds "
                       f"(kit predict CVDIR)")
    chosen = [m for m, (f, s) in enumerate(zip(probs.member_folds, probs.member_splits)) if f == fold and s == split]
    if not chosen:
        held = sorted({int(f) for f in probs.member_folds})
        note = " (-1: not a fold model)" if NOT_A_FOLD in held else ""
        raise KitError(f"{probs.path}: none of its {len(probs.member_probs)} models held out fold {fold} of these folds "
                       f"({split}; its models held out {', '.join(map(str, held))}{note}): "
                       f"their pseudo-labels would leak fold {fold}'s validation images into its training")
    return chosen


def add_pseudo_labels(dataset: Dataset, recipe: Recipe) -> tuple[Dataset, pd.DataFrame]:
    """The dataset with the confident test images added to its training images, and how many of each class."""
    spec = recipe.pseudo
    probs = read_probs(spec.probs, labelled=False)
    test_path = spec.test or probs.test
    if not test_path:
        raise KitError(f"{spec.probs}: does not name the test file its probabilities are of (no 'test' array): set "
                       f"pseudo.test to it")
    test = read_test_set(test_path, recipe.data)
    members = fold_members(probs, recipe, dataset.split)  # under folds: this fold's own models, blended
    chosen = probs.blended(members) if recipe.data.validation == "fold" else probs.whole()  # else the file's own probs
    mixed = chosen[:, probs.columns_in(dataset.classes)]  # (N, K)
    position = {id_key(i): n for n, i in enumerate(test.ids)}
    rows = np.array([position.get(id_key(i), -1) for i in probs.ids])
    if (rows < 0).any():
        raise KitError(f"{spec.probs}: the id {probs.ids[np.argmax(rows < 0)]} is not an image of {test_path}")
    confidence, labels = mixed.max(1)
    keep = torch.nonzero(confidence >= spec.threshold).flatten()
    images = test.images[torch.from_numpy(rows)[keep]]
    ids = np.array([f"{Path(test_path).name}/{i}" for i in probs.ids[keep.numpy()]], dtype=object)
    added = Labelled(images, labels[keep], ids, mixed[keep].float() if spec.soft else None)
    train = concat([dataset.train, added], len(dataset.classes))
    counts = torch.bincount(labels[keep], minlength=len(dataset.classes)).tolist()
    table = pd.DataFrame({"class": dataset.classes, "added": counts})
    return Dataset(train, dataset.held_out, dataset.classes, dataset.mean, dataset.std, dataset.split), table


def describe(table: pd.DataFrame, recipe: Recipe) -> str:
    kind = "soft targets" if recipe.pseudo.soft else "their predicted class"
    return (f"pseudo-labels: {int(table.added.sum()):,} test images at probability >= {recipe.pseudo.threshold:g} "
            f"({kind}) from {recipe.pseudo.probs}: " + ", ".join(f"{c} {n}" for c, n in zip(table["class"], table.added)))
