"""`kit predict`: an ensemble of checkpoints x TTA views on an unlabelled test pickle -> submission CSV."""

import time
from pathlib import Path
from typing import Callable

import numpy as np

from kit.checkpoint import Checkpoint
from kit.data import read_test_pickle
from kit.ensemble import ensemble_probs, load_ensemble
from kit.recipe import DEFAULT_MAX_PARAMS
from kit.submission import write_probs, write_submission


def default_out(checkpoints: list[Checkpoint]) -> Path:
    return Path("submissions") / (f"{checkpoints[0].recipe.name}.csv" if len(checkpoints) == 1 else "ensemble.csv")


def predict(paths: list[str], test_path: str, tta: str | None = None, blend: str | None = None,
            weights_from: str = "best", out: str | None = None, batch_size: int = 1000, device: str = "auto",
            adapt_bn: bool = False, adapt_prior: float = 0.0, precision: str = "auto",
            echo: Callable[[str], None] = print) -> Path:
    """Write the submission CSV and its .probs.npz; returns the CSV path. `adapt_bn`: each checkpoint's BatchNorm
    statistics are first re-estimated on the test images (blended with its own by the prior strength)."""
    test = read_test_pickle(test_path)  # validated before anything is loaded or written
    ensemble = load_ensemble(paths, weights_from, device, tta, blend, precision)
    start = time.perf_counter()
    if adapt_bn:
        ensemble.adapt_batchnorm(test.images, batch_size, adapt_prior)
        echo(f"BatchNorm statistics re-estimated on the {len(test.ids):,} test images (prior strength {adapt_prior:g})")
    checkpoints, weights, views = ensemble.checkpoints, ensemble.blend, ensemble.views
    per_checkpoint = ensemble.probs(test.images, batch_size)
    compute_seconds = time.perf_counter() - start  # probs come back on the CPU: the device work is done
    probs = ensemble_probs(per_checkpoint, weights)
    labels = probs.argmax(1).numpy()
    out_path = Path(out) if out else default_out(checkpoints)
    write_submission(test.ids, labels, out_path)
    write_probs(test.ids, probs.numpy(), checkpoints[0].classes, [c.path for c in checkpoints], out_path.with_suffix(".probs.npz"))
    echo(describe(checkpoints, weights, views, labels, layout=test.layout, n=len(test.ids)))
    echo(f"model compute: {compute_seconds:.2f} s for {len(test.ids):,} images x {len(checkpoints)} checkpoints x "
         f"{len(views)} views on {ensemble.prec.device}")
    echo(f"submission: {out_path}")
    return out_path


def describe(checkpoints: list[Checkpoint], blend: list[float] | None, views: list, labels: np.ndarray, layout: str, n: int) -> str:
    """Checkpoints with parameters and blend weights, total parameters (warning over budget), views, class histogram."""
    blend = blend or [1.0] * len(checkpoints)
    lines = [f"test: {n:,} images, layout {layout}", "checkpoints:"]
    lines += [f"  {c.name}  {c.recipe.model.name}  {c.num_params:,} parameters  {c.weights_from} weights  blend {w / sum(blend):.3f}"
              for c, w in zip(checkpoints, blend)]
    total = sum(c.num_params for c, w in zip(checkpoints, blend) if w > 0)
    lines.append(f"ensemble: {total:,} parameters in all")
    if total > DEFAULT_MAX_PARAMS:
        lines.append(f"warning: the ensemble's {total:,} parameters exceed the {DEFAULT_MAX_PARAMS:,} budget of one model")
    lines.append(f"tta views: {', '.join(v.__name__ for v in views)}")
    counts = np.bincount(labels, minlength=len(checkpoints[0].classes))
    lines.append("predicted classes: " + ", ".join(f"{c} {k}" for c, k in zip(checkpoints[0].classes, counts)))
    return "\n".join(lines)
