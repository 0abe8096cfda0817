"""`kit sweep` on demo data: grids, TPE spaces, pruning, continuing, concurrent workers, interrupted trials."""

import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from kit.cli import RECIPES_DIR
from kit.errors import KitError
from kit.inference.evaluate import evaluate
from kit.sweep import parse_grid, read_space, sweep

DEMO = str(RECIPES_DIR / "demo.yaml")
ENV = {**os.environ, "PYTHONPATH": str(RECIPES_DIR.parent), "OMP_NUM_THREADS": "1"}


def _sweep_cmd(out, *args) -> list[str]:
    return [sys.executable, "-m", "kit.cli", "sweep", DEMO, "--sweeps", str(out), "--device", "cpu", *map(str, args)]


def test_grid_gives_one_run_per_point_and_a_table(demo_data, tmp_path, quiet):
    lines = []
    table = sweep(DEMO, overrides=("train.epochs=1",), grid=("optim.lr=0.004,0.002", "augment.cutout_size=0,8"),
                  out_root=str(tmp_path), data_root=str(demo_data), device="cpu", prune=False, echo=lines.append)
    folder = tmp_path / "demo"
    assert len(table) == 4 and set(table.state) == {"COMPLETE"} and (table.epochs == 1).all()
    assert sorted(table.overrides) == sorted(f"optim.lr={lr} augment.cutout_size={c}" for lr in (0.004, 0.002) for c in (0, 8))
    assert sorted(p.name for p in (folder / "trials").iterdir()) == [f"trial-000{i}" for i in range(4)]
    assert all((folder / "trials" / f"trial-000{i}" / "best.pt").is_file() for i in range(4))
    saved = pd.read_csv(folder / "results.csv")
    assert len(saved) == 4 and (saved.parameters == 78_042).all() and saved.best_val_acc.between(0, 1).all()
    markdown = (folder / "results.md").read_text()
    best = saved.loc[saved.best_val_acc.idxmax()]
    assert f"Best: trial {best.trial} (" in markdown and best.run_dir in markdown and (folder / "curves.png").is_file()
    listed = (folder / "completed_runs.txt").read_text().splitlines()  # what predict/evaluate read for the folder
    assert sorted(listed) == sorted(saved.run_dir)
    # a sweep folder stands for its completed trials in kit evaluate --select
    evaluated = evaluate([str(folder)], tta="none", select=True, device="cpu", echo=quiet)
    assert list(evaluated.checkpoint[:4]) == [f"trial-000{i}" for i in range(4)]
    # running the same sweep again does no work
    again = sweep(DEMO, overrides=("train.epochs=1",), grid=("optim.lr=0.004,0.002", "augment.cutout_size=0,8"),
                  out_root=str(tmp_path), data_root=str(demo_data), device="cpu", prune=False, echo=lines.append)
    pd.testing.assert_frame_equal(again, table)
    assert len(pd.read_csv(folder / "trials" / "trial-0000" / "metrics.csv")) == 1


def test_workers_pinned_to_devices_run_the_trials(demo_data, tmp_path):
    """--devices 0,1 (stand-ins on the CPU): one worker process per device, each trial records the GPU it ran on."""
    lines = []
    table = sweep(DEMO, overrides=("train.epochs=1",), grid=("optim.lr=0.004,0.002",), out_root=str(tmp_path), jobs=1,
                  devices=("0", "1"), data_root=str(demo_data), device="cpu", prune=False, echo=lines.append)
    assert len(table) == 2 and set(table.state) == {"COMPLETE"} and table.overrides.is_unique
    assert set(table.device.astype(str)) <= {"0", "1"} and "2 at a time on GPUs 0, 1" in lines[0]


def test_a_hopeless_trial_is_pruned(demo_data, tmp_path, quiet):
    table = sweep(DEMO, overrides=("train.epochs=3",), grid=("optim.lr=0.004,1e-9",), out_root=str(tmp_path),
                  data_root=str(demo_data), device="cpu", prune_startup=1, echo=quiet)
    assert table.state.tolist() == ["COMPLETE", "PRUNED"] and table.epochs.tolist() == [3, 1]
    assert "| PRUNED |" in (tmp_path / "demo" / "results.md").read_text()


