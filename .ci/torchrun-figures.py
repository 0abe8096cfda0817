"""The README's two-node figures (issue 39), on this machine's CPU: the demo recipe (8 epochs) trained by two torchrun
launchers on 127.0.0.1 (c10d rendezvous, gloo, one process each, as tests/test_distributed.py starts them), once
uninterrupted and once with node 1's process SIGKILLed from outside in the middle of epoch 5 (`--max-restarts 1`:
torchrun restarts the group and kit resumes the run from its last.pt). Prints each run's wall time, whether the
restarted run's metrics.csv equals the uninterrupted one's, and the final accuracies.
Usage: python .ci/torchrun-figures.py [N] (N runs of each, default 3)."""

import os
import re
import signal
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from test_distributed import ENV, METRICS, launch_two_nodes  # noqa: E402  (the tests' own launchers)

from kit.data.datasets import make_demo_data  # noqa: E402

SETTINGS = ["--device", "cpu"]  # the demo recipe as it is: 8 epochs, batch 16 (8 a process)
KILL_AFTER = 4  # epochs done when node 1's process is killed, half an epoch later


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (torchrun's workers of one launcher)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def kill_mid_epoch(launchers, logs) -> None:
    """SIGKILL node 1's process half an epoch after rank 0 printed epoch KILL_AFTER (whichever node rank 0 is on)."""
    pattern = re.compile(rf"^epoch {KILL_AFTER}/\d+ .* ([\d.]+)s [\d,]+ img/s$", re.M)
    while not (found := next((m for log in logs if (m := pattern.search(log.read_text()))), None)):
        if any(launcher.poll() is not None for launcher in launchers):
            raise SystemExit("the run ended before it could be killed")
        time.sleep(0.05)
    time.sleep(float(found.group(1)) / 2)
    (worker,) = children(launchers[1].pid)
    os.kill(worker, signal.SIGKILL)


def two_node_run(data: Path, runs: Path, name: str, kill: bool) -> tuple[float, pd.DataFrame, str]:
    logs = [runs / f"{name}-node{node}.log" for node in range(2)]
    start = time.monotonic()
    launchers = launch_two_nodes(data, [runs, runs], name, logs, settings=SETTINGS, env=ENV)
    if kill:
        kill_mid_epoch(launchers, logs)
    codes = [launcher.wait() for launcher in launchers]
    seconds = time.monotonic() - start
    output = "".join(log.read_text() for log in logs)
    if codes != [0, 0]:
        raise SystemExit(f"{name}: the launchers exited {codes}:\n{output}")
    resumed = re.findall(r"^resuming .*$", output, re.M)
    return seconds, pd.read_csv(runs / name / "metrics.csv"), "; ".join(resumed) or "no restart"


def main(n: int) -> None:
    with tempfile.TemporaryDirectory() as work:
        data = make_demo_data(Path(work) / "data")
        runs = Path(work) / "runs"
        runs.mkdir()
        for i in range(n):
            whole_s, whole, _ = two_node_run(data, runs, f"whole{i}", kill=False)
            killed_s, killed, restart = two_node_run(data, runs, f"killed{i}", kill=True)
            same = whole[METRICS].equals(killed[METRICS])
            last = killed.iloc[-1]
            print(f"run {i + 1}: uninterrupted {whole_s:.1f} s, restarted once {killed_s:.1f} s ({restart}); "
                  f"metrics.csv equal: {same}; final val_acc {last.val_acc:.2%}, ema_val_acc {last.ema_val_acc:.2%}",
                  flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
