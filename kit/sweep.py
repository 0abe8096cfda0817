"""`kit sweep`: a table of recipe variants, trained, pruned and compared, on Optuna.

The work is planned once, as a queue of trials in the study: each point of a `--grid`, or `--trials N`
empty slots that Optuna's TPE fills from a `--space` file when a worker takes them. Any number of workers
(`--jobs N`, or `kit sweep` processes on other machines sharing `--storage`) take queued trials one at a
time (Optuna marks a trial RUNNING only for the first who asks), so a study runs each trial once. Each trial
is an ordinary run directory made through `--set` overrides; it reports validation accuracy every epoch and
is pruned by the median rule. A re-run continues: finished trials are left alone, and a trial whose worker
died (on this machine) resumes its run directory from last.pt."""

import fcntl
import os
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pandas as pd
import yaml

from kit.errors import KitError
from kit.io import write_text
from kit.recipe import load_recipe, parse_value

TRIALS_DIR = "trials"
SPACE_KEYS = {"low", "high", "log", "step", "choices"}


@dataclass(frozen=True)
class SweepPlan:
    """What a sweep folder's sweep.yaml holds: the recipe, its fixed overrides, and a grid or a space."""
    recipe: str
    overrides: tuple[str, ...] = ()
    grid: dict = field(default_factory=dict)  # dotted key -> list of values
    space: dict = field(default_factory=dict)  # dotted key -> {low, high, log, step} or {choices}
    trials: int = 0  # planned trials (the grid's size, or --trials)

    def as_dict(self) -> dict:
        return {"recipe": self.recipe, "overrides": list(self.overrides), "grid": self.grid, "space": self.space,
                "trials": self.trials}


def parse_grid(items: tuple[str, ...]) -> dict:
    """`KEY=V1,V2,...` -> {KEY: [V1, V2, ...]}, each value read as YAML (0.1 is a float, true a bool)."""
    grid = {}
    for item in items:
        key, sep, text = item.partition("=")
        values = [parse_value(v, f"--grid {item}") for v in text.split(",") if v.strip()]
        if not sep or not key.strip() or not values:
            raise KitError(f"--grid {item}: expected KEY=V1,V2,..., e.g. --grid optim.lr=0.05,0.1")
        grid[key.strip()] = values
    return grid


def read_space(path: str) -> dict:
    """A space file: `KEY: {low: A, high: B, log: true}` (a float or int range) or `KEY: {choices: [...]}`."""
    try:
        space = yaml.safe_load(Path(path).read_text())
    except OSError:
        raise KitError(f"{path}: space file not found") from None
    except yaml.YAMLError as err:
        raise KitError(f"{path}: not valid YAML: {getattr(err, 'problem', err)}") from None
    if not isinstance(space, dict) or not space:
        raise KitError(f"{path}: expected a mapping of dotted recipe keys to ranges or choices")
    for key, spec in space.items():
        ok = isinstance(spec, dict) and set(spec) <= SPACE_KEYS and (
            ("choices" in spec and isinstance(spec["choices"], list) and spec["choices"] and len(spec) == 1)
            or ({"low", "high"} <= set(spec) and "choices" not in spec))
        if not ok:
            raise KitError(f"{path}: {key}: expected {{low: A, high: B}} (with optional log, step) or {{choices: [...]}}")
    return space


def suggest(trial, space: dict, grid: dict) -> dict:
    """The trial's values: the grid point it was queued with, or TPE's draw from the space."""
    params = {key: trial.suggest_categorical(key, values) for key, values in grid.items()}
    for key, spec in space.items():
        if "choices" in spec:
            params[key] = trial.suggest_categorical(key, spec["choices"])
        elif all(isinstance(spec[k], int) and not isinstance(spec[k], bool) for k in ("low", "high")):
            params[key] = trial.suggest_int(key, spec["low"], spec["high"], step=spec.get("step", 1), log=spec.get("log", False))
        else:
            params[key] = trial.suggest_float(key, float(spec["low"]), float(spec["high"]), step=spec.get("step"),
                                              log=spec.get("log", False))
    return params


def overrides_of(params: dict) -> list[str]:
    return [f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
            for key, value in params.items()]


