"""Ensembles: several checkpoints that agree on their classes, and the blend of their probabilities
(equal, numbers, or a selection file from `kit evaluate --select`). `load_ensemble` is the one inference
set-up predict, evaluate and report share: paths, device, precision, checkpoints, TTA views and blend."""

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from kit.device import Precision, inference_precision, resolve_device
from kit.errors import KitError
from kit.inference.checkpoint import OOF_PROBS, Checkpoint, fold_dirs, is_cv_dir, load_checkpoint
from kit.inference.tta import tta_views

COMPLETED_RUNS = "completed_runs.txt"  # a folder listing run directories, one per line (what `kit sweep` writes)


@dataclass
class Ensemble:
    paths: list[str]  # the checkpoints as given (a sweep folder expanded into its completed runs)
    checkpoints: list[Checkpoint]
    blend: list[float] | None  # None: equal weights
    tta: str
    views: list
    prec: Precision
    batch_size: int  # images per inference batch: --batch-size, else the first checkpoint's predict.batch_size

    def adapt_batchnorm(self, images: torch.Tensor, prior: float = 0.0) -> None:
        """Every checkpoint's BatchNorm statistics re-estimated on `images` (kit.inference.adapt), in memory only."""
        from kit.inference.adapt import adapt_batchnorm
        self.checkpoints = [dataclasses.replace(c, model=adapt_batchnorm(c.model, images, c.mean, c.std, self.prec, self.batch_size,
                                                                         prior, c.path)) for c in self.checkpoints]

    def probs(self, images: torch.Tensor, views: list | None = None) -> list[torch.Tensor]:
        """Each checkpoint's (N, K) probabilities on `images`, averaged over `views` (default: the ensemble's)."""
        images = images.to(self.prec.device)
        return [c.probs(images, views or self.views, self.batch_size, self.prec) for c in self.checkpoints]


def load_ensemble(paths: list[str], weights_from: str = "better", device: str = "auto", tta: str | None = None,
                  blend: str | None = None, precision: str = "auto", batch_size: int | None = None) -> Ensemble:
    """Checkpoints (run directories, files, folders listing runs) on the device, with the TTA views (default: the
    first checkpoint's recipe's) and the blend (numbers or a selection file)."""
    dev = resolve_device(device)
    paths = expand_paths(paths)
    return ensemble_of(paths, load_checkpoints(paths, weights_from, dev), dev, tta, blend, precision, batch_size)


def ensemble_of(paths: list[str], checkpoints: list[Checkpoint], device: torch.device, tta: str | None = None,
                blend: str | None = None, precision: str = "auto", batch_size: int | None = None) -> Ensemble:
    """The inference set-up around checkpoints already loaded: TTA views (default: the first checkpoint's recipe's),
    blend, precision and batch size (default: its predict.batch_size)."""
    tta = tta or checkpoints[0].recipe.predict.tta
    return Ensemble(paths, checkpoints, parse_blend(blend, paths), tta, tta_views(tta), inference_precision(device, precision),
                    batch_size or checkpoints[0].recipe.predict.batch_size)


def expand_paths(paths: list[str]) -> list[str]:
    """Checkpoint paths, with a folder holding completed_runs.txt (a sweep folder) standing for the runs it lists, and
    a CV directory for its k fold runs."""
    expanded = []
    for path in paths:
        listing = Path(path) / COMPLETED_RUNS
        if is_cv_dir(path):
            expanded += fold_runs(Path(path))
        elif listing.is_file():
            runs = [line for line in listing.read_text().splitlines() if line.strip()]
            if not runs:
                raise KitError(f"{path}: lists no completed run yet ({listing})")
            expanded += runs
        elif (Path(path) / "sweep.yaml").is_file():
            raise KitError(f"{path}: the sweep has no completed trial yet")
        else:
            expanded.append(path)
    return expanded


def fold_runs(cv_dir: Path) -> list[str]:
    """A CV directory's fold runs (fold-0, fold-1, ...), the k models of its ensemble, once all have finished."""
    runs = fold_dirs(cv_dir)
    if not runs or not (cv_dir / OOF_PROBS).is_file() or not all((p / "best.pt").is_file() for p in runs):
        raise KitError(f"{cv_dir}: its cross-validation has not finished (no {OOF_PROBS} yet): finish it with "
                       f"kit train --resume {cv_dir}")
    return [str(p) for p in runs]


def load_checkpoints(paths: list[str], weights_from: str, device: torch.device) -> list[Checkpoint]:
    """Load several checkpoints for one ensemble; they must agree on the classes."""
    if not paths:
        raise KitError("give at least one run directory or checkpoint")
    checkpoints = [load_checkpoint(p, weights_from, device) for p in paths]
    first = checkpoints[0]
    for other in checkpoints[1:]:
        theirs, ours = other.recipe.data.image_shape, first.recipe.data.image_shape
        if theirs != ours:
            raise KitError(f"{other.path}: takes {theirs[1]}x{theirs[1]} images with {theirs[0]} channel(s), "
                           f"{first.path} {ours[1]}x{ours[1]} with {ours[0]}: they cannot be ensembled")
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
    if len(blend) != len(paths) or not valid_weights(blend):
        raise KitError(f"--blend {text}: need {len(paths)} non-negative weights (finite numbers) with a positive sum")
    return blend


def valid_weights(blend: list[float]) -> bool:
    """Blend weights checked where they enter: finite, >= 0, a positive sum (NaN or inf would make every row class 0)."""
    return all(math.isfinite(w) and w >= 0 for w in blend) and math.isfinite(sum(blend)) and sum(blend) > 0


def _owner(path: str) -> str:
    """The CV directory a fold run belongs to (resolved), else the path itself."""
    parent = Path(path).resolve().parent
    return str(parent) if is_cv_dir(parent) else str(Path(path).resolve())


def _blend_from_selection(path: Path, paths: list[str]) -> list[float]:
    try:
        chosen = {str(Path(k).resolve()): float(v) for k, v in json.loads(path.read_text())["blend"].items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        raise KitError(f"{path}: not a selection file from `kit evaluate --select` (JSON with a 'blend' mapping)") from None
    owners = [_owner(p) for p in paths]  # a fold run stands for its CV directory's share
    shares = {o: owners.count(o) for o in owners}
    blend = [chosen.get(str(Path(p).resolve()), chosen.get(o, 0.0) / shares[o]) for p, o in zip(paths, owners)]
    if not valid_weights(list(chosen.values()) or [1.0]):
        raise KitError(f"{path}: its blend weights {list(chosen.values())} must be finite and non-negative")
    missing = set(chosen) - {str(Path(p).resolve()) for p in paths} - set(owners)
    if missing or sum(blend) <= 0:
        raise KitError(f"{path}: selects {', '.join(sorted(missing)) or 'none of the given checkpoints'}; "
                       f"pass the same checkpoints to kit predict")
    return blend
