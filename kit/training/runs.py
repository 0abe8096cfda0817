"""`kit runs [RUNS_DIR]` and `kit.runs()`: one table of every run directory below a folder (a CV's folds and a sweep's
trials included), best first: its recipe, what differs from the recipe file of its name, parameters, epochs, the best
and the last validation accuracy (raw and EMA), time, precision and device. Read from the run's own files (recipe.yaml,
metrics.csv, run.json): no checkpoint is loaded."""

import json
from pathlib import Path

import pandas as pd
import yaml

from kit.errors import KitError
from kit.inference.checkpoint import better_weights
from kit.recipe import RECIPES_DIR, load_recipe, recipe_as_dict
from kit.training.run import RUN_INFO

RUN_COLUMNS = ["run", "recipe", "differs", "parameters", "epochs", "best_val_acc", "best_epoch", "best_weights",
               "last_val_acc", "last_ema_val_acc", "minutes", "precision", "device"]
NOT_COMPARED = {"name", "data.root", "model.num_classes", "distill.teacher_sha256"}  # filled in by kit, or named by the run


def runs_table(root: str | Path = "runs", recipes: str | Path = RECIPES_DIR) -> pd.DataFrame:
    """Every run directory below `root` (recipe.yaml and metrics.csv), best validation accuracy first; `recipes`: the
    folder of recipe files to compare each run with (default: kit's recipes/)."""
    root = Path(root)
    if not root.is_dir():
        raise KitError(f"{root}: not a folder of runs")
    rows = [_row(run, root, Path(recipes)) for run in sorted(p.parent for p in root.rglob("metrics.csv"))
            if (run / "recipe.yaml").is_file()]
    table = pd.DataFrame(rows, columns=RUN_COLUMNS)
    return table.sort_values("best_val_acc", ascending=False, na_position="last", kind="stable").reset_index(drop=True)


def _row(run: Path, root: Path, recipes: Path) -> dict:
    recipe = load_recipe(run / "recipe.yaml")
    metrics = pd.read_csv(run / "metrics.csv")
    info = json.loads((run / RUN_INFO).read_text()) if (run / RUN_INFO).is_file() else {}
    if "parameters" not in info:  # a run from before run.json: counted on the meta device, nothing allocated
        from kit.models import build_model, count_parameters
        info["parameters"] = count_parameters(build_model(recipe, str(run / "recipe.yaml"), on_meta=True))
    scores, sources = better_weights(metrics.val_acc, metrics.ema_val_acc)
    best = scores.idxmax() if scores.notna().any() else None
    last = metrics.iloc[-1] if len(metrics) else None
    return {"run": str(run.relative_to(root)), "recipe": recipe.name, "differs": differs(recipe, recipes),
            "parameters": info.get("parameters"), "epochs": f"{len(metrics)}/{recipe.train.epochs}",
            "best_val_acc": None if best is None else scores[best],
            "best_epoch": None if best is None else int(metrics.epoch[best]),
            "best_weights": None if best is None else sources[best],
            "last_val_acc": None if last is None else last.val_acc,
            "last_ema_val_acc": None if last is None else last.ema_val_acc,
            "minutes": metrics.seconds.sum() / 60, "precision": info.get("precision"),
            "device": info.get("device_name") or info.get("device")}


def differs(recipe, recipes: Path) -> str:
    """The recipe's keys whose values differ from the recipe file of its name (`demo-s3`, a --seeds run, is demo's),
    as `key=value; ...`; "?" when no such file is found."""
    name = recipe.name
    candidates = [recipes / f"{name}.yaml", recipes / f"{name.rsplit('-s', 1)[0]}.yaml"]
    source = next((p for p in candidates if p.is_file()), None)
    if source is None:
        return "?"
    ours, theirs = _flat(recipe_as_dict(recipe)), _flat(recipe_as_dict(load_recipe(source)))
    changed = [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
               for k, v in ours.items() if k not in NOT_COMPARED and theirs.get(k) != v]
    return "; ".join(changed)


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "args":
            out.update(_flat(value, f"{prefix}{key}."))
        elif isinstance(value, dict):
            out.update({f"{prefix}{key}.{k}": v for k, v in value.items()})
        else:
            out[f"{prefix}{key}"] = value
    return out
