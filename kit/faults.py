"""Stopping a run cleanly, and the test hook that interrupts one at a named moment.

`StopRequest` turns SIGTERM (a notebook's stop button, a preemptible GPU, Slurm, a Kaggle time limit) and SIGINT
(Ctrl-C) into a flag the training loop reads between updates: the update in progress finishes, the run saves
its position inside the epoch and raises `Stopped`, and the command exits 143 or 130. A second signal while
saving only sets the flag again.

`fault_point(name)` is the fault-injection hook of tests/test_faults.py: when the environment variable
KIT_FAULT names this moment (`update:12`, `write:last.pt`, `saved:best.pt@2`, ...), the process kills itself with
SIGKILL there (or raises SIGTERM/SIGINT for `sigterm:`/`sigint:` moments), exactly as an outside kill at that
moment would. Under torchrun, only the first group is interrupted: a group restarted by --max-restarts (its
TORCHELASTIC_RESTART_COUNT above 0) is the recovery under test. Unset, it costs one environment lookup."""

import os
import signal
import threading
from contextlib import contextmanager
from typing import Iterator

FAULT_ENV = "KIT_FAULT"
RESTART_ENV = "TORCHELASTIC_RESTART_COUNT"  # set by torchrun in its workers: 0, then 1, 2, ... after each --max-restarts
EXIT_CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}  # 128 + the signal's number, the shell's convention


class Stopped(BaseException):
    """A run stopped on a signal after saving where it stood (a BaseException, like KeyboardInterrupt, so that no
    `except Exception` on the way swallows it)."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum, self.exit_code = signum, EXIT_CODES.get(signum, 1)


class StopRequest:
    """The flag SIGTERM/SIGINT set while a run trains (handlers installed only in the main thread)."""

    def __init__(self):
        self.signum: int | None = None

    def __bool__(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, _frame) -> None:
        if self.signum is None:
            self.signum = signum

    @contextmanager
    def installed(self) -> Iterator["StopRequest"]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self._handle) for s in EXIT_CODES}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


_hits: dict[str, int] = {}  # times each moment was passed under the current KIT_FAULT
_spec = [""]


def fault_point(name: str) -> None:
    """Interrupt this process here if KIT_FAULT names this moment (tests only; see the module's docstring).
    KIT_FAULT is a comma-separated list of `[sigterm:|sigint:]NAME[@K]`: SIGKILL (or the signal) at the K-th time
    (default the first) the run passes NAME."""
    wanted = os.environ.get(FAULT_ENV)
    if not wanted or os.environ.get(RESTART_ENV, "0") != "0":  # torchrun's restarted group is the recovery under test
        return
    if wanted != _spec[0]:  # a new fault plan counts from zero
        _spec[0] = wanted
        _hits.clear()
    _hits[name] = _hits.get(name, 0) + 1
    for entry in wanted.split(","):
        action, _, target = entry.partition(":") if entry.startswith(("sigterm:", "sigint:")) else ("", "", entry)
        point, _, nth = target.partition("@")
        if point == name and _hits[name] == int(nth or 1):
            if action:
                signal.raise_signal(getattr(signal, action.upper()))
            else:
                os.kill(os.getpid(), signal.SIGKILL)
