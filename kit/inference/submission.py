"""Submission CSVs in the competition's own format, written atomically and checked.

A format is an id column and the label style: `index` (the class index), `name` (the class name) or `probs` (one
probability column per class, headed by the class names; or, for two classes, one column holding the second class's
probability, as AUC-scored competitions ask). It comes from the competition's sample submission (`--template`: the
header, the id column, the row order and the style) or from options (`--labels`, `--id-column`, `--label-column`);
the default is `ID,Labels` with class indices."""

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from kit.data.formats import DECIMAL, INTEGER, csv_row, id_key, is_integer, read_csv
from kit.errors import KitError
from kit.inference.probs import PROB_TOLERANCE
from kit.io import atomic_paths, write_failure
from kit.recipe import LABEL_STYLES


@dataclass(frozen=True)
class SubmissionFormat:
    id_column: str = "ID"
    label_columns: tuple[str, ...] = ("Labels",)  # empty for probs without a template: the class names
    style: str = "index"
    template: Path | None = None  # the sample submission it came from
    order: tuple[str, ...] | None = None  # the template's ids, as it writes them, in its row order
    names: tuple[str, ...] = ()  # a names template's labels (they must be the model's classes)


def format_from_options(labels: str = "index", id_column: str = "ID", label_column: str = "Labels",
                        classes: list[str] | None = None) -> SubmissionFormat:
    """A format without a template; `probs` heads one column per class with the class names (`classes`, or the
    model's when the table is made)."""
    if labels not in LABEL_STYLES:
        raise KitError(f"--labels {labels}: choose one of {', '.join(LABEL_STYLES)}")
    columns = tuple(classes or ()) if labels == "probs" else (label_column,)
    return SubmissionFormat(id_column, columns, labels)


def with_classes(fmt: SubmissionFormat, classes: list[str]) -> SubmissionFormat:
    """The format with its probability columns named, when the options left them to the model's classes."""
    if fmt.style == "probs" and not fmt.label_columns:
        return dataclasses.replace(fmt, label_columns=tuple(classes))
    return fmt


def format_from_template(path: str | Path, classes: list[str] | None = None) -> SubmissionFormat:
    """Header, id column (the first), row order and label style of a sample submission: several label columns are
    class probabilities; one column holds names (text), indices (integers) or a probability (decimals)."""
    path = Path(path)
    table = read_csv(path)
    if len(table.columns) < 2 or table.empty:
        raise KitError(f"{path}: a sample submission needs an id column, at least one label column and one row per test id")
    id_column, label_columns = table.columns[0], tuple(table.columns[1:])
    ids = table[id_column].str.strip().tolist()
    seen: set[str] = set()
    for i, image_id in enumerate(map(id_key, ids)):
        if image_id in seen:
            raise KitError(f"{path}: row {csv_row(i)}: id {ids[i]!r} appears twice")
        seen.add(image_id)
    if len(label_columns) > 1:
        if classes is not None and sorted(label_columns) != sorted(classes):
            extra = sorted(set(label_columns) - set(classes)) or sorted(set(classes) - set(label_columns))
            raise KitError(f"{path}: columns {', '.join(label_columns)} should be the classes ({', '.join(classes)}); "
                           f"{extra[0]!r} is not both")
        style = "probs"
    else:
        values = table[label_columns[0]].str.strip()
        if values.str.fullmatch(INTEGER).all():
            style = "index"
        elif values.str.fullmatch(DECIMAL.pattern).all():
            style = "probs"
            if classes is not None and len(classes) != 2:
                raise KitError(f"{path}: one probability column suits two classes; the model has {len(classes)} "
                               f"(a template with one column per class asks for all of them)")
        else:
            style = "name"
    names = tuple(v for v in table[label_columns[0]].str.strip() if v) if style == "name" else ()
    return SubmissionFormat(id_column, label_columns, style, path, tuple(ids), names)


