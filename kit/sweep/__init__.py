"""`kit sweep`: a table of recipe variants, trained, pruned and compared, on Optuna.

The work is planned once, as a queue of trials in the study: each point of a `--grid`, or `--trials N`
empty slots that Optuna's TPE fills from a `--space` file when a worker takes them. Any number of workers
(`--jobs N`, or `kit sweep` processes on other machines sharing `--storage`) take queued trials one at a
time (Optuna marks a trial RUNNING only for the first who asks), so a study runs each trial once. Each trial
is an ordinary run directory made through `--set` overrides; it reports validation accuracy every epoch and
is pruned by the median rule. A re-run continues: finished trials are left alone, and a trial whose worker
died resumes its run directory from last.pt (kit.sweep.queue: at once on this machine, after its heartbeat's grace
period from another one)."""

import os
from pathlib import Path
from typing import Callable

import pandas as pd
import yaml

from kit.device import worker_devices
from kit.io import write_text
from kit.recipe import SWEEP_DB_WAIT_S, SWEEP_HEARTBEAT_S
from kit.sweep.plan import check_same_plan, make_plan, parse_grid, read_space
from kit.sweep.queue import Sweep, shown_url, work
from kit.sweep.results import write_results

__all__ = ["parse_grid", "read_space", "sweep"]


def sweep(recipe_path: str, *, overrides: tuple[str, ...] = (), grid: tuple[str, ...] = (), space: str | None = None,
          trials: int | None = None, name: str | None = None, out_root: str = "sweeps", study_name: str | None = None,
          storage: str | None = None, jobs: int = 1, prune: bool = True, prune_startup: int = 4,
          data_root: str | None = None, device: str = "auto", devices: tuple[str, ...] = (),
          heartbeat_s: int = SWEEP_HEARTBEAT_S, db_wait_s: float = SWEEP_DB_WAIT_S, echo: Callable[[str], None] = print) -> pd.DataFrame:
    """Run (or continue) a sweep; returns its results table. `devices` (GPU indices): `jobs` workers on each,
    every worker pinned to its GPU."""
    plan = make_plan(recipe_path, overrides, grid, space, trials)
    folder = Path(out_root) / (name or Path(recipe_path).stem)
    check_same_plan(folder, plan)
    folder.mkdir(parents=True, exist_ok=True)
    write_text(folder / "sweep.yaml", yaml.safe_dump(plan.as_dict(), sort_keys=False))
    storage = storage or f"sqlite:///{(folder / 'study.db').resolve()}"
    job = Sweep(folder, plan, study_name or folder.name, storage, prune, prune_startup, data_root, device, heartbeat_s,
                db_wait_s)
    placed = worker_devices(tuple(devices), jobs)
    on = f" on GPUs {', '.join(devices)}" if devices else ""
    opened = job.open_study()  # a wrong URL, password or study is one line before anything else
    echo(f"sweep {folder}: {plan.trials} trials planned, study '{job.study_name}' in {shown_url(storage)}, "
         f"{len(placed)} at a time{on}")
    if len(placed) > 1 or devices:
        import multiprocessing
        threads = max(1, (os.cpu_count() or 1) // len(placed))
        context = multiprocessing.get_context("spawn")
        workers = [context.Process(target=work_in_child, args=(job, threads, d)) for d in placed]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    else:
        work(job, write_results, echo, opened)
    table = write_results(job, opened[0])
    echo(table.drop(columns=["run_dir"]).to_string(index=False))
    echo(f"results: {folder / 'results.md'}")
    return table


def work_in_child(sweep: Sweep, threads: int, device: str | None = None) -> None:
    from kit.device import pin_device
    pin_device(device)  # before torch starts CUDA: this worker's trials run on that GPU alone
    import torch
    torch.set_num_threads(threads)  # N trials share the CPU cores (on CUDA they share the GPU)
    work(sweep, write_results)