def test_tpe_space_runs_the_planned_trials(demo_data, tmp_path, quiet):
    space = tmp_path / "space.yaml"
    space.write_text("optim.lr: {low: 0.001, high: 0.01, log: true}\naugment.cutout_size: {choices: [0, 8]}\n")
    table = sweep(DEMO, overrides=("train.epochs=1",), space=str(space), trials=2, out_root=str(tmp_path),
                  data_root=str(demo_data), device="cpu", prune=False, echo=quiet)
    assert len(table) == 2 and set(table.state) == {"COMPLETE"}
    assert all("optim.lr=" in o and "augment.cutout_size=" in o for o in table.overrides)


@pytest.mark.parametrize("kwargs, message", [
    ({"grid": ("optim.lr",)}, "expected KEY=V1,V2"),
    ({}, "give either --grid"),
    ({"space": "x.yaml"}, "--space needs --trials"),
    ({"grid": ("optim.lr=fast",)}, "optim.lr: expected float"),
])
def test_bad_sweeps_fail_before_any_trial(tmp_path, kwargs, message, quiet):
    with pytest.raises(KitError, match=message):
        sweep(DEMO, out_root=str(tmp_path), device="cpu", echo=quiet, **kwargs)
    assert not (tmp_path / "demo").exists()


def test_bad_space_file(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("optim.lr: {low: 0.1}\n")
    with pytest.raises(KitError, match=r"s\.yaml: optim\.lr: expected \{low: A, high: B\}"):
        read_space(str(path))
    assert parse_grid(("optim.lr=1e-3,0.1",)) == {"optim.lr": [0.001, 0.1]}


@pytest.mark.slow
def test_two_processes_share_one_study_without_duplicates(demo_data, tmp_path):
    args = ("--set", "train.epochs=1", "--grid", "optim.lr=0.004,0.003,0.002,0.001", "--data-root", demo_data, "--no-prune")
    workers = [subprocess.Popen(_sweep_cmd(tmp_path, *args), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for _ in range(2)]
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    table = pd.read_csv(tmp_path / "demo" / "results.csv")
    assert len(table) == 4 and set(table.state) == {"COMPLETE"} and table.overrides.is_unique
    started = [line for out in outputs for line in out.splitlines() if " parameters, 1,197 training" in line]
    assert len(started) == 4  # each trial trained once, by one of the two


@pytest.mark.slow
def test_an_interrupted_trial_resumes_its_run(demo_data, tmp_path):
    args = ("--set", "train.epochs=4", "--grid", "optim.lr=0.004", "--data-root", demo_data, "--no-prune")
    worker = subprocess.Popen(_sweep_cmd(tmp_path, *args), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    metrics = tmp_path / "demo" / "trials" / "trial-0000" / "metrics.csv"
    deadline = time.monotonic() + 120
    while not (metrics.parent / "last.pt").is_file() and time.monotonic() < deadline:  # the first checkpoint
        time.sleep(0.2)
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait()
    epochs_before = len(pd.read_csv(metrics))
    assert 1 <= epochs_before < 4
    result = subprocess.run(_sweep_cmd(tmp_path, *args), env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[trial 0] resuming" in result.stdout
    table = pd.read_csv(tmp_path / "demo" / "results.csv")
    assert table.state.tolist() == ["COMPLETE"] and table.epochs.tolist() == [4]
    assert list(pd.read_csv(metrics).epoch) == [1, 2, 3, 4]


def test_the_optuna_internals_the_queue_relies_on(tmp_path):
    """kit.sweep.queue claims trials through Optuna's storage (see its docstring); these are the behaviours it needs."""
    import optuna
    from optuna.trial import TrialState
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="pin", storage=f"sqlite:///{tmp_path / 'pin.db'}", direction="maximize")
    study.enqueue_trial({"x": 1})
    storage = study._storage  # the study's own storage (cache-wrapped for SQLite)
    assert isinstance(storage, optuna.storages.BaseStorage)
    study_id = storage.get_study_id_from_name("pin")
    (waiting,) = storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.WAITING,))
    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, waiting.number)
    assert storage.set_trial_state_values(trial_id, state=TrialState.RUNNING) is True  # the first claim wins...
    assert storage.set_trial_state_values(trial_id, state=TrialState.RUNNING) is False  # ...a second one is refused
    trial = optuna.trial.Trial(study, trial_id)  # a Trial for a trial claimed by id
    assert trial.suggest_categorical("x", [1, 2]) == 1  # the queued grid point
    study.tell(trial, 0.5)
    assert study.trials[0].state == TrialState.COMPLETE