def check_template_names(fmt: SubmissionFormat, classes: list[str]) -> None:
    """A names template's labels must be names the model has: a model whose classes are bare indices (0..K-1, data
    without class names) would write indices into a column of names, and a template naming two or more classes the
    model lacks is another competition's class list. One placeholder that is not a class (`x`) names nothing and
    passes, as do empty cells."""
    strangers = sorted(set(fmt.names) - set(classes))
    if strangers and (all(map(is_integer, classes)) or len(strangers) > 1):
        shown = ", ".join(classes[:10]) + (", ..." if len(classes) > 10 else "")
        raise KitError(f"{fmt.template}: its {fmt.label_columns[0]} column holds class names the model does not have (e.g. "
                       f"{strangers[0]!r}; the model's classes: {shown}): the submission would name classes the "
                       f"competition does not know; train on data whose classes are the competition's names")


def submission_table(fmt: SubmissionFormat, ids: np.ndarray, probs: np.ndarray, classes: list[str], test_path: str | Path) -> pd.DataFrame:
    """The rows to write: the template's order (its ids must be the test set's), else the test set's."""
    fmt = with_classes(fmt, classes)
    check_template_names(fmt, classes)
    order = template_order(fmt, ids, test_path)
    probs = probs[order]
    written = fmt.order if fmt.order is not None else np.asarray(ids, dtype=object)  # a template's ids as it spells them
    table = pd.DataFrame({fmt.id_column: written})
    if fmt.style == "index":
        table[fmt.label_columns[0]] = probs.argmax(1)
    elif fmt.style == "name":
        table[fmt.label_columns[0]] = np.asarray(classes, dtype=object)[probs.argmax(1)]
    elif len(fmt.label_columns) == 1:  # two classes: the probability of the second
        table[fmt.label_columns[0]] = probs[:, 1]
    else:
        for column in fmt.label_columns:
            table[column] = probs[:, classes.index(column)]
    return table


def template_order(fmt: SubmissionFormat, ids, test_path) -> np.ndarray:
    """Indices into `ids` in the template's row order (all of them, in order, without a template); the template's
    ids must be exactly the test set's."""
    if fmt.order is None:
        return np.arange(len(ids))
    position = {id_key(k): i for i, k in enumerate(ids)}
    keys = [id_key(k) for k in fmt.order]
    for i, key in enumerate(keys):
        if key not in position:
            raise KitError(f"{fmt.template}: row {csv_row(i)}: id {fmt.order[i]!r} is not in the test set {test_path}")
    missing = set(position) - set(keys)
    if missing:
        raise KitError(f"{fmt.template}: no row for the test set's id {sorted(missing)[0]!r} ({len(missing)} missing; {test_path})")
    return np.array([position[k] for k in keys])


def write_submission(table: pd.DataFrame, path: str | Path, probs: dict[str, np.ndarray] | None = None) -> None:
    """The submission CSV and, given `probs` (from probs_arrays), its probability file beside it (CSV.probs.npz),
    committed together: both files or neither."""
    path = Path(path)
    paths = [path.with_suffix(".probs.npz"), path] if probs is not None else [path]  # the CSV last: a new CSV has its probs
    with atomic_paths(paths) as temps:
        for target, tmp in zip(paths, temps):
            try:
                if target == path:
                    table.to_csv(tmp, index=False, float_format="%.6g")
                else:
                    with open(tmp, "wb") as f:
                        np.savez(f, **probs)
            except Exception as err:
                failure = write_failure(target, err, paths)
                if failure is None:
                    raise
                raise failure from None


def warn_one_class(labels: np.ndarray, classes: list[str], echo: Callable[[str], None]) -> None:
    """A warning line when every image is given one class: a model broken in a way no check caught (dead weights,
    the wrong normalization) still writes a valid-looking submission."""
    if len(labels) > 1 and len(classes) > 1 and (labels == labels[0]).all():
        echo(f"warning: every one of the {len(labels):,} images is predicted as class {classes[int(labels[0])]!r}: "
             f"check the checkpoints and the test set before submitting this")


