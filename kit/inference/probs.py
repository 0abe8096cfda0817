"""Probability files: the one format kit writes and reads (`*.probs.npz`), for every side that makes or uses them:
`kit predict` (the test set), `kit evaluate --probs-out` and a run's `val.probs.npz` (labelled images), a CV
directory's `oof.probs.npz` (every training image, from the fold model that held it out), `kit blend` and pseudo-labels.

An .npz of named arrays: `ids` (N,), `probs` (N, K), `member_probs` (M, N, K) with `members` (M,) and `blend` (M,)
weights, `classes` (K,), and where known `labels` (N,), `folds` (N,: the fold that held each image out), `test`
(the unlabelled file the probabilities are of), `member_folds` (M,: the fold each member held out, -1: not a fold
model) and `member_splits` (M,: which folds, `split_key`). Another program's file needs only `probs` (or
`member_probs`), `ids`, and `labels` on the labelled side. Every probability is checked where it enters and before
it is written."""

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kit.data.formats import class_indices, class_names, clean_ids, read_arrays
from kit.errors import KitError
from kit.io import atomic_path

PROB_TOLERANCE = 1e-3  # how far a row of class probabilities may sum from 1 (they are written with 6 digits)
NOT_A_FOLD = -1  # member_folds of a model trained outside k-fold cross-validation


def probs_arrays(ids: np.ndarray, probs: np.ndarray, classes: list[str], members: list[str], member_probs: np.ndarray,
                 labels: np.ndarray | None = None, blend: list[float] | None = None, source: str = "the ensemble",
                 extra: dict | None = None) -> dict:
    """What a probability file holds (`kit blend` reads it): ids, the blended (N, K) `probs`, each member's (M, N, K)
    `member_probs` with its name in `members` and its `blend` weight, the class names, the labels when known, and
    `extra` arrays (folds, test, member_folds, member_splits: the module's docstring).
    The probabilities are checked before anything is written: finite, in [0, 1], rows summing to 1."""
    check_probabilities(source, member_probs)
    check_probabilities(source, probs[None])
    arrays = {"ids": np.asarray(ids).astype(str) if np.asarray(ids).dtype == object else ids, "probs": probs.astype(np.float32),
              "member_probs": member_probs.astype(np.float32), "classes": np.array(classes), "members": np.array(members)}
    if labels is not None:
        arrays["labels"] = labels.astype(np.int64)
    weights = np.asarray(blend if blend is not None else [1.0] * len(member_probs), dtype=np.float64)
    arrays["blend"] = weights / weights.sum()
    arrays.update({k: np.asarray(v) for k, v in (extra or {}).items()})
    return arrays


