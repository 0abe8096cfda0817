"""`kit lr-find`: an LR range test (Smith, 2017; fastai's `lr_find`, Lightning's `Tuner.lr_find`) run by the engine's
own update. The recipe's model (from the same initial weights as training: the recipe's seed), data, augmentation and
optimizer; the LR rises exponentially, one value per update, through the same device table the captured update reads;
the sweep stops once the loss diverges (fastai's running average passes `diverge` times its lowest). Two named rules
suggest a rate, as fastai's suggestion functions do: `minimum` (the LR of the lowest smoothed loss, divided by 10) and
`steep` (the LR where the smoothed loss falls fastest against log LR).

The rules read the loss averaged over a window centred on each update (`WINDOW_DECADES` of LR wide), not the running
average the stop rule reads: a running average lags its input, and at fastai's 0.98 it trails by ~50 updates, two
decades of a 200-update sweep, so its lowest point (and the minimum rule with it) lands one or two decades too late.
On the demo the lagging average over 200 updates suggested 0.062, where the recipe scores 91.7-95.7% against 99.0-99.7%
at its own 0.003; the centred one over 800 updates suggests 0.0024-0.0070, which scores as the recipe's own rate (README,
"Choosing the learning rate")."""

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from kit.data.datasets import load_dataset
from kit.device import resolve_device
from kit.errors import KitError
from kit.recipe import LR_FIND_RULES, LR_FIND_UPDATES, Recipe
from kit.training.engine import EpochResult, Hooks, Trainer, build_trainer
from kit.training.run import check_batch, progress_bar, silent, with_data_root

SMOOTHING = 0.98  # the stop rule's running average of the loss, debiased (fastai's beta)
WINDOW_DECADES = 1.0  # the rules' smoothing: the mean loss of the updates within half a decade of LR either side
CHECK_EVERY = 10  # updates between reads of the losses (each read waits for the device)
PROGRESS_LINES = 10  # without a bar: a line each tenth of the sweep
PEAK_SCHEDULES = ("onecycle",)  # schedules whose optim.lr is a peak reached mid-run, not the starting rate


@dataclass(frozen=True)
class LRFind:
    """The sweep: the LR and training loss of each update run, the smoothed loss, and the suggested rates."""
    recipe: str
    lrs: np.ndarray  # (U,) the LR of each update run
    losses: np.ndarray  # (U,) its training loss (the batch mean)
    smoothed: np.ndarray  # (U,) the losses averaged over WINDOW_DECADES of LR centred on each update (NaN: not finite)
    minimum: float  # the LR of the lowest smoothed loss / 10
    steep: float  # the LR of the steepest fall of the smoothed loss against log10(LR)
    diverged: bool  # the running average of the loss passed `diverge` x its lowest (or was not finite)
    planned: int  # updates the sweep was planned for
    schedule: str  # the recipe's schedule (a one-cycle's optim.lr is its peak)

    def suggestion(self, rule: str = "minimum") -> float:
        if rule not in LR_FIND_RULES:
            raise KitError(f"--rule {rule}: choose one of {', '.join(LR_FIND_RULES)}")
        return self.minimum if rule == "minimum" else self.steep

    def describe(self, rule: str = "minimum") -> list[str]:
        """What the CLI prints: the sweep, the suggestion and the exact override to use."""
        lr = self.suggestion(rule)
        why = {"minimum": "the LR of the lowest smoothed loss / 10", "steep": "where the smoothed loss falls fastest"}[rule]
        other = LR_FIND_RULES[1 - LR_FIND_RULES.index(rule)]
        lines = [f"lr-find {self.recipe}: {len(self.lrs)} of {self.planned} updates from {self.lrs[0]:.2g} to {self.lrs[-1]:.2g}"
                 + self._ending(),
                 f"suggested optim.lr: {lr:.3g} (rule {rule}: {why}); rule {other}: {self.suggestion(other):.3g}"]
        if self.schedule in PEAK_SCHEDULES:
            lines.append(f"schedule {self.schedule}: optim.lr is the cycle's peak; the suggestion is for that peak (the "
                         f"cycle starts lower and ends far lower)")
        lines.append(f"use: --set optim.lr={lr:.3g}")
        return lines

    def _ending(self) -> str:
        if not self.diverged:
            return ""
        return " (stopped: the loss diverged)" if len(self.lrs) < self.planned else " (the loss diverged at its end)"

    def plot(self, path: str | Path | None = None):
        """The loss and its smoothed curve against the LR (log scale), both suggestions marked: a matplotlib Figure
        (shown inline when a notebook cell returns it), also written as a PNG at `path` when given."""
        from kit.inference.plots import plot_lr_find
        return plot_lr_find(self, None if path is None else Path(path))

    def __repr__(self) -> str:
        """One line: the suggestion (`describe()` has the rest; the arrays are attributes)."""
        return (f"LRFind({self.recipe}: suggested optim.lr {self.minimum:.3g} (rule minimum), {self.steep:.3g} (rule steep); "
                f"{len(self.lrs)} of {self.planned} updates{self._ending()})")


def running_average(losses: np.ndarray, beta: float = SMOOTHING) -> np.ndarray:
    """Debiased exponential moving average (fastai's smoothing of the LR finder's loss): what the stop rule reads, as
    it needs only the updates run so far."""
    out, avg = np.empty(len(losses)), 0.0
    for i, loss in enumerate(losses):
        avg = beta * avg + (1 - beta) * loss
        out[i] = avg / (1 - beta ** (i + 1))
    return out


