"""`kit predict`: an ensemble of checkpoints x TTA views on an unlabelled test pickle -> submission CSV."""

import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from kit.data import read_test_pickle
from kit.engine import Precision
from kit.errors import KitError
from kit.members import Member, ensemble_probs, load_members
from kit.recipe import DEFAULT_MAX_PARAMS
from kit.session import resolve_device
from kit.submission import write_probs, write_submission
from kit.tta import tta_views


def parse_weights(text: str | None, members: list[Member], paths: list[str]) -> list[float] | None:
    """Comma-separated weights, one per member, or a selection file written by `kit evaluate --select`."""
    if not text:
        return None
    if Path(text).is_file():
        return _weights_from_selection(Path(text), paths)
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise KitError(f"--weights {text}: expected comma-separated numbers or a selection file") from None
    if len(weights) != len(members) or min(weights) < 0 or sum(weights) <= 0:
        raise KitError(f"--weights {text}: need {len(members)} non-negative weights with a positive sum")
    return weights


def _weights_from_selection(path: Path, paths: list[str]) -> list[float]:
    try:
        chosen = {str(Path(k).resolve()): float(v) for k, v in json.loads(path.read_text())["weights"].items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        raise KitError(f"{path}: not a selection file from `kit evaluate --select` (JSON with a 'weights' mapping)") from None
    weights = [chosen.get(str(Path(p).resolve()), 0.0) for p in paths]
    missing = set(chosen) - {str(Path(p).resolve()) for p in paths}
    if missing or sum(weights) <= 0:
        raise KitError(f"{path}: selects {', '.join(sorted(missing)) or 'none of the given members'}; pass the same runs to kit predict")
    return weights


def default_out(members: list[Member]) -> Path:
    return Path("submissions") / (f"{members[0].recipe.name}.csv" if len(members) == 1 else "ensemble.csv")


def predict(paths: list[str], test_path: str, tta: str | None = None, weights: str | None = None,
            weights_from: str = "best", out: str | None = None, batch_size: int = 1000, device: str = "auto",
            echo: Callable[[str], None] = print) -> Path:
    """Write the submission CSV and its .probs.npz; returns the CSV path."""
    test = read_test_pickle(test_path)  # validated before anything is loaded or written
    dev = resolve_device(device)
    members = load_members(paths, weights_from, dev)
    member_weights = parse_weights(weights, members, paths)
    views = tta_views(tta or members[0].recipe.predict.tta)
    prec = Precision(dev, torch.bfloat16 if dev.type == "cuda" else None)
    probs = ensemble_probs([m.probs(test.images, views, batch_size, prec) for m in members], member_weights)
    labels = probs.argmax(1).numpy()
    out_path = Path(out) if out else default_out(members)
    write_submission(test.ids, labels, out_path)
    write_probs(test.ids, probs.numpy(), members[0].classes, [m.path for m in members], out_path.with_suffix(".probs.npz"))
    echo(describe(members, member_weights, views, labels, test.layout, len(test.ids)))
    echo(f"submission: {out_path}")
    return out_path


def describe(members: list[Member], weights: list[float] | None, views: list, labels: np.ndarray, layout: str, n: int) -> str:
    """Members with parameters and weights, total parameters (warning over budget), views, class histogram."""
    weights = weights or [1.0] * len(members)
    lines = [f"test: {n:,} images, layout {layout}", "members:"]
    lines += [f"  {m.name}  {m.recipe.model.name}  {m.num_params:,} parameters  {m.weights_used} weights  weight {w / sum(weights):.3f}"
              for m, w in zip(members, weights)]
    total = sum(m.num_params for m, w in zip(members, weights) if w > 0)
    lines.append(f"ensemble: {total:,} parameters in all")
    if total > DEFAULT_MAX_PARAMS:
        lines.append(f"warning: the ensemble's {total:,} parameters exceed the {DEFAULT_MAX_PARAMS:,} budget of one model")
    lines.append(f"tta views: {', '.join(v.__name__ for v in views)}")
    counts = np.bincount(labels, minlength=len(members[0].classes))
    lines.append("predicted classes: " + ", ".join(f"{c} {k}" for c, k in zip(members[0].classes, counts)))
    return "\n".join(lines)