def write_probs(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
    """A probability file alone (kit evaluate --probs-out)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def check_probabilities(path: str | Path, probs: np.ndarray) -> None:
    """(M, N, K) class probabilities, checked where they enter and before they are written: finite, in [0, 1], each
    row summing to 1. Log-probabilities and logits (what a log-loss or a model's last layer gives) are named as such."""
    if not np.isfinite(probs).all():
        m, i, _ = np.argwhere(~np.isfinite(probs))[0]
        bad = int((~np.isfinite(probs)).any(-1).any(0).sum())
        raise KitError(f"{path}: row {i}{_member(probs, m)} holds {probs[m, i][~np.isfinite(probs[m, i])][0]}, not a "
                       f"probability ({bad:,} of {probs.shape[1]:,} rows; NaN weights or an overflow in the model?)")
    sums = probs.sum(-1, dtype=np.float64)
    inside = (probs >= 0).all() and (probs <= 1).all()
    if inside and (np.abs(sums - 1) <= PROB_TOLERANCE).all():
        return
    if (probs <= 0).all() and (np.abs(np.exp(probs.astype(np.float64)).sum(-1) - 1) <= PROB_TOLERANCE).all():
        raise KitError(f"{path}: these look like log-probabilities (every value <= 0, their exponentials sum to 1 on "
                       f"each row); save the probabilities themselves (np.exp of these)")
    if not inside:
        raise KitError(f"{path}: values from {probs.min():.4g} to {probs.max():.4g} are not probabilities in [0, 1] "
                       f"(logits? save their softmax)")
    m, i = np.argwhere(np.abs(sums - 1) > PROB_TOLERANCE)[0]
    raise KitError(f"{path}: row {i}{_member(probs, m)}: the class probabilities sum to {sums[m, i]:.4f}, not 1")


def _member(probs: np.ndarray, m: int) -> str:
    return f" of member {m}" if len(probs) > 1 else ""


@dataclass
class ProbFile:
    path: Path
    ids: np.ndarray
    member_probs: torch.Tensor  # (M, N, K)
    members: list[str]
    classes: list[str] | None
    labels: torch.Tensor | None
    folds: np.ndarray | None = None  # (N,) the fold that held each image out (an out-of-fold file)
    test: str | None = None  # the unlabelled file the probabilities are of
    member_folds: np.ndarray | None = None  # (M,) the fold each member held out (NOT_A_FOLD: none)
    member_splits: list[str] | None = None  # (M,) which folds (split_key), "" for no fold model
    blend: np.ndarray | None = None  # (M,) the members' weights in the file's `probs` (None: equal)
    mixed: torch.Tensor | None = None  # (N, K) the file's own `probs` beside its members' (a blend, a stacker's)

    def whole(self) -> torch.Tensor:
        """(N, K) the file's own `probs` (a blend's, a stacker's, a CV's fold ensemble), else its members blended."""
        return self.mixed if self.mixed is not None else self.blended()

    def as_one(self) -> "ProbFile":
        """The file as one member: its own (N, K) `probs` (a CV directory's fold ensemble, a blend), else its
        members blended."""
        return dataclasses.replace(self, member_probs=self.whole()[None], members=[self.path.name.removesuffix(".probs.npz")],
                                   blend=None, member_folds=None, member_splits=None)

    def blended(self, members: list[int] | None = None) -> torch.Tensor:
        """(N, K) the chosen members' probabilities (default: all) mixed by their blend weights, as `probs` was."""
        members = list(range(len(self.member_probs))) if members is None else members
        weights = torch.ones(len(members)) if self.blend is None else torch.from_numpy(self.blend[members]).float()
        if not weights.sum() > 0:
            weights = torch.ones(len(members))  # members the blend gave no weight: their plain mean
        return (self.member_probs[members] * (weights / weights.sum())[:, None, None]).sum(0)

    def columns_in(self, classes: list[str] | None) -> torch.Tensor:
        """Indices of this file's columns in the order of `classes` (classes matched by name; its own order when
        either has no names); a file with other classes is refused."""
        k = self.member_probs.shape[2]
        if classes is not None and len(classes) != k:
            more = ", ..." if len(classes) > 5 else ""
            raise KitError(f"{self.path}: {k} classes, not the {len(classes)} of {', '.join(classes[:5])}{more}")
        if classes is None or self.classes is None:
            return torch.arange(k)
        if sorted(self.classes) != sorted(classes):
            other = sorted(set(self.classes) ^ set(classes))
            raise KitError(f"{self.path}: its classes ({', '.join(self.classes[:5])}{', ...' if k > 5 else ''}) are not "
                           f"{', '.join(classes[:5])}{', ...' if k > 5 else ''} (e.g. {other[0]!r} is not in both): "
                           f"probabilities of different classes cannot be mixed")
        return torch.tensor([self.classes.index(c) for c in classes])


def read_probs(path: str | Path, labelled: bool) -> ProbFile:
    """A probability file: kit's (`member_probs`, `members`, `classes`, `labels`) or another program's (`probs`
    (N, K) and `ids`, plus `labels` when labelled)."""
    path = Path(path)
    found = read_arrays(path, {"member_probs", "probs", "ids", "labels", "members", "classes", "folds", "test",
                               "member_folds", "member_splits", "blend"})
    if "member_probs" in found:
        probs = found["member_probs"]
    elif "probs" in found:
        probs = found["probs"][None]
    else:
        raise KitError(f"{path}: no 'probs' (N, K) or 'member_probs' (M, N, K) array (arrays: {', '.join(found.names)})")
    if probs.ndim != 3 or not np.issubdtype(probs.dtype, np.floating) or 0 in probs.shape:
        raise KitError(f"{path}: the probabilities must be floats of shape (N, K); got {probs.dtype} {probs.shape[1:]}")
    check_probabilities(path, probs)
    n = probs.shape[1]
    if "ids" in found and found["ids"].size != n:
        raise KitError(f"{path}: {n} rows of probabilities but {found['ids'].size} ids")
    ids = clean_ids(path, found["ids"].reshape(-1)) if "ids" in found else np.arange(n)
    labels = found.get("labels")
    if labelled and labels is None:
        raise KitError(f"{path}: no 'labels' array: the labelled side of kit blend needs each image's class index "
                       f"(kit evaluate --probs-out writes one)")
    if labels is not None and len(labels) != n:
        raise KitError(f"{path}: {n} rows of probabilities but {len(labels)} labels")
    if labels is not None:
        labels = class_indices(path, labels.reshape(-1), "labels")
        if labels.max(initial=0) >= probs.shape[2]:
            i = int(np.argmax(labels >= probs.shape[2]))
            raise KitError(f"{path}: label {labels[i]} (row {i}) is outside its {probs.shape[2]} classes 0..{probs.shape[2] - 1}")
    members = [str(m) for m in found["members"]] if "members" in found else [path.stem] * len(probs)
    if len(probs) > 1 and members == [path.stem] * len(probs):
        members = [f"{path.stem}[{i}]" for i in range(len(probs))]
    classes = class_names(path, found["classes"], probs.shape[2]) if "classes" in found else None
    blend = found.get("blend") if "member_probs" in found else None
    if blend is not None and (blend.shape != (len(probs),) or blend.dtype.kind != "f" or not np.isfinite(blend).all()
                              or (blend < 0).any() or not blend.sum() > 0):
        raise KitError(f"{path}: 'blend' must be {len(probs)} finite weights >= 0 with a positive sum; got {blend.dtype} "
                       f"{blend.shape}")
    mixed = found.get("probs") if "member_probs" in found else None
    if mixed is not None:
        if mixed.shape != probs.shape[1:] or not np.issubdtype(mixed.dtype, np.floating):
            raise KitError(f"{path}: 'probs' must be floats of shape {probs.shape[1:]} beside 'member_probs'; got "
                           f"{mixed.dtype} {mixed.shape}")
        check_probabilities(path, mixed[None])
        mixed = torch.from_numpy(mixed.astype(np.float32))
    return ProbFile(path, ids, torch.from_numpy(probs.astype(np.float32)), members, classes,
                    None if labels is None else torch.from_numpy(labels), *_provenance(path, found, probs.shape[:2]),
                    None if blend is None else blend.astype(np.float64), mixed)


def _provenance(path: Path, found, shape: tuple[int, int]) -> tuple:
    """(folds, test, member_folds, member_splits) where the file records them, each checked where it enters."""
    m, n = shape
    folds = found.get("folds")
    if folds is not None:
        folds = class_indices(path, folds.reshape(-1), "folds")
        if len(folds) != n:
            raise KitError(f"{path}: {n} rows of probabilities but {len(folds)} folds")
    test = found.get("test")
    if test is not None:
        if test.dtype.kind != "U" or test.size != 1:
            raise KitError(f"{path}: 'test' must be one path (text); got {test.dtype} {test.shape}")
        test = str(test.reshape(-1)[0])
    member_folds, member_splits = found.get("member_folds"), found.get("member_splits")
    if (member_folds is None) != (member_splits is None):
        raise KitError(f"{path}: 'member_folds' and 'member_splits' come together (one is missing)")
    if member_folds is not None:
        if member_folds.shape != (m,) or member_folds.dtype.kind not in "iu" or (member_folds < NOT_A_FOLD).any():
            raise KitError(f"{path}: 'member_folds' must be {m} fold indices (or {NOT_A_FOLD}); got "
                           f"{member_folds.dtype} {member_folds.shape}")
        if member_splits.shape != (m,) or member_splits.dtype.kind != "U":
            raise KitError(f"{path}: 'member_splits' must be {m} texts; got {member_splits.dtype} {member_splits.shape}")
        member_folds, member_splits = member_folds.astype(np.int64), [str(x) for x in member_splits]
    return folds, test, member_folds, member_splits


