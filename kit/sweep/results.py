"""A sweep's results: one row per trial (results.csv, results.md naming the best), the curves, and the list of
completed run directories (completed_runs.txt) that predict and evaluate read for a sweep folder."""

from pathlib import Path

import pandas as pd

from kit.inference.checkpoint import better_weights
from kit.inference.ensemble import COMPLETED_RUNS
from kit.io import write_text
from kit.sweep.queue import Sweep

RESULT_COLUMNS = ["trial", "state", "overrides", "parameters", "epochs", "best_val_acc", "seconds", "device", "run_dir",
                  "attempts"]


def results_table(sweep: Sweep, study) -> tuple[pd.DataFrame, dict[int, pd.DataFrame]]:
    """One row per planned trial (a trial queued again after its worker died counts once, as its last attempt, under
    its first number), in trial order: overrides, parameters, epochs run, best validation accuracy, training seconds,
    state; and the metrics.csv of each trial that has one, by trial (read once, for the table and the curves)."""
    rows, curves = [], {}
    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    for t in (t for t in trials if t.number not in retried):
        history = t.system_attrs.get("retry_history", [])
        run_dir = Path(t.user_attrs.get("run_dir", sweep.trial_dir(t.number)))
        trial, found = history[0] if history else t.number, (run_dir / "metrics.csv").is_file()
        metrics = pd.read_csv(run_dir / "metrics.csv") if found else pd.DataFrame()
        if found:
            curves[trial] = metrics
        best = float(better_weights(metrics.val_acc, metrics.ema_val_acc)[0].max()) if len(metrics) else float("nan")
        rows.append({"trial": trial, "state": t.state.name,
                     "overrides": t.user_attrs.get("overrides", ""),
                     "parameters": t.user_attrs.get("parameters"), "epochs": len(metrics), "best_val_acc": best,
                     "seconds": float(metrics.seconds.sum()) if len(metrics) else 0.0,
                     "device": t.user_attrs.get("device", ""), "run_dir": str(run_dir), "attempts": len(history) + 1})
    table = pd.DataFrame(rows, columns=RESULT_COLUMNS).astype({"parameters": "Int64"})
    return table.sort_values("trial", kind="stable").reset_index(drop=True), curves


def write_results(sweep: Sweep, study) -> pd.DataFrame:
    """results.csv, results.md (best trial named) and curves.png in the sweep folder, written atomically."""
    from kit.inference.plots import plot_val_curves
    table, metrics = results_table(sweep, study)
    write_text(sweep.folder / "results.csv", table.to_csv(index=False))
    write_text(sweep.folder / "results.md", _markdown(table, sweep))
    write_text(sweep.folder / COMPLETED_RUNS, "".join(f"{r}\n" for r in table[table.state == "COMPLETE"].run_dir))
    curves = {f"trial {row.trial} ({row.state.lower()})": (metrics[row.trial], row.state not in ("COMPLETE", "RUNNING"))
              for row in table.itertuples() if row.trial in metrics}
    if curves:
        plot_val_curves(curves, sweep.folder / "curves.png", f"{sweep.folder.name}: validation accuracy per trial")
    return table


def _markdown(table: pd.DataFrame, sweep: Sweep) -> str:
    shown = table.assign(best_val_acc=table.best_val_acc.map(lambda v: "-" if pd.isna(v) else f"{v:.2%}"),
                         seconds=table.seconds.map(lambda v: f"{v:.1f}"),
                         parameters=table.parameters.map(lambda v: "-" if pd.isna(v) else f"{int(v):,}"))
    shown = shown.drop(columns=["run_dir"])
    lines = [f"# Sweep {sweep.folder.name}", "", f"- recipe: `{sweep.plan.recipe}`",
             f"- fixed overrides: {' '.join(sweep.plan.overrides) or '-'}", ""]
    lines += ["| " + " | ".join(shown.columns) + " |", "|" + "---|" * len(shown.columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in shown.values.tolist()]
    complete = table[table.state == "COMPLETE"]
    if len(complete):
        best = complete.loc[complete.best_val_acc.idxmax()]
        lines += ["", f"Best: trial {best.trial} ({best.overrides or 'no overrides'}), {best.best_val_acc:.2%} "
                      f"validation accuracy, run directory `{best.run_dir}`"]
    return "\n".join(lines) + "\n"
