"""Issue 39: sweeps on a real PostgreSQL server, as a team renting machines runs them. The server is Debian's
PostgreSQL (`.ci/run` installs the package), started here as the unprivileged `postgres` user on 127.0.0.1 and a
free port, with password authentication, in a temporary folder, and stopped afterwards. "Machines" are separate
processes with separate sweep folders, sharing only the database and the data."""

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from kit.cli import RECIPES_DIR

PASSWORD = "kit-secret"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TINY = ("--set", "model.args.width=0.125", "--set", "train.batch_size=32", "--no-prune", "--heartbeat", "1")


def _bin() -> Path | None:
    found = shutil.which("pg_ctl") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), reverse=True)), None)
    return Path(found).resolve().parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A PostgreSQL server of its own (PostgreSQL refuses to run as root: as root, its commands run as `postgres`)."""

    def __init__(self, bindir: Path):
        self.bindir, self.port = bindir, _free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="kit-pg-"))
        self.data = self.folder / "db"
        (self.folder / "pw").write_text(PASSWORD + "\n")
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres")
            shutil.chown(self.folder / "pw", "postgres")
        self.run("initdb", "-D", self.data, "-U", "kit", f"--pwfile={self.folder / 'pw'}", "--auth-host=scram-sha-256",
                 "--auth-local=trust")
        self.start()

    def run(self, tool: str, *args) -> None:
        command = [str(self.bindir / tool), *map(str, args)]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, text=True)

    def start(self) -> None:
        self.run("pg_ctl", "-D", self.data, "-l", self.folder / "log", "-w", "-o",
                 f"-p {self.port} -k {self.folder} -h 127.0.0.1", "start")

    def stop(self) -> None:
        self.run("pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop")

    def url(self, database: str, password: str = PASSWORD) -> str:
        return f"postgresql://kit:{password}@127.0.0.1:{self.port}/{database}"

    def create(self, database: str) -> str:
        import psycopg
        with psycopg.connect(host="127.0.0.1", port=self.port, user="kit", password=PASSWORD, dbname="postgres",
                             autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{database}"')
        return self.url(database)


@pytest.fixture(scope="module")
def postgres():
    pytest.importorskip("psycopg", reason='the PostgreSQL driver: pip install "kit[postgres]" (CI installs it)')
    bindir = _bin()
    if bindir is None:
        pytest.skip("no PostgreSQL server here (Debian's postgresql package: .ci/run installs it)")
    server = Server(bindir)
    yield server
    try:
        server.stop()
    except subprocess.CalledProcessError:
        pass
    shutil.rmtree(server.folder, ignore_errors=True)


def _sweep(url: str, folder: Path, data: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "kit.cli", "sweep", str(RECIPES_DIR / "demo.yaml"), "--grid",
            "optim.lr=0.002,0.003,0.004,0.005", "--set", "train.epochs=4", *TINY, "--name", "team", "--sweeps", str(folder), "--storage", url, "--data-root",
            str(data), "--device", "cpu", *extra]


def _wait_for(predicate, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


@pytest.mark.slow
def test_a_worker_killed_on_another_machine_has_its_trial_run_again(postgres, demo_data, tmp_path):
    """Two workers on 'two machines'; one is SIGKILLed mid-trial: its heartbeat stops, the trial is failed after the
    grace period and queued again, the survivor resumes it from its checkpoint, and results.csv has every planned
    trial once. A worker that starts after the plan is complete does nothing and says so."""
    url = postgres.create("killed")  # both start at once on the new database: its schema and study made by one of them
    a = subprocess.Popen(_sweep(url, tmp_path / "a", demo_data), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    b = subprocess.Popen(_sweep(url, tmp_path / "b", demo_data), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    _wait_for(lambda: any((tmp_path / "a").glob("team/trials/*/last.pt")))
    os.killpg(a.pid, signal.SIGKILL)
    a.wait()
    out, _ = b.communicate(timeout=300)
    assert b.returncode == 0, out
    table = pd.read_csv(tmp_path / "b" / "team" / "results.csv")
    assert sorted(table.trial) == [0, 1, 2, 3] and (table.state == "COMPLETE").all() and (table.epochs == 4).all(), table
    retried = table[table.attempts > 1]
    assert len(retried) == 1 and "resuming" in out, out
    assert str(tmp_path / "a") in retried.run_dir.iloc[0]  # resumed in the dead worker's reachable run folder
    late = subprocess.run(_sweep(url, tmp_path / "c", demo_data), env=ENV, capture_output=True, text=True, timeout=120)
    assert late.returncode == 0 and "nothing to do: all 4 planned trials" in late.stdout, late.stdout + late.stderr


@pytest.mark.slow
def test_a_database_restart_is_waited_for_or_named_in_one_line(postgres, demo_data, tmp_path):
    url = postgres.create("restarted")
    worker = subprocess.Popen(_sweep(url, tmp_path / "a", demo_data, "--db-wait", "60"), env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    _wait_for(lambda: any((tmp_path / "a").glob("team/trials/*/last.pt")))
    postgres.stop()
    time.sleep(3)
    postgres.start()
    out, _ = worker.communicate(timeout=300)
    assert worker.returncode == 0 and "the database stopped answering" in out and "answers again" in out, out
    table = pd.read_csv(tmp_path / "a" / "team" / "results.csv")
    assert sorted(table.trial) == [0, 1, 2, 3] and (table.state == "COMPLETE").all(), table
    url = postgres.create("down")
    worker = subprocess.Popen(_sweep(url, tmp_path / "b", demo_data, "--db-wait", "2"), env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: any((tmp_path / "b").glob("team/trials/*/last.pt")))
    postgres.stop()
    try:
        out, err = worker.communicate(timeout=120)
    finally:
        postgres.start()
    lines = err.strip().splitlines()
    assert worker.returncode == 2 and len(lines) == 1 and "did not answer for 2 s" in lines[0], out + err
    assert PASSWORD not in err and f"127.0.0.1:{postgres.port}/down" in lines[0]
    again = subprocess.run(_sweep(url, tmp_path / "b", demo_data), env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    table = pd.read_csv(tmp_path / "b" / "team" / "results.csv")
    assert sorted(table.trial) == [0, 1, 2, 3] and (table.state == "COMPLETE").all(), table


def test_a_wrong_url_password_driver_or_study_is_one_line(postgres, demo_data, tmp_path, run, monkeypatch,
                                                          assert_one_line_error):
    import optuna
    url = postgres.create("other")
    args = ("sweep", RECIPES_DIR / "demo.yaml", "--grid", "optim.lr=0.002", "--sweeps", tmp_path, "--data-root", demo_data)
    code, out = run(*args, "--storage", postgres.url("other", password="wrong"))
    assert_one_line_error(code, out, "password authentication failed", "kit:***@")
    code, out = run(*args, "--storage", f"postgresql://kit:{PASSWORD}@127.0.0.1:{_free_port()}/other")
    assert_one_line_error(code, out, "cannot use the database", "Connection refused")
    study = optuna.create_study(study_name="demo", storage=url)  # someone else's study of the same name
    study.add_trial(optuna.trial.create_trial(value=1.0, params={}, distributions={}))
    code, out = run(*args, "--storage", url)
    assert_one_line_error(code, out, "study 'demo' is not a kit sweep")
    monkeypatch.setitem(sys.modules, "psycopg", None)  # no driver
    monkeypatch.setitem(sys.modules, "psycopg2", None)
    code, out = run(*args, "--storage", url)
    assert_one_line_error(code, out, 'pip install "kit[postgres]"')


def test_optuna_dashboard_shows_the_sweep(postgres, demo_data, tmp_path, run):
    """The README's command, optuna-dashboard on the study's storage, answers for the sweep's trials on its HTTP API."""
    url = postgres.create("watched")
    code, out = run("sweep", RECIPES_DIR / "demo.yaml", "--grid", "optim.lr=0.002,0.004", "--set", "train.epochs=1", *TINY,
                    "--name", "watched", "--sweeps", tmp_path, "--storage", url, "--data-root", demo_data, "--device", "cpu")
    assert code == 0, out
    port = _free_port()
    dashboard = subprocess.Popen([str(Path(sys.executable).parent / "optuna-dashboard"), url, "--host", "127.0.0.1",
                                  "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def get(path: str):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
                return json.loads(response.read())

        def up() -> bool:
            try:
                return bool(get("/api/studies"))
            except OSError:
                return False
        _wait_for(up, timeout=60)
        (study,) = [s for s in get("/api/studies")["study_summaries"] if s["study_name"] == "watched"]
        trials = get(f"/api/studies/{study['study_id']}")["trials"]
        assert sorted(t["state"] for t in trials) == ["Complete", "Complete"]
    finally:
        dashboard.terminate()
        dashboard.wait()
