"""`kit predict`: an ensemble of checkpoints x TTA views on an unlabelled test set -> the competition's submission CSV
and a probability file beside it (`kit blend` reads it)."""

import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from kit.data.datasets import read_test_set
from kit.inference.checkpoint import Checkpoint
from kit.inference.ensemble import ensemble_probs, load_ensemble
from kit.inference.probs import NOT_A_FOLD, probs_arrays
from kit.inference.submission import (
    SubmissionFormat,
    check_template_names,
    format_from_template,
    submission_table,
    template_order,
    warn_one_class,
    with_classes,
    write_submission,
)
from kit.io import check_output
from kit.recipe import DEFAULT_MAX_PARAMS


def default_out(checkpoints: list[Checkpoint]) -> Path:
    return Path("submissions") / (f"{checkpoints[0].recipe.name}.csv" if len(checkpoints) == 1 else "ensemble.csv")


def predict(paths: list[str], test_path: str, tta: str | None = None, blend: str | None = None,
            weights_from: str = "better", out: str | None = None, batch_size: int | None = None, device: str = "auto",
            adapt_bn: bool = False, adapt_prior: float = 0.0, precision: str = "auto", template: str | None = None,
            fmt: SubmissionFormat | None = None, echo: Callable[[str], None] = print) -> Path:
    """Write the submission CSV (the `template`'s format, else `fmt`, else ID,Labels) and its .probs.npz; returns the
    CSV path. `adapt_bn`: each checkpoint's BatchNorm statistics are first re-estimated on the test images (blended
    with its own by the prior strength). Every input is checked before any model runs."""
    ensemble = load_ensemble(paths, weights_from, device, tta, blend, precision, batch_size)
    checkpoints, weights, views = ensemble.checkpoints, ensemble.blend, ensemble.views
    classes = checkpoints[0].classes
    test = read_test_set(test_path, checkpoints[0].recipe.data)
    fmt = with_classes(format_from_template(template, classes) if template else fmt or SubmissionFormat(), classes)
    template_order(fmt, test.ids, test_path)
    check_template_names(fmt, classes)  # before any model runs
    start = time.perf_counter()
    if adapt_bn:
        ensemble.adapt_batchnorm(test.images, adapt_prior)
        echo(f"BatchNorm statistics re-estimated on the {len(test.ids):,} test images (prior strength {adapt_prior:g})")
    per_checkpoint = ensemble.probs(test.images)
    compute_seconds = time.perf_counter() - start  # probs come back on the CPU: the device work is done
    probs = ensemble_probs(per_checkpoint, weights)
    out_path = Path(out) if out else default_out(checkpoints)
    if check_output(out_path).exists():  # a regular file (anything else is refused there)
        echo(f"replacing {out_path} (and {out_path.with_suffix('.probs.npz').name} beside it)")
    arrays = probs_arrays(test.ids, probs.numpy(), classes, [c.path for c in checkpoints], torch.stack(per_checkpoint).numpy(),
                          blend=weights, source=f"the predictions on {test_path}",
                          extra={"test": str(Path(test_path).resolve()), **member_provenance(checkpoints)})
    write_submission(submission_table(fmt, test.ids, probs.numpy(), classes, test_path), out_path, arrays)
    labels = probs.argmax(1).numpy()
    echo(describe(checkpoints, weights, views, labels, layout=test.layout, n=len(test.ids)))
    warn_one_class(labels, classes, echo)
    echo(f"model compute: {compute_seconds:.2f} s for {len(test.ids):,} images x {len(checkpoints)} checkpoints x "
         f"{len(views)} views on {ensemble.prec.device}")
    echo(f"submission: {out_path} ({_describe_format(fmt)})")
    return out_path


def predict_images(paths: list[str], images, tta: str | None = None, blend: str | None = None, weights_from: str = "better",
                   batch_size: int | None = None, device: str = "auto", adapt_bn: bool = False, adapt_prior: float = 0.0,
                   precision: str = "auto"):
    """Images in memory (kit.data.datasets.images_given: arrays, tensors, PIL images, image paths) through the same
    ensemble, TTA and blend as a test file: a DataFrame with the predicted class (`label`) and one probability column
    per class, a row per image (index: the paths, else 0..N-1); for one image, (its class, its probabilities)."""
    from kit.data.datasets import images_given
    from kit.inference.probs import check_probabilities
    ensemble = load_ensemble(paths, weights_from, device, tta, blend, precision, batch_size)
    classes = ensemble.checkpoints[0].classes
    test, one = images_given(images, ensemble.checkpoints[0].recipe.data)
    if adapt_bn:
        ensemble.adapt_batchnorm(test.images, adapt_prior)
    probs = ensemble_probs(ensemble.probs(test.images), ensemble.blend).numpy()
    check_probabilities("the predictions", probs[None])
    table = pd.DataFrame(probs, columns=classes, index=pd.Index(test.ids, name="id"))
    table.insert(0, "label", [classes[k] for k in probs.argmax(1)])
    if one:
        return table.label.iloc[0], table.iloc[0, 1:].astype(float).rename("probability")
    return table


def member_provenance(checkpoints: list[Checkpoint]) -> dict[str, np.ndarray]:
    """Which fold each checkpoint held out, and of which folds (pseudo-labels refuse a model that saw a fold)."""
    return {"member_folds": np.array([NOT_A_FOLD if c.fold is None else c.fold for c in checkpoints], dtype=np.int64),
            "member_splits": np.array([c.split for c in checkpoints])}


def _describe_format(fmt: SubmissionFormat) -> str:
    source = f"the format of {fmt.template}" if fmt.template else "format"
    return f"{source}: {fmt.id_column},{','.join(fmt.label_columns[:3])}{',...' if len(fmt.label_columns) > 3 else ''}, {fmt.style}"


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
