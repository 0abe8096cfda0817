"""Wiring a run: recipe -> data + session -> epochs -> run directory (recipe.yaml, metrics.csv,
best.pt, last.pt, curves.png). Resume continues a run directory from last.pt, bit-exactly."""

import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from kit.checkpoint import read_payload, restore_rng, rng_state, save_checkpoint, training_payload
from kit.data import load_dataset
from kit.device import deterministic, resolve_device
from kit.engine import EpochResult, TrainState, predict_probs, probs_loss_acc, train_one_epoch
from kit.errors import KitError
from kit.io import write_text
from kit.optim import current_lr, load_optimizer_state
from kit.plots import plot_curves
from kit.recipe import Recipe, load_recipe, recipe_as_dict, save_recipe
from kit.session import Session, build_session
from kit.tensorboard import EpochLog

METRIC_COLUMNS = ["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "ema_val_acc", "seconds", "images_per_s"]


def new_run_dir(out_root: str | Path, name: str) -> Path:
    """runs/<recipe>-<YYYYmmdd-HHMMSS>, with a suffix if that exists already."""
    base = Path(out_root) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run, n = base, 1
    while run.exists():
        run, n = base.with_name(f"{base.name}-{n}"), n + 1
    run.mkdir(parents=True)
    return run


def with_data_root(recipe: Recipe, data_root: str | Path | None) -> Recipe:
    """The recipe with its data root made absolute (and replaced if given), as the run will save it."""
    root = Path(data_root or recipe.data.root).resolve()
    return dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, root=str(root)))


