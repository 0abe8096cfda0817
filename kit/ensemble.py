"""Ensembles: several checkpoints that agree on their classes, and the blend of their probabilities
(equal, numbers, or a selection file from `kit evaluate --select`)."""

import json
from pathlib import Path

import torch

from kit.checkpoint import Checkpoint, load_checkpoint
from kit.errors import KitError


def expand_paths(paths: list[str]) -> list[str]:
    """Checkpoint paths, with a sweep folder (`kit sweep`) standing for its completed trials' run directories."""
    expanded = []
    for path in paths:
        if (Path(path) / "sweep.yaml").is_file():
            from kit.sweep import completed_runs
            runs = completed_runs(Path(path))
            if not runs:
                raise KitError(f"{path}: the sweep has no completed trial yet")
            expanded += [str(r) for r in runs]
        else:
            expanded.append(path)
    return expanded


def load_checkpoints(paths: list[str], weights_from: str, device: torch.device) -> list[Checkpoint]:
    """Load several checkpoints for one ensemble; they must agree on the classes."""
    if not paths:
        raise KitError("give at least one run directory or checkpoint")
    checkpoints = [load_checkpoint(p, weights_from, device) for p in paths]
    first = checkpoints[0]
    for other in checkpoints[1:]:
        if other.classes != first.classes:
            raise KitError(f"{other.path}: its {len(other.classes)} classes ({', '.join(other.classes[:3])}, ...) differ from "
                           f"{first.path}'s {len(first.classes)} ({', '.join(first.classes[:3])}, ...): they cannot be ensembled")
    return checkpoints


def ensemble_probs(per_checkpoint: list[torch.Tensor], blend: list[float] | None = None) -> torch.Tensor:
    """Blended mean of the checkpoints' probabilities (blend weights normalized to sum to 1)."""
    blend = blend or [1.0] * len(per_checkpoint)
    total = sum(blend)
    return sum(w / total * p for w, p in zip(blend, per_checkpoint))


def parse_blend(text: str | None, paths: list[str]) -> list[float] | None:
    """Comma-separated weights, one per checkpoint, or a selection file written by `kit evaluate --select`."""
    if not text:
        return None
    if Path(text).is_file():
        return _blend_from_selection(Path(text), paths)
    try:
        blend = [float(w) for w in text.split(",")]
    except ValueError:
        raise KitError(f"--blend {text}: expected comma-separated numbers or a selection file") from None
    if len(blend) != len(paths) or min(blend) < 0 or sum(blend) <= 0:
        raise KitError(f"--blend {text}: need {len(paths)} non-negative weights with a positive sum")
    return blend


def _blend_from_selection(path: Path, paths: list[str]) -> list[float]:
    try:
        chosen = {str(Path(k).resolve()): float(v) for k, v in json.loads(path.read_text())["blend"].items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        raise KitError(f"{path}: not a selection file from `kit evaluate --select` (JSON with a 'blend' mapping)") from None
    blend = [chosen.get(str(Path(p).resolve()), 0.0) for p in paths]
    missing = set(chosen) - {str(Path(p).resolve()) for p in paths}
    if missing or sum(blend) <= 0:
        raise KitError(f"{path}: selects {', '.join(sorted(missing)) or 'none of the given checkpoints'}; "
                       f"pass the same checkpoints to kit predict")
    return blend