def make_storage(url: str):
    """A database URL (sqlite:///..., postgresql://...) or a journal file path (many processes, NFS-safe)."""
    import optuna
    if "://" in url:
        kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
        return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
    from optuna.storages.journal import JournalFileBackend
    return optuna.storages.JournalStorage(JournalFileBackend(url))


@dataclass
class Sweep:
    """One sweep folder and its study."""
    folder: Path
    plan: SweepPlan
    study_name: str
    storage_url: str
    prune: bool = True
    prune_startup: int = 4
    data_root: str | None = None
    device: str = "auto"

    def open_study(self, wait_s: float = 120.0):
        """Create the study and queue its trials, or load it; a loader waits for the creator's queue.
        Processes on this machine take turns (a fresh SQLite file's schema is created once); a worker
        elsewhere that loses the schema race tries once more."""
        import sqlalchemy.exc
        with _exclusive(self.folder / ".study.lock"):
            try:
                return self._open_study(wait_s)
            except sqlalchemy.exc.SQLAlchemyError:
                time.sleep(1.0)
                return self._open_study(wait_s)

    def _open_study(self, wait_s: float):
        import optuna
        storage = make_storage(self.storage_url)
        pruner = optuna.pruners.MedianPruner(n_startup_trials=self.prune_startup) if self.prune else optuna.pruners.NopPruner()
        try:
            study = optuna.create_study(study_name=self.study_name, storage=storage, direction="maximize", pruner=pruner)
            self._queue(study, 0)
        except optuna.exceptions.DuplicatedStudyError:
            study = optuna.load_study(study_name=self.study_name, storage=storage, pruner=pruner)
            deadline = time.monotonic() + wait_s
            while "planned_trials" not in study.user_attrs:
                if time.monotonic() > deadline:
                    raise KitError(f"{self.storage_url}: study '{self.study_name}' has no queued trials (its creator stopped early?)")
                time.sleep(0.5)
            self._queue(study, study.user_attrs["planned_trials"])
        # Optuna wraps an RDBStorage in a cache that must see every trial update: work through the study's own
        return study, study._storage

    def _queue(self, study, planned: int) -> None:
        """Queue trials up to the plan: every grid point, or empty slots for TPE (a larger --trials adds slots)."""
        if planned >= self.plan.trials:
            return
        if self.plan.grid:
            import itertools
            keys = list(self.plan.grid)
            for values in itertools.product(*self.plan.grid.values()):
                study.enqueue_trial(dict(zip(keys, values)))
        else:
            for _ in range(self.plan.trials - planned):
                study.enqueue_trial({})
        study.set_user_attr("planned_trials", self.plan.trials)

    def trial_dir(self, number: int) -> Path:
        return self.folder / TRIALS_DIR / f"trial-{number:04d}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """A blocking exclusive lock on a file, released when the block ends (or the process dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


@contextmanager
def _trial_lock(run_dir: Path) -> Iterator[bool]:
    """An exclusive lock on the trial's run directory, held while it trains; the OS drops it when the
    process dies, which is how a re-run tells an interrupted trial from a running one."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True


def _take(sweep: Sweep, study, storage):
    """The next trial for this worker: an interrupted one of this machine, else a queued one; None when done."""
    import optuna
    from optuna.trial import TrialState
    study_id = storage.get_study_id_from_name(sweep.study_name)
    me = f"{socket.gethostname()}:{os.getpid()}"
    for frozen in storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
        host, _, pid = frozen.user_attrs.get("worker", ":0").rpartition(":")
        if host == socket.gethostname() and not _alive(int(pid)):
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, frozen.number)
            storage.set_trial_user_attr(trial_id, "worker", me)
            return optuna.trial.Trial(study, trial_id)
    for frozen in storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.WAITING,)):
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, frozen.number)
        try:
            if not storage.set_trial_state_values(trial_id, state=TrialState.RUNNING):
                continue  # another worker took it first
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        storage.set_trial_user_attr(trial_id, "worker", me)
        return optuna.trial.Trial(study, trial_id)
    return None


def run_trial(sweep: Sweep, study, trial, echo: Callable[[str], None]) -> str:
    """Train (or resume) one trial's run directory, reporting each epoch; returns a line on how it ended."""
    import optuna
    from kit.train import resume, train
    params = suggest(trial, sweep.plan.space, sweep.plan.grid)
    overrides = list(sweep.plan.overrides) + overrides_of(params)
    run_dir = sweep.trial_dir(trial.number)
    trial.set_user_attr("overrides", " ".join(overrides_of(params)))
    trial.set_user_attr("run_dir", str(run_dir.resolve()))
    say = lambda line: echo(f"[trial {trial.number}] {line}")  # noqa: E731

    def report(run) -> None:
        if "parameters" not in trial.user_attrs:  # counted once, by the session that built the model
            trial.set_user_attr("parameters", run.s.num_params)
        row = run.metrics.iloc[-1]
        trial.report(float(max(row.val_acc, 0.0 if pd.isna(row.ema_val_acc) else row.ema_val_acc)), step=int(row.epoch))
        if row.epoch < run.recipe.train.epochs and trial.should_prune():  # pruning the last epoch saves nothing
            raise optuna.TrialPruned(f"pruned after epoch {int(row.epoch)}")

    with _trial_lock(run_dir) as locked:
        if not locked:
            raise KitError(f"{run_dir}: another worker holds this trial")
        try:
            if (run_dir / "last.pt").is_file():
                say(f"resuming {run_dir}")
                resume(run_dir, overrides=tuple(overrides), data_root=sweep.data_root, device=sweep.device,
                       on_epoch_end=report, echo=say)
            else:
                recipe = load_recipe(sweep.plan.recipe, tuple(overrides))
                train(recipe, data_root=sweep.data_root, device=sweep.device, on_epoch_end=report, echo=say, run_dir=run_dir)
        except optuna.TrialPruned as pruned:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            return str(pruned)
        except KitError as err:
            say(f"failed: {err}")
            trial.set_user_attr("error", str(err))
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            return "failed"
    best = pd.read_csv(run_dir / "metrics.csv")
    value = float(best[["val_acc", "ema_val_acc"]].max(axis=1).max())
    study.tell(trial, value)
    return f"complete: best validation accuracy {value:.2%}"


def work(sweep: Sweep, echo: Callable[[str], None] = print, opened: tuple | None = None) -> int:
    """Take and run trials until none is left; returns how many this worker ran."""
    study, storage = opened or sweep.open_study()
    done = 0
    while (trial := _take(sweep, study, storage)) is not None:
        state = run_trial(sweep, study, trial, echo)
        done += 1
        write_results(sweep, study)
        echo(f"[trial {trial.number}] {state}")
    return done


def _work_in_child(sweep: Sweep, threads: int) -> None:
    import torch
    torch.set_num_threads(threads)  # N trials share the CPU cores (on CUDA they share the GPU)
    work(sweep)


RESULT_COLUMNS = ["trial", "state", "overrides", "parameters", "epochs", "best_val_acc", "seconds", "run_dir"]


def results_table(sweep: Sweep, study) -> pd.DataFrame:
    """One row per trial: overrides, parameters, epochs run, best validation accuracy, training seconds, state."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        run_dir = Path(t.user_attrs.get("run_dir", sweep.trial_dir(t.number)))
        metrics = pd.read_csv(run_dir / "metrics.csv") if (run_dir / "metrics.csv").is_file() else pd.DataFrame()
        best = float(metrics[["val_acc", "ema_val_acc"]].max(axis=1).max()) if len(metrics) else float("nan")
        rows.append({"trial": t.number, "state": t.state.name, "overrides": t.user_attrs.get("overrides", ""),
                     "parameters": t.user_attrs.get("parameters"), "epochs": len(metrics), "best_val_acc": best,
                     "seconds": float(metrics.seconds.sum()) if len(metrics) else 0.0, "run_dir": str(run_dir)})
    return pd.DataFrame(rows, columns=RESULT_COLUMNS).astype({"parameters": "Int64"})


def write_results(sweep: Sweep, study) -> pd.DataFrame:
    """results.csv, results.md (best trial named) and curves.png in the sweep folder, written atomically."""
    from kit.plots import plot_sweep
    table = results_table(sweep, study)
    write_text(sweep.folder / "results.csv", table.to_csv(index=False))
    write_text(sweep.folder / "results.md", _markdown(table, sweep))
    curves = {row.trial: (pd.read_csv(Path(row.run_dir) / "metrics.csv"), row.state) for row in table.itertuples()
              if (Path(row.run_dir) / "metrics.csv").is_file()}
    if curves:
        plot_sweep(curves, sweep.folder / "curves.png", f"{sweep.folder.name}: validation accuracy per trial")
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


def completed_runs(folder: Path) -> list[Path]:
    """The run directories of a sweep folder's completed trials (for kit evaluate / predict)."""
    results = folder / "results.csv"
    if not results.is_file():
        return []
    table = pd.read_csv(results)
    return [Path(r) for r in table[table.state == "COMPLETE"].run_dir]


def sweep(recipe_path: str, *, overrides: tuple[str, ...] = (), grid: tuple[str, ...] = (), space: str | None = None,
          trials: int | None = None, name: str | None = None, out_root: str = "sweeps", study_name: str | None = None,
          storage: str | None = None, jobs: int = 1, prune: bool = True, prune_startup: int = 4,
          data_root: str | None = None, device: str = "auto", echo: Callable[[str], None] = print) -> pd.DataFrame:
    """Run (or continue) a sweep; returns its results table."""
    plan = _plan(recipe_path, overrides, grid, space, trials)
    folder = Path(out_root) / (name or Path(recipe_path).stem)
    _check_same_plan(folder, plan)
    folder.mkdir(parents=True, exist_ok=True)
    write_text(folder / "sweep.yaml", yaml.safe_dump(plan.as_dict(), sort_keys=False))
    storage = storage or f"sqlite:///{(folder / 'study.db').resolve()}"
    job = Sweep(folder, plan, study_name or folder.name, storage, prune, prune_startup, data_root, device)
    echo(f"sweep {folder}: {plan.trials} trials planned, study '{job.study_name}' in {storage}, {jobs} at a time")
    opened = job.open_study()
    if jobs > 1:
        import multiprocessing
        threads = max(1, (os.cpu_count() or 1) // jobs)
        context = multiprocessing.get_context("spawn")
        workers = [context.Process(target=_work_in_child, args=(job, threads)) for _ in range(jobs)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    else:
        work(job, echo, opened)
    table = write_results(job, opened[0])
    echo(table.drop(columns=["run_dir"]).to_string(index=False))
    echo(f"results: {folder / 'results.md'}")
    return table


def _plan(recipe_path: str, overrides: tuple[str, ...], grid: tuple[str, ...], space: str | None,
          trials: int | None) -> SweepPlan:
    if bool(grid) == bool(space):
        raise KitError("give either --grid KEY=V1,V2 (repeatable) or --space SPACE.yaml --trials N")
    load_recipe(recipe_path, overrides)  # the base recipe must be valid before any trial starts
    recipe = str(Path(recipe_path).resolve())
    if grid:
        parsed = parse_grid(grid)
        _check_values(recipe_path, overrides, parsed)
        size = 1
        for values in parsed.values():
            size *= len(values)
        return SweepPlan(recipe, tuple(overrides), grid=parsed, trials=size)
    if not trials or trials < 1:
        raise KitError("--space needs --trials N (N >= 1)")
    parsed = read_space(space)
    _check_values(recipe_path, overrides, {k: v.get("choices", [v.get("low"), v.get("high")]) for k, v in parsed.items()})
    return SweepPlan(recipe, tuple(overrides), space=parsed, trials=trials)


def _check_values(recipe_path: str, overrides: tuple[str, ...], values: dict) -> None:
    """Every value a trial may take goes through the recipe's validation now, not when its trial starts."""
    for key, options in values.items():
        for value in options:
            load_recipe(recipe_path, tuple(overrides) + tuple(overrides_of({key: value})))


def _check_same_plan(folder: Path, plan: SweepPlan) -> None:
    saved_path = folder / "sweep.yaml"
    if not saved_path.is_file():
        return
    saved = yaml.safe_load(saved_path.read_text())
    for key in ("recipe", "overrides", "grid", "space"):
        if saved.get(key) != plan.as_dict()[key]:
            raise KitError(f"{saved_path}: this folder holds another sweep (its {key} differs); "
                           f"give another --name, or the same command to continue it")