class Run:
    """One run directory being trained."""

    def __init__(self, recipe: Recipe, run_dir: Path, session: Session, classes: list[str], echo: Callable[[str], None]):
        self.recipe, self.dir, self.s, self.classes, self.echo = recipe, run_dir, session, classes, echo
        self.state = TrainState()
        self.epoch = 0  # epochs completed
        self.best_acc, self.best_epoch, self.best_weights_from = -1.0, 0, "raw"
        self.metrics = pd.DataFrame()
        self.log: EpochLog | None = None

    def payload(self) -> dict:
        s = self.s
        return training_payload(
            model=s.model, ema_model=s.ema_model, optimizer_state=s.optimizer.state_dict(),
            scheduler_state=s.schedule.state_dict(), scaler_state=None if s.scaler is None else s.scaler.state_dict(),
            epoch=self.epoch, planned_epochs=self.recipe.train.epochs, num_updates=self.state.num_updates,
            rng=rng_state(s.gen), recipe=recipe_as_dict(self.recipe), classes=self.classes, num_params=s.num_params,
            mean=list(map(float, s.mean.cpu())), std=list(map(float, s.std.cpu())),
            best_acc=self.best_acc, best_epoch=self.best_epoch, best_weights_from=self.best_weights_from)

    def restore(self, payload: dict) -> None:
        """Continue from a last.pt, also one saved on another device (the tensors were mapped to the CPU on reading)."""
        s = self.s
        s.model.load_state_dict(payload["model"])
        if s.ema is not None and payload["ema"] is not None:
            s.ema_model.load_state_dict(payload["ema"])
        load_optimizer_state(s.optimizer, payload["optimizer"])
        if s.scaler is not None and payload["scaler"] is not None:
            s.scaler.load_state_dict(payload["scaler"])
        self.epoch, self.state.num_updates = payload["epoch"], payload["num_updates"]
        self.best_acc, self.best_epoch, self.best_weights_from = payload["best_acc"], payload["best_epoch"], payload["best_weights_from"]
        s.schedule.resume(payload["scheduler"], payload["planned_epochs"], self.epoch, self.state.num_updates)
        if not restore_rng(payload["rng"], s.gen):
            s.gen.manual_seed(self.recipe.train.seed + self.epoch)
            self.echo(f"note: the data stream was saved on {payload['rng']['data_device']} and cannot continue on "
                      f"{s.gen.device.type}: it restarts from train.seed + {self.epoch} (the run goes on, not bit-exactly)")
        metrics = pd.read_csv(self.dir / "metrics.csv")
        self.metrics = metrics[metrics.epoch <= self.epoch].reset_index(drop=True)  # drop rows past last.pt

    def evaluate(self, model: torch.nn.Module) -> tuple[float, float]:
        s = self.s
        probs = predict_probs(model, s.val.images, s.mean, s.std, [lambda x: x], self.recipe.train.eval_batch_size, s.prec)
        return probs_loss_acc(probs, s.val.labels)

    def train_epoch(self) -> EpochResult:
        s, spec = self.s, self.recipe.train
        with EpochProgress(self.epoch + 1, spec.epochs, len(s.train) // spec.batch_size, s.optimizer) as progress:
            return train_one_epoch(s.step_model, s.train, s.augment, s.hooks, self.state,
                                   spec.batch_size, s.gen, s.prec, progress=progress)

    def record(self, lr: float, result: EpochResult) -> dict:
        """Evaluate raw and EMA weights, append the metrics row, keep the best; returns the row."""
        val_loss, val_acc = self.evaluate(self.s.model)
        ema_acc = self.evaluate(self.s.ema_model)[1] if self.s.ema is not None else float("nan")
        self.s.schedule.after_epoch(self.epoch, val_acc)
        row = {"epoch": self.epoch, "lr": lr, "train_loss": result.loss, "train_acc": result.acc, "val_loss": val_loss,
               "val_acc": val_acc, "ema_val_acc": ema_acc, "seconds": result.seconds,
               "images_per_s": result.images / max(result.seconds, 1e-9)}
        new = pd.DataFrame([row], columns=METRIC_COLUMNS)
        self.metrics = new if self.metrics.empty else pd.concat([self.metrics, new], ignore_index=True)
        score, weights_from = max((val_acc, "raw"), (-1.0 if math.isnan(ema_acc) else ema_acc, "ema"))
        if score > self.best_acc:
            self.best_acc, self.best_epoch, self.best_weights_from = score, self.epoch, weights_from
        if self.log is not None:
            self.log.write(row)
        return row

    def save(self) -> None:
        payload = self.payload()
        save_checkpoint(payload, self.dir / "last.pt")
        if self.best_epoch == self.epoch:
            save_checkpoint(payload, self.dir / "best.pt")
        write_text(self.dir / "metrics.csv", self.metrics.to_csv(index=False))
        plot_curves(self.metrics, self.dir / "curves.png", self.recipe.name)

    def should_stop_early(self) -> bool:
        patience = self.recipe.train.early_stopping_patience
        return patience is not None and self.epoch - self.best_epoch >= patience

    def fit(self, on_epoch_end: Callable[["Run"], None] | None = None) -> None:
        if self.recipe.train.log == "tensorboard":
            self.log = EpochLog(self.dir, self.recipe.name, first_epoch=self.epoch + 1)
        try:
            with deterministic(self.recipe.train.deterministic):
                self._epochs(on_epoch_end)
        finally:
            if self.log is not None:
                self.log.close()

    def _epochs(self, on_epoch_end: Callable[["Run"], None] | None) -> None:
        while self.epoch < self.recipe.train.epochs:
            lr = current_lr(self.s.optimizer)
            result = self.train_epoch()
            if not result.finite:
                raise KitError(f"{self.dir}: training diverged: the loss became {result.loss} in epoch {self.epoch + 1}; "
                               f"the last good checkpoint is {self.dir / 'last.pt'} (epoch {self.epoch})")
            self.epoch += 1
            row = self.record(lr, result)
            self.save()
            self.echo(_summary(row, self.recipe.train.epochs))
            if on_epoch_end is not None:
                on_epoch_end(self)
            if self.should_stop_early():
                self.echo(f"early stopping: no better validation accuracy for {self.epoch - self.best_epoch} epochs "
                          f"(best {self.best_acc:.2%} at epoch {self.best_epoch})")
                break


def _summary(row: dict, epochs: int) -> str:
    ema = "" if math.isnan(row["ema_val_acc"]) else f" ema_val_acc {row['ema_val_acc']:.2%}"
    return (f"epoch {row['epoch']}/{epochs} lr {row['lr']:.3g} train_loss {row['train_loss']:.4f} "
            f"train_acc {row['train_acc']:.2%} val_loss {row['val_loss']:.4f} val_acc {row['val_acc']:.2%}{ema} "
            f"{row['seconds']:.1f}s {row['images_per_s']:,.0f} img/s")


class EpochProgress:
    """A tqdm bar on a terminal; nothing otherwise (the epoch summary line is printed either way)."""

    def __init__(self, epoch: int, epochs: int, steps: int, optimizer):
        self.bar, self.optimizer, self.n = None, optimizer, 0
        if sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=steps, desc=f"epoch {epoch}/{epochs}", leave=False, unit="step")

    def __enter__(self):
        return self.update if self.bar is not None else None

    def update(self, images: int, loss: torch.Tensor) -> None:
        self.bar.update(1)
        self.n += 1
        if self.n % 20 == 0:  # .item() syncs the device: only now and then
            rate = self.bar.format_dict["rate"] or 0
            self.bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{current_lr(self.optimizer):.3g}", img_s=f"{rate * images:,.0f}")

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()