def centered_average(lrs: np.ndarray, losses: np.ndarray, decades: float = WINDOW_DECADES) -> np.ndarray:
    """Each update's loss averaged with those whose LR lies within `decades / 2` of its own (on log10), fewer at the
    sweep's ends; a window holding a non-finite loss gives NaN. Centred, so a dip stays where it is."""
    log_lrs = np.log10(lrs)
    first = np.searchsorted(log_lrs, log_lrs - decades / 2, side="left")
    last = np.searchsorted(log_lrs, log_lrs + decades / 2, side="right")
    with np.errstate(invalid="ignore", over="ignore"):
        means = np.array([losses[a:b].mean() for a, b in zip(first, last)])
    return np.where(np.isfinite(means), means, np.nan)


def suggestions(lrs: np.ndarray, smoothed: np.ndarray) -> tuple[float, float]:
    """(minimum, steep): the LR of the lowest smoothed loss / 10, and the LR of the most negative slope of the smoothed
    loss against log10(LR) before that lowest point (the lowest point's own LR when no slope before it is finite)."""
    finite = np.isfinite(smoothed)
    lowest = int(np.nanargmin(np.where(finite, smoothed, np.inf)))
    end = max(lowest, 2)
    slopes = np.gradient(smoothed[:end + 1], np.log10(lrs[:end + 1]))
    steepest = int(np.nanargmin(slopes)) if np.isfinite(slopes).any() else lowest  # no finite fall before the lowest
    return float(lrs[lowest] / 10), float(lrs[steepest])


def lr_find(recipe: Recipe, data_root: str | Path | None = None, device: str = "auto", start_lr: float = 1e-7,
            end_lr: float = 10.0, updates: int = LR_FIND_UPDATES, diverge: float = 4.0,
            echo: Callable[[str], None] = print) -> LRFind:
    """Sweep the LR from `start_lr` to `end_lr` over `updates` updates of the recipe's own update (across epochs as
    needed), stopping when the running average of the loss exceeds `diverge` times its lowest."""
    if not 0 < start_lr < end_lr or updates < 10 or diverge <= 1:
        raise KitError(f"lr-find: need 0 < start_lr < end_lr ({start_lr:g}, {end_lr:g}), at least 10 updates ({updates}) "
                       f"and diverge > 1 ({diverge:g})")
    recipe = with_data_root(recipe, data_root)
    dataset = load_dataset(recipe.data)
    check_batch(recipe, len(dataset.train))
    trainer = build_trainer(recipe, dataset, resolve_device(device), recipe.name, echo=silent)  # sizes the head to the data
    lrs = start_lr * (end_lr / start_lr) ** (np.arange(updates) / (updates - 1))
    trainer.lr.use_table(torch.from_numpy(lrs))
    sweep = RangeTest(updates, diverge, trainer.prec.device, lrs, progress_bar(updates, f"lr-find {recipe.name}"), echo)
    trainer.num_epochs = -(-updates // trainer.updates_per_epoch)  # across epochs as needed
    try:
        trainer.fit(sweep)  # the Trainer's own epoch loop, this sweep as its hooks
    finally:
        sweep.close()
    done, losses = sweep.done, sweep.losses
    smoothed = centered_average(lrs[:done], losses)
    if not np.isfinite(smoothed).any():
        raise KitError(f"{recipe.name}: the loss was not finite from the first update (at LR {start_lr:g}); lower --start-lr")
    minimum, steep = suggestions(lrs[:done], smoothed)
    return LRFind(recipe.name, lrs[:done], losses, smoothed, minimum, steep, sweep.diverged, updates, recipe.schedule.name)


class RangeTest(Hooks):
    """lr-find's hooks on the Trainer's loop: each update's running epoch loss kept on the device, read every
    CHECK_EVERY updates (each read waits for the device), the sweep stopped once it has run `updates` or diverged."""

    def __init__(self, updates: int, diverge: float, device: torch.device, lrs: np.ndarray, bar=None,
                 echo: Callable[[str], None] = print):
        self.updates, self.diverge, self.lrs, self.bar, self.echo = updates, diverge, lrs, bar, echo
        self.sums = torch.zeros(updates, device=device)  # each update's running epoch sum of batch losses
        self.done, self.diverged, self.losses, self.reported = 0, False, np.empty(0), 0

    def after_update(self, trainer: Trainer, done: int) -> bool:
        self.sums[self.done] = trainer.loss_sum
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        if self.done % CHECK_EVERY == 0 or self.done == self.updates:
            self.losses = _per_update(self.sums[:self.done].cpu().numpy(), trainer.updates_per_epoch)
            running = running_average(self.losses)
            finite = running[np.isfinite(running)]
            self.diverged = not np.isfinite(running[-1]) or running[-1] > self.diverge * finite.min()
            self.show(running[-1])
        # the sweep ends only after a check (its last update, or a divergence found by one): `losses` holds every update
        return self.diverged or self.done == self.updates

    def after_epoch(self, trainer: Trainer, result: EpochResult) -> bool:
        return not (self.diverged or self.done == self.updates)

    def show(self, loss: float) -> None:
        """Where the sweep stands: on its bar, or (no bar: a log, a notebook without ipywidgets) one line per tenth."""
        lr = self.lrs[self.done - 1]
        if self.bar is not None:
            self.bar.set_postfix(lr=f"{lr:.2g}", loss=f"{loss:.3f}")
        elif self.done * PROGRESS_LINES // self.updates > self.reported:
            self.reported = self.done * PROGRESS_LINES // self.updates
            self.echo(f"lr-find: {self.done} of {self.updates} updates, LR {lr:.2g}, loss {loss:.3f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _per_update(sums: np.ndarray, updates_per_epoch: int) -> np.ndarray:
    """Each update's loss from the epoch's running sums (the Trainer's loss_sum, zeroed at each epoch's start)."""
    before = np.concatenate([[0.0], sums[:-1]])
    before[np.arange(len(sums)) % updates_per_epoch == 0] = 0.0
    return sums - before
