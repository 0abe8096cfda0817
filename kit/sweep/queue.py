"""A sweep's queue of trials in an Optuna study, and the workers that take them.

The work is queued once (every grid point, or N empty slots TPE fills when a worker takes them). A worker
takes a trial through the study's storage: it claims a WAITING trial by `set_trial_state_values(RUNNING)`,
which Optuna grants to the first worker only, so concurrent processes (here or on other machines sharing the
storage) run each trial once.

A worker that dies, here or on another machine: with a database (SQLite, PostgreSQL), Optuna's heartbeat marks its
trial failed once it has been silent for the grace period (`RDBStorage(heartbeat_interval, grace_period)`), and
`RetryHeartbeatStaleTrialCallback` queues it again; the next worker to take it resumes the first attempt's run
directory when it can reach it (a shared folder), else starts it again. Workers wait while trials run elsewhere, so
a survivor takes a dead worker's trial. With a journal file (no heartbeat), a RUNNING trial whose worker process
died on this machine is taken again. A database that stops answering is waited for (with backoff, `db_wait_s`);
then the worker stops with one line, and a later `kit sweep` continues.

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
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pandas as pd

from kit.errors import KitError
from kit.inference.checkpoint import better_weights
from kit.recipe import SWEEP_DB_WAIT_S, SWEEP_GRACE_BEATS, SWEEP_HEARTBEAT_S, SWEEP_MAX_RETRIES, load_recipe
from kit.sweep.plan import SweepPlan, overrides_of, suggest

TRIALS_DIR = "trials"
KIT_STUDY = "kit_sweep"  # the study's user attribute that says kit made it (set before any trial is queued)


def shown_url(url: str) -> str:
    """A storage URL as printed: its password hidden."""
    if "://" not in url:
        return url
    try:
        from sqlalchemy.engine import make_url
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy reads: shown as given, up to the credentials
        return url.split("@")[-1]


def make_storage(url: str, heartbeat_s: int = SWEEP_HEARTBEAT_S):
    """A database URL (sqlite:///..., postgresql://...) with heartbeats and retries of failed trials, or a journal
    file path (many processes, NFS-safe). A missing driver, a wrong URL or password: one KitError line."""
    import optuna
    if "://" not in url:
        from optuna.storages.journal import JournalFileBackend
        return optuna.storages.JournalStorage(JournalFileBackend(url))
    import inspect

    import sqlalchemy.exc
    retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or optuna.storages.RetryFailedTrialCallback
    callback = ("heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in
                inspect.signature(optuna.storages.RDBStorage).parameters else "failed_trial_callback")
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats: Optuna's, on purpose
    try:
        for attempt in range(3):
            try:
                return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=heartbeat_s,
                                                  grace_period=SWEEP_GRACE_BEATS * heartbeat_s,
                                                  **{callback: retry(max_retry=SWEEP_MAX_RETRIES)})
            except sqlalchemy.exc.IntegrityError:  # workers on several machines created the new schema at once
                if attempt == 2:
                    raise
                time.sleep(1.0 + attempt)
    except (ImportError, sqlalchemy.exc.NoSuchModuleError) as err:
        extra = ' (pip install "kit[postgres]": psycopg)' if url.startswith("postgres") else ""
        raise KitError(f"{shown_url(url)}: its database driver is not installed{extra}: {err}") from None
    except (sqlalchemy.exc.SQLAlchemyError, RuntimeError, ValueError) as err:
        raise KitError(f"{shown_url(url)}: {database_problem(err)}") from None


def database_problem(err: Exception) -> str:
    """The first line of what the database (or its driver) said."""
    cause = getattr(err, "orig", None) or err
    text = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
    return f"cannot use the database ({type(cause).__name__}: {text})"


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
    heartbeat_s: int = SWEEP_HEARTBEAT_S
    db_wait_s: float = SWEEP_DB_WAIT_S

    def open_study(self, wait_s: float = 120.0):
        """Create the study and queue its trials, or load it; a loader waits for the creator's queue.
        Processes on this machine take turns (a fresh SQLite file's schema is created once); a worker
        elsewhere that loses the schema race tries once more."""
        import sqlalchemy.exc
        with _exclusive(self.folder / ".study.lock"):
            try:
                return self._open_study(wait_s)
            except sqlalchemy.exc.IntegrityError:  # another machine created the schema or the study meanwhile
                time.sleep(1.0)
                return self._open_study(wait_s)
            except sqlalchemy.exc.SQLAlchemyError as err:
                raise KitError(f"{shown_url(self.storage_url)}: {database_problem(err)}") from None

    def _open_study(self, wait_s: float):
        import optuna
        storage = make_storage(self.storage_url, self.heartbeat_s)
        pruner = optuna.pruners.MedianPruner(n_startup_trials=self.prune_startup) if self.prune else optuna.pruners.NopPruner()
        try:
            study = optuna.create_study(study_name=self.study_name, storage=storage, direction="maximize", pruner=pruner)
            study.set_user_attr(KIT_STUDY, True)  # before any trial: a study with trials but without it is not kit's
            self._queue(study, 0)
        except optuna.exceptions.DuplicatedStudyError:
            study = optuna.load_study(study_name=self.study_name, storage=storage, pruner=pruner)
            attrs = study.user_attrs  # a kit study: marked before its first trial (planned_trials: kit before 0.7)
            if KIT_STUDY not in attrs and "planned_trials" not in attrs and study.get_trials(deepcopy=False):
                raise KitError(f"{shown_url(self.storage_url)}: study '{self.study_name}' is not a kit sweep (it has trials "
                               f"kit did not plan): name another --study") from None
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
    """The next trial for this worker: an interrupted one of a dead worker of this machine and sweep folder (resumed
    at once), else a queued one (a dead worker's trial elsewhere is failed by its silent heartbeat, which
    `fail_stale_trials` applies, and queued again by the callback); None when none is free."""
    import optuna
    from optuna.storages._heartbeat import fail_stale_trials, is_heartbeat_enabled
    from optuna.trial import TrialState
    study_id = storage.get_study_id_from_name(sweep.study_name)
    me = f"{socket.gethostname()}:{os.getpid()}"
    here = str(sweep.folder.resolve())
    if is_heartbeat_enabled(storage):
        fail_stale_trials(study)  # trials silent past the grace period: failed, and queued again by the callback
    for frozen in storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
        host, _, pid = frozen.user_attrs.get("worker", ":0").rpartition(":")
        if host == socket.gethostname() and frozen.user_attrs.get("folder", here) == here and not _alive(int(pid)):
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
        storage.set_trial_user_attr(trial_id, "folder", here)
        return optuna.trial.Trial(study, trial_id)
    return None


def planned_number(trial) -> int:
    """The number of the planned trial this one runs: its own, or (queued again after its worker died) its first's."""
    history = trial.storage.get_trial_system_attrs(trial._trial_id).get("retry_history", [])
    return history[0] if history else trial.number


def run_trial(sweep: Sweep, study, trial, echo: Callable[[str], None]) -> str:
    """Train (or resume) one trial's run directory, reporting each epoch; returns a line on how it ended."""
    import optuna

    from kit.training.run import resume, train
    params = suggest(trial, sweep.plan.space, sweep.plan.grid)
    overrides = list(sweep.plan.overrides) + overrides_of(params)
    planned = planned_number(trial)
    first = Path(trial.user_attrs.get("run_dir", sweep.trial_dir(planned)))
    run_dir = first if (first / "recipe.yaml").is_file() else sweep.trial_dir(planned)  # a retry resumes where it can
    trial.set_user_attr("overrides", " ".join(overrides_of(params)))
    trial.set_user_attr("run_dir", str(run_dir.resolve()))
    trial.set_user_attr("device", os.environ.get("CUDA_VISIBLE_DEVICES", ""))
    say = lambda line: echo(f"[trial {planned}] {line}")  # noqa: E731

    def report(run) -> None:
        if "parameters" not in trial.user_attrs:  # counted once, by the process that built the model
            trial.set_user_attr("parameters", run.trainer.num_params)
        row = run.metrics.iloc[-1]
        trial.report(better_weights(row.val_acc, row.ema_val_acc)[0], step=int(row.epoch))
        if row.epoch < run.recipe.train.epochs and trial.should_prune():  # pruning the last epoch saves nothing
            raise optuna.TrialPruned(f"pruned after epoch {int(row.epoch)}")

    with _trial_lock(run_dir) as locked, Heartbeat(trial.storage, trial._trial_id):
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
    """Take and run trials until none is queued or running anywhere, calling `after_trial(sweep, study)` after each
    (the results table); returns how many this worker ran. While trials run elsewhere it waits (one of them may die
    and be queued again); a database that stops answering is waited for (`Sweep.db_wait_s`), then one KitError."""
    from optuna.trial import TrialState
    study, storage = opened or sweep.open_study()
    done, waiting = 0, False
    while True:
        trial = _with_database(sweep, lambda: _take(sweep, study, storage), echo)
        if trial is None:
            states = _with_database(sweep, lambda: [t.state for t in study.get_trials(deepcopy=False)], echo)
            if TrialState.RUNNING not in states:
                break
            if not waiting:
                echo(f"waiting: {states.count(TrialState.RUNNING)} trial(s) running on other workers")
            waiting = True
            time.sleep(sweep.heartbeat_s)
            continue
        waiting = False
        state = _with_database(sweep, lambda: run_trial(sweep, study, trial, echo), echo)
        done += 1
        _with_database(sweep, lambda: after_trial(sweep, study), echo)
        echo(f"[trial {planned_number(trial)}] {state}")
    if done == 0:
        echo(f"nothing to do: all {sweep.plan.trials} planned trials of study '{sweep.study_name}' are done")
    return done


def _with_database(sweep: Sweep, fn: Callable, echo: Callable[[str], None]):
    """fn(), again once the database answers, if it stopped answering on the way (a restart); after `db_wait_s`
    without an answer, one KitError naming the URL (the trial in progress resumes at the next kit sweep)."""
    import optuna
    import sqlalchemy.exc
    down = (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)
    while True:
        try:
            return fn()
        except (*down, optuna.exceptions.StorageInternalError) as err:
            cause = err if isinstance(err, down) else err.__cause__  # Optuna wraps a failed commit's error
            if not isinstance(cause, down):
                raise
            _wait_for_database(sweep, cause, echo)


def _wait_for_database(sweep: Sweep, err: Exception, echo: Callable[[str], None]) -> None:
    import sqlalchemy
    url = shown_url(sweep.storage_url)
    echo(f"{url}: the database stopped answering ({database_problem(err)}); waiting up to {sweep.db_wait_s:g} s")
    deadline, pause = time.monotonic() + sweep.db_wait_s, 0.5
    engine = sqlalchemy.create_engine(sweep.storage_url, poolclass=sqlalchemy.pool.NullPool)
    while time.monotonic() < deadline:
        time.sleep(min(pause, max(deadline - time.monotonic(), 0)))
        pause = min(pause * 2, 8.0)  # backoff
        try:
            with engine.connect():
                echo(f"{url}: the database answers again")
                return
        except sqlalchemy.exc.SQLAlchemyError:
            continue
    raise KitError(f"{url}: the database did not answer for {sweep.db_wait_s:g} s; start it again and run the same "
                   f"kit sweep to continue (finished trials are kept, the trial in progress resumes)")


class Heartbeat:
    """Records the trial's heartbeat every `heartbeat_interval` seconds in a thread while it trains (Optuna's own
    HeartbeatThread stops at the first error; this one keeps beating through a database restart)."""

    def __init__(self, storage, trial_id: int):
        import threading

        from optuna.storages._heartbeat import is_heartbeat_enabled
        self.storage, self.trial_id = storage, trial_id
        self.interval = storage.get_heartbeat_interval() if is_heartbeat_enabled(storage) else None
        self.stop, self.thread = threading.Event(), threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while not self.stop.is_set():
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception:  # the database is restarting: the next beat tries again
                pass
            self.stop.wait(self.interval)

    def __enter__(self):
        if self.interval is not None:
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()