def train(recipe: Recipe, data_root: str | Path | None = None, out_root: str | Path = "runs", device: str = "auto",
          on_epoch_end: Callable[[Run], None] | None = None, echo: Callable[[str], None] = print,
          run_dir: str | Path | None = None) -> Path:
    """Train a recipe into a new run directory (`run_dir`, or out_root/<recipe>-<time>); returns its path."""
    recipe = with_data_root(recipe, data_root)
    dataset = load_dataset(recipe.data)
    _check_batch(recipe, len(dataset.train))
    session = build_session(recipe, dataset, resolve_device(device), recipe.name)
    if run_dir is None:
        run_dir = new_run_dir(out_root, recipe.name)
    run = Run(recipe, Path(run_dir), session, dataset.classes, echo)
    save_recipe(recipe, run.dir / "recipe.yaml")
    echo(f"{recipe.name}: {session.num_params:,} parameters, {len(dataset.train):,} training / {len(dataset.val):,} "
         f"validation images, {session.prec.device} {session.prec.dtype or 'fp32'}, run {run.dir}")
    run.fit(on_epoch_end)
    return run.dir


def resume(run_dir: str | Path, overrides: tuple[str, ...] = (), data_root: str | Path | None = None,
           device: str = "auto", on_epoch_end: Callable[[Run], None] | None = None,
           echo: Callable[[str], None] = print) -> Path:
    """Continue a run from its last.pt (optimizer, schedule, EMA, RNG); `train.epochs=N` may extend it.
    A run trained on CUDA continues on the CPU (`device='cpu'`) and the other way round."""
    run_dir = Path(run_dir)
    if not (run_dir / "recipe.yaml").is_file():
        raise KitError(f"{run_dir}: not a run directory (no recipe.yaml)")
    recipe = with_data_root(load_recipe(run_dir / "recipe.yaml", overrides), data_root)
    payload = read_payload(run_dir / "last.pt")
    dataset = load_dataset(recipe.data)
    if len(dataset.classes) != len(payload["classes"]):
        raise KitError(f"{run_dir / 'last.pt'}: has {len(payload['classes'])} classes but the data has {len(dataset.classes)}")
    session = build_session(recipe, dataset, resolve_device(device), str(run_dir / "recipe.yaml"))
    run = Run(recipe, run_dir, session, dataset.classes, echo)
    run.restore(payload)
    save_recipe(recipe, run_dir / "recipe.yaml")
    echo(f"resuming {run_dir} after epoch {run.epoch} of {recipe.train.epochs}")
    run.fit(on_epoch_end)
    return run_dir


def _check_batch(recipe: Recipe, n_train: int) -> None:
    if recipe.train.batch_size > n_train:
        raise KitError(f"{recipe.name}: train.batch_size {recipe.train.batch_size} is larger than the "
                       f"{n_train} training images")
