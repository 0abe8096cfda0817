"""Runs side by side, one process each: `kit train RECIPE --seeds 0,1,2 --devices 0,1` (one run per seed) and `kit
train RECIPE --folds K --devices 0,1` (one run per fold), each process pinned to one GPU, at most `jobs` per GPU at
once. On a 2x T4 notebook two captured runs (two seeds to ensemble) use the GPUs better than one DDP run, which
cannot be captured. Each run's output goes to its own log file."""

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from kit.device import pinned_env, worker_devices


@dataclass
class Job:
    name: str  # how it is printed: "seed 3", "fold 2"
    command: list[str]
    log: Path
    device: str | None = None  # the GPU it was pinned to (None: not pinned)
    code: int | None = None  # exit status, once finished


def run_jobs(jobs: list[Job], devices: tuple[str, ...] = (), per_device: int = 1, echo: Callable[[str], None] = print,
             poll_s: float = 0.5) -> list[Job]:
    """Run every job as its own process, at most `per_device` at once on each device; returns them with their exit
    status, in the order given."""
    free = worker_devices(devices, per_device)  # one slot per process allowed at once
    waiting, running = list(jobs), []
    while waiting or running:
        while waiting and free:
            job = waiting.pop(0)
            job.device = free.pop(0)
            job.log.parent.mkdir(parents=True, exist_ok=True)
            log = open(job.log, "w")
            process = subprocess.Popen(job.command, env={**os.environ, **pinned_env(job.device)}, stdout=log,
                                       stderr=subprocess.STDOUT)
            running.append((job, process, log))
            echo(f"{job.name}{f' on GPU {job.device}' if job.device is not None else ''}: log {job.log}")
        for entry in list(running):
            job, process, log = entry
            if process.poll() is not None:
                log.close()
                job.code = process.returncode
                running.remove(entry)
                free.append(job.device)
                last = (job.log.read_text().strip().splitlines() or ["(no output)"])[-1]
                echo(f"{job.name}: exit {job.code}: {last}")
        if running:
            time.sleep(poll_s)
    return jobs


def kit_command(*args: str, overrides: tuple[str, ...] = (), data_root: str | None = None) -> list[str]:
    """A `kit` command line run by this Python."""
    return [sys.executable, "-m", "kit.cli", *args, *[a for o in overrides for a in ("--set", o)],
            *(["--data-root", data_root] if data_root else [])]


def seed_command(recipe: str, seed: int, name: str, overrides: tuple[str, ...], data_root: str | None, runs_dir: str,
                 device: str) -> list[str]:
    """The `kit train` command line of one seed's run."""
    return kit_command("train", recipe, "--runs", runs_dir, "--device", device, data_root=data_root,
                       overrides=(*overrides, f"train.seed={seed}", f"name={name}-s{seed}"))


def train_seeds(recipe: str, name: str, seeds: list[int], devices: tuple[str, ...] = (), jobs: int = 1,
                overrides: tuple[str, ...] = (), data_root: str | None = None, runs_dir: str = "runs", device: str = "auto",
                echo: Callable[[str], None] = print, poll_s: float = 0.5) -> list[Job]:
    """Train every seed as its own run (RUNS/<name>-s<seed>.log); returns each seed's job, with its exit status."""
    Path(runs_dir).mkdir(parents=True, exist_ok=True)
    runs = [Job(f"seed {s}", seed_command(recipe, s, name, overrides, data_root, runs_dir, device),
                Path(runs_dir) / f"{name}-s{s}.log") for s in sorted(seeds)]
    return run_jobs(runs, devices, jobs, echo, poll_s)
