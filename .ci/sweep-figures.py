"""The README's PostgreSQL sweep figures (issue 39), on this machine's CPU: a sweep of 8 trials on a real PostgreSQL
server (started as tests/test_postgres.py starts it) with 3 workers on 'three machines' (separate processes and sweep
folders, sharing the database and the data), once with no kill and once with one worker SIGKILLed twice (killed in
a trial, replaced by a worker on a fresh machine and folder, killed again in its first trial): each killed trial is
failed by its silent heartbeat and queued again. Prints each sweep's wall time and its results.
Usage: python .ci/sweep-figures.py (needs Debian's postgresql package and kit[postgres])."""

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from test_postgres import Server, _bin  # noqa: E402  (the tests' own server)

LRS = "0.001,0.0015,0.002,0.0025,0.003,0.0035,0.004,0.005"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def worker(url: str, folder: Path, data: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "kit.cli", "sweep", str(ROOT / "recipes" / "demo.yaml"), "--grid", f"optim.lr={LRS}",
               "--set", "train.epochs=6", "--set", "model.args.width=0.25", "--no-prune", "--heartbeat", "1",
               "--name", "eight", "--sweeps", str(folder), "--storage", url, "--data-root", str(data), "--device", "cpu"]
    folder.mkdir(parents=True, exist_ok=True)
    log = open(folder / "worker.log", "w")
    return subprocess.Popen(command, env=ENV, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def kill_after_an_epoch(process: subprocess.Popen, folder: Path) -> bool:
    """SIGKILL the worker once it finished an epoch of a trial (its checkpoint is saved); False when it ended first."""
    while "] epoch " not in (folder / "worker.log").read_text():
        if process.poll() is not None:
            return False
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    return True


def sweep(server: Server, name: str, data: Path, work: Path, kills: int) -> tuple[float, pd.DataFrame]:
    url = server.create(name)
    folders = [work / name / machine for machine in "abc"]
    start = time.monotonic()
    workers = [worker(url, f, data) for f in folders]
    killed = 0
    for n in range(kills):  # machine a: killed in a trial, replaced by a fresh machine, whose worker is killed too
        killed += kill_after_an_epoch(workers[0], folders[0])
        folders.append(work / name / f"a{n + 2}")  # a fresh machine: its own folder (the dead trial: by heartbeat)
        folders[0], folders[-1] = folders[-1], folders[0]
        workers[0] = worker(url, folders[0], data)
    print(f"{name}: worker a killed {killed} times")
    for w in workers:
        w.wait()
    seconds = time.monotonic() - start
    tables = [pd.read_csv(f / "eight" / "results.csv") for f in folders if (f / "eight" / "results.csv").is_file()]
    return seconds, max(tables, key=len)


def main() -> None:
    from kit.data.datasets import make_demo_data
    assert _bin() is not None, "no PostgreSQL server binaries (Debian's postgresql package)"
    work = Path(tempfile.mkdtemp(prefix="kit-sweep-figures-"))
    data = make_demo_data(work / "data")
    server = Server(_bin())
    try:
        for name, kills in (("nokill", 0), ("killed", 2)):
            seconds, table = sweep(server, name, data, work, kills)
            once = sorted(table.trial) == list(range(8))
            print(f"{name}: {seconds:.0f} s wall, {len(table)} rows, every planned trial once: {once}, states "
                  f"{table.state.value_counts().to_dict()}, attempts {table.attempts.tolist()}")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