def check_submission(csv_path: str | Path, test_path: str | Path | None = None, fmt: SubmissionFormat | None = None,
                     num_classes: int = 10, classes: list[str] | None = None) -> int:
    """Raise KitError with the first problem; return the row count when the CSV is valid. The expected ids are the
    template's (fmt.order) or the test set's; with both, they must agree."""
    csv_path, fmt = Path(csv_path), fmt or SubmissionFormat()
    if fmt.style == "probs" and not fmt.label_columns:
        if classes is None:
            raise KitError("--labels probs: give --classes A,B,... (the columns' names) or --template")
        fmt = with_classes(fmt, classes)
    if not csv_path.is_file():
        raise KitError(f"{csv_path}: submission not found")
    table = read_csv(csv_path)
    expected = [fmt.id_column, *fmt.label_columns]
    if list(table.columns) != expected:
        raise KitError(f"{csv_path}: header is {','.join(table.columns)}; expected {','.join(expected)}")
    got = [id_key(v) for v in table[fmt.id_column]]
    dup = pd.Series(got).duplicated().to_numpy()
    if dup.any():
        raise KitError(f"{csv_path}: {fmt.id_column} {got[int(np.argmax(dup))]} appears more than once")
    wanted, source = None, None
    if test_path is not None:
        from kit.data.datasets import read_test_ids
        wanted, source = [id_key(i) for i in read_test_ids(test_path)], test_path
        template_order(fmt, wanted, test_path)
    elif fmt.order is not None:
        wanted, source = [id_key(i) for i in fmt.order], fmt.template
    if wanted is not None:
        extra, missing = sorted(set(got) - set(wanted)), sorted(set(wanted) - set(got))
        if extra:
            raise KitError(f"{csv_path}: {fmt.id_column} {extra[0]} is not in {source}")
        if missing:
            raise KitError(f"{csv_path}: {len(missing)} ids of {source} have no row (e.g. {missing[0]})")
    _check_labels(csv_path, table, fmt, num_classes if classes is None else len(classes), classes)
    return len(table)


def _check_labels(path: Path, table: pd.DataFrame, fmt: SubmissionFormat, num_classes: int, classes: list[str] | None) -> None:
    def fail(column: str, bad: np.ndarray, why: str):
        i = int(np.argmax(bad))
        raise KitError(f"{path}: row {csv_row(i)}: {column} {table[column][i]!r} {why}")

    for column in fmt.label_columns:
        values = table[column].str.strip()
        if fmt.style == "index":
            bad = ~values.str.fullmatch(INTEGER).to_numpy()
            if bad.any():
                fail(column, bad, "is not an integer")
            labels = [int(v) for v in values]  # Python's integers: a label of any length is compared, never overflows
            out = np.array([label < 0 or label >= num_classes for label in labels])
            if out.any():
                i = int(np.argmax(out))
                raise KitError(f"{path}: label {labels[i]} ({fmt.id_column} {table[fmt.id_column][i]}) is outside 0..{num_classes - 1}")
        elif fmt.style == "name":
            bad = (values == "").to_numpy() if classes is None else ~values.isin(classes).to_numpy()
            if bad.any():
                fail(column, bad, "is not a class" if classes is not None else "is empty")
        else:
            numbers = pd.to_numeric(values, errors="coerce").to_numpy()
            bad = ~((numbers >= 0) & (numbers <= 1))
            if bad.any():
                fail(column, bad, "is not a probability in [0, 1]")
    if fmt.style == "probs" and len(fmt.label_columns) > 1:
        sums = table[list(fmt.label_columns)].astype(float).sum(axis=1).to_numpy()
        bad = np.abs(sums - 1) > PROB_TOLERANCE
        if bad.any():
            i = int(np.argmax(bad))
            raise KitError(f"{path}: row {csv_row(i)}: the class probabilities sum to {sums[i]:.4f}, not 1")
