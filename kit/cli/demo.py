"""`kit demo`: the README's main job on the embedded digits data, end to end in under a minute on a CPU:
make the data, train the demo recipe twice (two seeds), predict the unlabelled pickle with the
ensemble + TTA, write a report, and score the submission against the demo's held-out labels."""

import dataclasses
from pathlib import Path
from typing import Callable

import pandas as pd

from kit.data.datasets import make_demo_data
from kit.inference.predict import predict
from kit.inference.report import report
from kit.recipe import load_recipe
from kit.training.run import train

DEMO_SEEDS = (0, 1)


def submission_accuracy(csv_path: Path, labels_path: Path) -> float:
    """Share of rows whose label matches the answer for the same ID."""
    merged = pd.read_csv(csv_path).merge(pd.read_csv(labels_path), on="ID", suffixes=("", "_true"))
    return float((merged.Labels == merged.Labels_true).mean())


def demo(recipe_path: Path, workdir: str | Path = "runs/demo", submission: str | Path = "submissions/demo.csv",
         device: str = "auto", echo: Callable[[str], None] = print) -> float:
    """Run the whole demo; returns the submission's accuracy on the held-out digits."""
    workdir = Path(workdir)
    data = make_demo_data(workdir / "data")
    echo(f"demo data: {data} (scikit-learn digits in the CIFAR-10 layout)")
    base = load_recipe(recipe_path)
    runs = []
    for seed in DEMO_SEEDS:
        recipe = dataclasses.replace(base, train=dataclasses.replace(base.train, seed=seed))
        runs.append(str(train(recipe, data_root=data, out_root=workdir, device=device, echo=echo)))
    csv_path = predict(runs, str(data / "cifar_test_nolabel.pkl"), out=str(submission), device=device, echo=echo)
    report(runs[:1], device=device, echo=echo)
    accuracy = submission_accuracy(csv_path, data / "test_labels.csv")
    echo(f"demo accuracy: {accuracy:.2%} on {len(pd.read_csv(csv_path)):,} held-out digits "
         f"(ensemble of {len(runs)} runs, TTA {base.predict.tta})")
    return accuracy
