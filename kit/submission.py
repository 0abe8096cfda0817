"""Submission CSVs (`ID,Labels`): writing them atomically and checking them against the test pickle."""

from pathlib import Path

import numpy as np
import pandas as pd

from kit.data import read_test_pickle
from kit.errors import KitError
from kit.io import atomic_path


def write_submission(ids: np.ndarray, labels: np.ndarray, path: str | Path) -> None:
    """One row per id, in the pickle's order."""
    with atomic_path(path) as tmp:
        pd.DataFrame({"ID": ids, "Labels": labels.astype(np.int64)}).to_csv(tmp, index=False)


def write_probs(ids: np.ndarray, probs: np.ndarray, classes: list[str], members: list[str], path: str | Path) -> None:
    """Probabilities beside the CSV, for re-ensembling later."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, ids=ids, probs=probs.astype(np.float32), classes=np.array(classes), members=np.array(members))


def check_submission(csv_path: str | Path, test_path: str | Path, num_classes: int = 10) -> int:
    """Raise KitError with the first problem; return the row count when the CSV is valid."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise KitError(f"{csv_path}: submission not found")
    ids = read_test_pickle(test_path).ids
    try:
        table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise KitError(f"{csv_path}: not a readable CSV ({str(err).splitlines()[0]})") from None
    if list(table.columns) != ["ID", "Labels"]:
        raise KitError(f"{csv_path}: header is {','.join(table.columns)}; expected ID,Labels")
    for column in ("ID", "Labels"):
        bad = ~table[column].str.fullmatch(r"-?\d+")
        if bad.any():
            raise KitError(f"{csv_path}: row {int(np.argmax(bad)) + 2}: {column} {table[column][bad].iloc[0]!r} is not an integer")
    got, labels = table["ID"].astype(np.int64).to_numpy(), table["Labels"].astype(np.int64).to_numpy()
    dup = pd.Series(got).duplicated()
    if dup.any():
        raise KitError(f"{csv_path}: ID {got[dup.to_numpy()][0]} appears more than once")
    missing, extra = np.setdiff1d(ids, got), np.setdiff1d(got, ids)
    if len(extra):
        raise KitError(f"{csv_path}: ID {extra[0]} is not in {test_path}")
    if len(missing):
        raise KitError(f"{csv_path}: {len(missing)} ids of {test_path} have no row (e.g. {missing[0]})")
    out = (labels < 0) | (labels >= num_classes)
    if out.any():
        raise KitError(f"{csv_path}: label {labels[out][0]} (ID {got[out][0]}) is outside 0..{num_classes - 1}")
    return len(table)
