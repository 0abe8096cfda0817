"""A sweep's queue of trials in an Optuna study, and the workers that take them.

The work is queued once (every grid point, or N empty slots TPE fills when a worker takes them). A worker
takes a trial through the study's storage: it claims a WAITING trial by `set_trial_state_values(RUNNING)`,
which Optuna grants to the first worker only, so concurrent processes (here or on other machines sharing the
storage) run each trial once. A RUNNING trial whose worker process died on this machine is taken again and
resumes its run directory.

Optuna internals this relies on (pinned by tests/test_sweep.py::test_the_optuna_internals_the_queue_relies_on):
- `study._storage`: the storage the study works through. For an RDBStorage Optuna wraps it in a cache that must
  see every trial update, so the queue uses the study's own wrapped storage, never a second one.
- `storage.set_trial_state_values(trial_id, RUNNING)` returns False when the trial is no longer WAITING
  (another worker claimed it), which is what makes the claim exclusive.
- `optuna.trial.Trial(study, trial_id)`: a Trial object for a trial this worker claimed by id (Optuna's own
  `study.ask()` would pop the next WAITING trial itself, without our interrupted-trial rule)."""

import fcntl
import os
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pandas as pd

from kit.errors import KitError
from kit.inference.checkpoint import better_weights
from kit.recipe import load_recipe
from kit.sweep.plan import SweepPlan, overrides_of, suggest

TRIALS_DIR = "trials"


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
        return study, study._storage  # the study's own (cache-wrapped) storage: see the module's docstring

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

    from kit.training.run import resume, train
    params = suggest(trial, sweep.plan.space, sweep.plan.grid)
    overrides = list(sweep.plan.overrides) + overrides_of(params)
    run_dir = sweep.trial_dir(trial.number)
    trial.set_user_attr("overrides", " ".join(overrides_of(params)))
    trial.set_user_attr("run_dir", str(run_dir.resolve()))
    trial.set_user_attr("device", os.environ.get("CUDA_VISIBLE_DEVICES", ""))
    say = lambda line: echo(f"[trial {trial.number}] {line}")  # noqa: E731

    def report(run) -> None:
        if "parameters" not in trial.user_attrs:  # counted once, by the process that built the model
            trial.set_user_attr("parameters", run.trainer.num_params)
        row = run.metrics.iloc[-1]
        trial.report(better_weights(row.val_acc, row.ema_val_acc)[0], step=int(row.epoch))
        if row.epoch < run.recipe.train.epochs and trial.should_prune():  # pruning the last epoch saves nothing
            raise optuna.TrialPruned(f"pruned after epoch {int(row.epoch)}")

    with _trial_lock(run_dir) as locked:
        if not locked:
            raise KitError(f"{run_dir}: another worker holds this trial")
        try:
            if (run_dir / "recipe.yaml").is_file():  # started before: resume (from the start if it saved nothing)
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
    metrics = pd.read_csv(run_dir / "metrics.csv")
    value = float(better_weights(metrics.val_acc, metrics.ema_val_acc)[0].max())
    study.tell(trial, value)
    return f"complete: best validation accuracy {value:.2%}"


def work(sweep: Sweep, after_trial: Callable[[Sweep, object], object], echo: Callable[[str], None] = print,
         opened: tuple | None = None) -> int:
    """Take and run trials until none is left, calling `after_trial(sweep, study)` after each (the results table);
    returns how many this worker ran."""
    study, storage = opened or sweep.open_study()
    done = 0
    while (trial := _take(sweep, study, storage)) is not None:
        state = run_trial(sweep, study, trial, echo)
        done += 1
        after_trial(sweep, study)
        echo(f"[trial {trial.number}] {state}")
    return done
