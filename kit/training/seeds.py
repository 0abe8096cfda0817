"""`kit train RECIPE --seeds 0,1,2 --devices 0,1`: one run per seed, each its own process pinned to one GPU,
at most `jobs` per GPU at once. On a 2x T4 notebook two captured runs (two seeds to ensemble) use the GPUs
better than one DDP run, which cannot be captured. Each run's output goes to RUNS/<name>-s<seed>.log."""

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from kit.device import pinned_env, worker_devices


@dataclass
class SeedRun:
    seed: int
    device: str | None  # the GPU it was pinned to (None: not pinned)
    log: Path
    code: int | None = None  # exit status, once finished


def seed_command(recipe: str, seed: int, name: str, overrides: tuple[str, ...], data_root: str | None, runs_dir: str,
                 device: str) -> list[str]:
    """The `kit train` command line of one seed's run."""
    args = [sys.executable, "-m", "kit.cli", "train", recipe, "--runs", runs_dir, "--device", device,
            *[a for o in overrides for a in ("--set", o)], "--set", f"train.seed={seed}", "--set", f"name={name}-s{seed}"]
    return args + (["--data-root", data_root] if data_root else [])


def train_seeds(recipe: str, name: str, seeds: list[int], devices: tuple[str, ...] = (), jobs: int = 1,
                overrides: tuple[str, ...] = (), data_root: str | None = None, runs_dir: str = "runs", device: str = "auto",
                echo: Callable[[str], None] = print, poll_s: float = 0.5) -> list[SeedRun]:
    """Train every seed as its own run; returns each seed's device and exit status."""
    Path(runs_dir).mkdir(parents=True, exist_ok=True)
    free = worker_devices(devices, jobs)  # one slot per process allowed at once
    waiting = [SeedRun(s, None, Path(runs_dir) / f"{name}-s{s}.log") for s in seeds]
    running: list[tuple[SeedRun, subprocess.Popen, object]] = []
    done: list[SeedRun] = []
    while waiting or running:
        while waiting and free:
            run = waiting.pop(0)
            run.device = free.pop(0)
            env = {**os.environ, **pinned_env(run.device)}
            log = open(run.log, "w")
            process = subprocess.Popen(seed_command(recipe, run.seed, name, overrides, data_root, runs_dir, device), env=env,
                                       stdout=log, stderr=subprocess.STDOUT)
            running.append((run, process, log))
            echo(f"seed {run.seed}{f' on GPU {run.device}' if run.device is not None else ''}: log {run.log}")
        for entry in list(running):
            run, process, log = entry
            if process.poll() is not None:
                log.close()
                run.code = process.returncode
                running.remove(entry)
                free.append(run.device)
                done.append(run)
                last = (run.log.read_text().strip().splitlines() or ["(no output)"])[-1]
                echo(f"seed {run.seed}: exit {run.code}: {last}")
        if running:
            time.sleep(poll_s)
    return sorted(done, key=lambda r: r.seed)
